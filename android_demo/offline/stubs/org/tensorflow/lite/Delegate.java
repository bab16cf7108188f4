package org.tensorflow.lite;

/** Compile-only stand-in for LiteRT 1.4.0's org.tensorflow.lite.Delegate; never packaged. */
public interface Delegate {
    long getNativeHandle();
}

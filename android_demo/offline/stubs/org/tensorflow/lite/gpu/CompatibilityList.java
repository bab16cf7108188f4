package org.tensorflow.lite.gpu;

/** Compile-only stand-in for org.tensorflow.lite.gpu.CompatibilityList (litert-gpu 1.4.0); never packaged. */
public class CompatibilityList {
    public CompatibilityList() {
        throw new UnsupportedOperationException("compile-only stand-in");
    }

    public boolean isDelegateSupportedOnThisDevice() {
        throw new UnsupportedOperationException("compile-only stand-in");
    }

    public void close() {
        throw new UnsupportedOperationException("compile-only stand-in");
    }
}

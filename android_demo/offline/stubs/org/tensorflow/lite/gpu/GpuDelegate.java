package org.tensorflow.lite.gpu;

import org.tensorflow.lite.Delegate;

/** Compile-only stand-in for org.tensorflow.lite.gpu.GpuDelegate (com.google.ai.edge.litert:litert-gpu 1.4.0). */
public class GpuDelegate implements Delegate {
    public GpuDelegate() {
        throw new UnsupportedOperationException("compile-only stand-in");
    }

    @Override
    public long getNativeHandle() {
        throw new UnsupportedOperationException("compile-only stand-in");
    }

    public void close() {
        throw new UnsupportedOperationException("compile-only stand-in");
    }
}

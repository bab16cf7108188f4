package org.tensorflow.lite;

import java.nio.ByteBuffer;

/**
 * Compile-only stand-in for LiteRT 1.4.0's org.tensorflow.lite.Interpreter (com.google.ai.edge.litert:litert):
 * only the members the app calls, with the same signatures. build_offline.sh compiles against it and never
 * packages it; on a phone the real class from the AAR is used.
 */
public final class Interpreter implements AutoCloseable {
    public Interpreter(ByteBuffer byteBuffer, Options options) {
        throw new UnsupportedOperationException("compile-only stand-in");
    }

    public void run(Object input, Object output) {
        throw new UnsupportedOperationException("compile-only stand-in");
    }

    @Override
    public void close() {
        throw new UnsupportedOperationException("compile-only stand-in");
    }

    public static class Options {
        public Options() {
        }

        public Options setNumThreads(int numThreads) {
            throw new UnsupportedOperationException("compile-only stand-in");
        }

        public Options setUseNNAPI(boolean useNNAPI) {
            throw new UnsupportedOperationException("compile-only stand-in");
        }

        public Options addDelegate(Delegate delegate) {
            throw new UnsupportedOperationException("compile-only stand-in");
        }
    }
}

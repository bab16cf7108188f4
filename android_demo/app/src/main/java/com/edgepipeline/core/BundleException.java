package com.edgepipeline.core;

/** A model file the app cannot use: not a TFLite flatbuffer, no bundle metadata, or metadata it does not understand. */
public class BundleException extends Exception {
    private static final long serialVersionUID = 1L;

    public BundleException(String message) {
        super(message);
    }
}

package com.edgepipeline.core;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;

/** The bundle's input and output tensors: uint8 pixels in, scores out, following serve's Classifier. */
public final class TensorCodec {
    private final BundleInfo bundle;

    public TensorCodec(BundleInfo bundle) {
        this.bundle = bundle;
    }

    /**
     * A direct, native-order buffer (what the interpreter wants) holding one image's input tensor.
     * Bundles take raw 0..255 pixels (normalisation is inside the model): uint8 with scale 1 and zero
     * point 0 takes them unchanged, float32 takes their values, any other quantisation gets
     * round(pixel / scale + zero_point) clipped to the type's range.
     */
    public ByteBuffer encodeInput(byte[] pixels) {
        if (pixels.length != bundle.height * bundle.width * bundle.channels) {
            throw new IllegalArgumentException(pixels.length + " pixels for a "
                    + bundle.height + "x" + bundle.width + "x" + bundle.channels + " input");
        }
        ByteBuffer input = ByteBuffer.allocateDirect(bundle.inputBytes()).order(ByteOrder.nativeOrder());
        boolean unchanged = "uint8".equals(bundle.inputDtype) && bundle.inputScale == 1.0f && bundle.inputZeroPoint == 0;
        for (byte pixel : pixels) {
            int value = pixel & 0xFF;
            if (unchanged) {
                input.put(pixel);
            } else if ("float32".equals(bundle.inputDtype)) {
                input.putFloat(value);
            } else {
                // float32 arithmetic and round-half-even, as numpy computes it in serve.
                float q = (float) Math.rint((float) value / bundle.inputScale + (float) bundle.inputZeroPoint);
                float low = "uint8".equals(bundle.inputDtype) ? 0 : -128;
                float high = "uint8".equals(bundle.inputDtype) ? 255 : 127;
                input.put((byte) (int) Math.max(low, Math.min(high, q)));
            }
        }
        input.rewind();
        return input;
    }

    /** A direct, native-order buffer for the interpreter to write one image's output into. */
    public ByteBuffer newOutput() {
        return ByteBuffer.allocateDirect(bundle.outputBytes()).order(ByteOrder.nativeOrder());
    }

    /** Scores per label: quantised outputs become (q - zero_point) * scale, float outputs stay as they are. */
    public float[] decodeOutput(ByteBuffer output) {
        ByteBuffer raw = output.duplicate().order(output.order());
        raw.rewind();
        float[] scores = new float[bundle.labels.size()];
        boolean quantised = !"float32".equals(bundle.outputDtype) && bundle.outputScale != 0;
        for (int i = 0; i < scores.length; i++) {
            float value;
            if ("float32".equals(bundle.outputDtype)) {
                value = raw.getFloat();
            } else if ("uint8".equals(bundle.outputDtype)) {
                value = raw.get() & 0xFF;
            } else {
                value = raw.get();
            }
            scores[i] = quantised ? (value - bundle.outputZeroPoint) * bundle.outputScale : value;
        }
        return scores;
    }
}

package com.edgepipeline.core;

import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;

/**
 * What the app needs to know about a bundle, all read from the model file itself: the labels, input size,
 * colour channels, input dtype and quantisation from the "edge_pipeline.bundle" JSON metadata, and the
 * output's element type and class count from the flatbuffer's output tensor (the metadata does not state
 * the output dtype). The JSON document is the one serve/bundle_metadata.py's BundleMetadata defines and
 * quantize writes; tests/test_android.py checks that this class reads the values that type holds.
 */
public final class BundleInfo {
    public static final String METADATA_NAME = "edge_pipeline.bundle";
    private static final String FORMAT = "edge-pipeline bundle";

    public final String name;
    /** "int8", "qat", "float16" or "float32". */
    public final String quantization;
    public final List<String> labels;
    public final int height;
    public final int width;
    /** 1 (grey) or 3 (RGB). */
    public final int channels;
    /** "uint8", "int8" or "float32". */
    public final String inputDtype;
    public final float inputScale;
    public final int inputZeroPoint;
    /** "uint8", "int8" or "float32". */
    public final String outputDtype;
    public final float outputScale;
    public final int outputZeroPoint;

    private BundleInfo(Map<String, Object> json, String outputDtype, int numClasses) throws BundleException {
        name = text(json, "name");
        quantization = text(json, "quantization");
        Map<String, Object> input = object(json, "input");
        height = positive(input, "height");
        width = positive(input, "width");
        channels = positive(input, "channels");
        if (channels != 1 && channels != 3) {
            throw new BundleException("input has " + channels + " channels; the app handles 1 (grey) or 3 (RGB)");
        }
        inputDtype = text(json, "input_dtype");
        requireElementType("input", inputDtype);
        Map<String, Object> inputQuantization = object(json, "input_quantization");
        inputScale = (float) number(inputQuantization, "scale");
        inputZeroPoint = (int) number(inputQuantization, "zero_point");
        this.outputDtype = outputDtype;
        requireElementType("output", outputDtype);
        Map<String, Object> outputQuantization = object(json, "output_quantization");
        outputScale = (float) number(outputQuantization, "scale");
        outputZeroPoint = (int) number(outputQuantization, "zero_point");
        List<String> names = new ArrayList<String>();
        for (Object label : list(json, "labels")) {
            if (!(label instanceof String)) {
                throw new BundleException("metadata field 'labels' holds a non-string");
            }
            names.add((String) label);
        }
        if (names.size() != numClasses) {
            throw new BundleException("metadata has " + names.size() + " labels but the model has "
                    + numClasses + " outputs");
        }
        labels = Collections.unmodifiableList(names);
    }

    /**
     * Reads a bundle: a .tflite flatbuffer, memory-mapped or in memory. Its structure is checked first
     * (ModelStructure), so that a bundle this returns is safe to hand to LiteRT's Interpreter.
     */
    public static BundleInfo read(ByteBuffer model) throws BundleException {
        ModelStructure.check(model);
        try {
            TfliteFlatBuffer flatBuffer = new TfliteFlatBuffer(model);
            byte[] raw = flatBuffer.metadata(METADATA_NAME);
            if (raw == null) {
                throw new BundleException("no '" + METADATA_NAME + "' metadata: not an edge-pipeline bundle");
            }
            Object json = Json.parse(new String(raw, StandardCharsets.UTF_8));
            if (!(json instanceof Map) || !FORMAT.equals(((Map<?, ?>) json).get("format"))) {
                throw new BundleException("metadata is not an '" + FORMAT + "' document");
            }
            int[] shape = flatBuffer.outputShape();
            int numClasses = shape.length == 0 ? 0 : shape[shape.length - 1];
            @SuppressWarnings("unchecked")
            Map<String, Object> document = (Map<String, Object>) json;
            return new BundleInfo(document, flatBuffer.outputType(), numClasses);
        } catch (IndexOutOfBoundsException | IllegalArgumentException e) {
            // A flatbuffer offset pointing outside the file, or metadata that is not JSON.
            throw new BundleException("corrupt bundle (" + e.getMessage() + ")");
        }
    }

    /** Bytes of one input image: height x width x channels elements of the input dtype. */
    public int inputBytes() {
        return height * width * channels * elementSize(inputDtype);
    }

    /** Bytes of the output for one image: one element per label. */
    public int outputBytes() {
        return labels.size() * elementSize(outputDtype);
    }

    static int elementSize(String dtype) {
        return "float32".equals(dtype) ? 4 : 1;
    }

    private static void requireElementType(String what, String dtype) throws BundleException {
        if (!"uint8".equals(dtype) && !"int8".equals(dtype) && !"float32".equals(dtype)) {
            throw new BundleException(what + " type " + dtype + " is not one the app handles (uint8, int8, float32)");
        }
    }

    private static Object field(Map<String, Object> json, String key) throws BundleException {
        if (!json.containsKey(key)) {
            throw new BundleException("metadata lacks the field '" + key + "'");
        }
        return json.get(key);
    }

    private static String text(Map<String, Object> json, String key) throws BundleException {
        Object value = field(json, key);
        if (!(value instanceof String)) {
            throw new BundleException("metadata field '" + key + "' is not a string");
        }
        return (String) value;
    }

    private static double number(Map<String, Object> json, String key) throws BundleException {
        Object value = field(json, key);
        if (!(value instanceof Double)) {
            throw new BundleException("metadata field '" + key + "' is not a number");
        }
        return (Double) value;
    }

    private static int positive(Map<String, Object> json, String key) throws BundleException {
        double value = number(json, key);
        if (value < 1 || value != Math.rint(value)) {
            throw new BundleException("metadata field '" + key + "' is not a positive whole number");
        }
        return (int) value;
    }

    @SuppressWarnings("unchecked")
    private static Map<String, Object> object(Map<String, Object> json, String key) throws BundleException {
        Object value = field(json, key);
        if (!(value instanceof Map)) {
            throw new BundleException("metadata field '" + key + "' is not an object");
        }
        return (Map<String, Object>) value;
    }

    @SuppressWarnings("unchecked")
    private static List<Object> list(Map<String, Object> json, String key) throws BundleException {
        Object value = field(json, key);
        if (!(value instanceof List)) {
            throw new BundleException("metadata field '" + key + "' is not a list");
        }
        return (List<Object>) value;
    }
}

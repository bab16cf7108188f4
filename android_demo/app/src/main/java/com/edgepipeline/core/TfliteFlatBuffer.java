package com.edgepipeline.core;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;

/**
 * The few lookups into a .tflite flatbuffer that the app needs, following tensorflow/lite/schema/schema.fbs
 * (the same walk as serve/tflite_flatbuffer.py). Works on a memory-mapped asset as well as on bytes read from storage.
 */
final class TfliteFlatBuffer {
    // Field indices in schema.fbs.
    private static final int MODEL_SUBGRAPHS = 2;
    private static final int MODEL_BUFFERS = 4;
    private static final int MODEL_METADATA = 6;
    private static final int SUBGRAPH_TENSORS = 0;
    private static final int SUBGRAPH_OUTPUTS = 2;
    private static final int TENSOR_SHAPE = 0;
    private static final int TENSOR_TYPE = 1;
    private static final int METADATA_NAME = 0;
    private static final int METADATA_BUFFER = 1;
    private static final int BUFFER_DATA = 0;

    /** TensorType values of schema.fbs, by code (0 = FLOAT32 ... 9 = INT8). */
    private static final String[] TENSOR_TYPES = {
        "float32", "float16", "int32", "uint8", "int64", "string", "bool", "int16", "complex64", "int8"
    };

    private final ByteBuffer data;
    private final int root;

    TfliteFlatBuffer(ByteBuffer model) throws BundleException {
        data = model.duplicate().order(ByteOrder.LITTLE_ENDIAN);
        if (data.limit() < 8 || data.getInt(4) != 0x334C4654) { // "TFL3", little endian
            throw new BundleException("not a TFLite model (no TFL3 identifier)");
        }
        root = deref(0);
    }

    /** The bytes of the `Model.metadata` entry called `name`, or null when there is none. */
    byte[] metadata(String name) {
        int metadata = field(root, MODEL_METADATA);
        int buffers = field(root, MODEL_BUFFERS);
        if (metadata < 0 || buffers < 0) {
            return null;
        }
        int bufferCount = length(buffers);
        for (int i = 0; i < length(metadata); i++) {
            int entry = deref(element(metadata, i));
            int namePos = field(entry, METADATA_NAME);
            int indexPos = field(entry, METADATA_BUFFER);
            if (namePos < 0 || indexPos < 0 || !name.equals(string(namePos))) {
                continue;
            }
            int index = data.getInt(indexPos);
            if (index < 0 || index >= bufferCount) {
                return null;
            }
            int dataPos = field(deref(element(buffers, index)), BUFFER_DATA);
            return dataPos < 0 ? new byte[0] : bytes(dataPos);
        }
        return null;
    }

    /** The element type of the first subgraph's first output, e.g. "uint8" or "float32". */
    String outputType() throws BundleException {
        int type = field(firstOutput(), TENSOR_TYPE);
        int code = type < 0 ? 0 : data.get(type); // absent means the schema's default, FLOAT32
        if (code < 0 || code >= TENSOR_TYPES.length) {
            throw new BundleException("unknown output tensor type " + code);
        }
        return TENSOR_TYPES[code];
    }

    /** The shape of the first subgraph's first output, e.g. [1, 10]. */
    int[] outputShape() throws BundleException {
        int shapePos = field(firstOutput(), TENSOR_SHAPE);
        int[] shape = new int[shapePos < 0 ? 0 : length(shapePos)];
        for (int i = 0; i < shape.length; i++) {
            shape[i] = data.getInt(element(shapePos, i));
        }
        return shape;
    }

    private int firstOutput() throws BundleException {
        int subgraphs = field(root, MODEL_SUBGRAPHS);
        if (subgraphs < 0 || length(subgraphs) == 0) {
            throw new BundleException("the model has no subgraph");
        }
        int subgraph = deref(element(subgraphs, 0));
        int tensors = field(subgraph, SUBGRAPH_TENSORS);
        int outputs = field(subgraph, SUBGRAPH_OUTPUTS);
        if (tensors < 0 || outputs < 0 || length(outputs) == 0) {
            throw new BundleException("the model has no output tensor");
        }
        int index = data.getInt(element(outputs, 0));
        if (index < 0 || index >= length(tensors)) {
            throw new BundleException("the model's output names a tensor it does not have");
        }
        return deref(element(tensors, index));
    }

    /** Absolute position of a table's field, or -1 when the field is absent. */
    private int field(int table, int index) {
        int vtable = table - data.getInt(table);
        int vtableSize = data.getShort(vtable) & 0xFFFF;
        int slot = 4 + 2 * index;
        if (slot >= vtableSize) {
            return -1;
        }
        int offset = data.getShort(vtable + slot) & 0xFFFF;
        return offset == 0 ? -1 : table + offset;
    }

    private int deref(int pos) {
        return pos + data.getInt(pos);
    }

    /** Length of the vector referenced at `pos`. */
    private int length(int pos) {
        return data.getInt(deref(pos));
    }

    /** Position of the i-th 4-byte element (an offset or an int) of the vector referenced at `pos`. */
    private int element(int pos, int i) {
        return deref(pos) + 4 + 4 * i;
    }

    /** The contents of the byte vector (or string) referenced at `pos`. */
    private byte[] bytes(int pos) {
        int start = deref(pos);
        byte[] bytes = new byte[data.getInt(start)];
        ByteBuffer view = data.duplicate();
        view.position(start + 4);
        view.get(bytes);
        return bytes;
    }

    private String string(int pos) {
        return new String(bytes(pos), StandardCharsets.UTF_8);
    }
}

package com.edgepipeline.core;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.CharBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.Locale;

/**
 * A .tflite model's structure, checked before LiteRT's Interpreter sees it: each tensor of each subgraph (a known
 * type, a shape of at most a bounded number of elements, quantisation LiteRT's kernels can compute with, a UTF-8
 * name) and every index that points from one table to another (buffers, tensors, operator codes, subgraphs).
 * LiteRT trusts all of these: a zero point of -256, a scale of inf or a flipped batch dimension crash the app or
 * make it allocate gigabytes. A re-signed bundle passes any checksum, so only this check stands in between.
 *
 * The same rules and bounds as serve/tflite_flatbuffer.py check_structure (its constants and serve/bundle.py's
 * TENSOR_ELEMENTS_* ones): keep the two in step. Offsets are read as unsigned 32-bit numbers into longs, as Python
 * reads them, so that a huge offset is refused rather than wrapping round to a position inside the file.
 */
public final class ModelStructure {
    // Field indices in schema.fbs, as in serve/tflite_flatbuffer.py.
    private static final int MODEL_OPERATOR_CODES = 1;
    private static final int MODEL_SUBGRAPHS = 2;
    private static final int MODEL_BUFFERS = 4;
    private static final int MODEL_SIGNATURE_DEFS = 7;
    private static final int SUBGRAPH_TENSORS = 0;
    private static final int SUBGRAPH_INPUTS = 1;
    private static final int SUBGRAPH_OUTPUTS = 2;
    private static final int SUBGRAPH_OPERATORS = 3;
    private static final int TENSOR_SHAPE = 0;
    private static final int TENSOR_TYPE = 1;
    private static final int TENSOR_BUFFER = 2;
    private static final int TENSOR_NAME = 3;
    private static final int TENSOR_QUANTIZATION = 4;
    private static final int TENSOR_SHAPE_SIGNATURE = 7;
    private static final int QUANTIZATION_SCALE = 2;
    private static final int QUANTIZATION_ZERO_POINT = 3;
    private static final int QUANTIZATION_QUANTIZED_DIMENSION = 6;
    private static final int OPERATOR_OPCODE_INDEX = 0;
    private static final int OPERATOR_INPUTS = 1;
    private static final int OPERATOR_OUTPUTS = 2;
    private static final int OPERATOR_INTERMEDIATES = 8;
    private static final int OPERATOR_CODE_DEPRECATED_BUILTIN_CODE = 0;
    private static final int OPERATOR_CODE_BUILTIN_CODE = 3;
    private static final int SIGNATURE_DEF_INPUTS = 0;
    private static final int SIGNATURE_DEF_OUTPUTS = 1;
    private static final int SIGNATURE_DEF_KEY = 2;
    private static final int SIGNATURE_DEF_SUBGRAPH_INDEX = 4;
    private static final int TENSOR_MAP_NAME = 0;
    private static final int TENSOR_MAP_TENSOR_INDEX = 1;
    private static final int BUFFER_OFFSET = 1;
    private static final int BUFFER_SIZE = 2;

    /** enum TensorType, by value (serve/tflite_flatbuffer.py TENSOR_TYPES). */
    private static final String[] TENSOR_TYPES = {
        "float32", "float16", "int32", "uint8", "int64", "string", "bool", "int16", "complex64", "int8", "float64",
        "complex128", "uint64", "resource", "variant", "uint32", "uint16", "int4", "bfloat16", "int2", "uint4",
        "float8_e4m3fn", "float8_e5m2",
    };
    /** The zero points TFLite's quantisation allows, by type (ZERO_POINT_RANGES); any other type: 0 only. */
    private static final String[] ZERO_POINT_TYPES = {"uint8", "int8", "int4", "uint4", "int2"};
    private static final long[][] ZERO_POINT_RANGES = {{0, 255}, {-128, 127}, {-8, 7}, {0, 15}, {-2, 1}};
    /**
     * The inputs LiteRT's kernels read as optional, which alone may be -1 (OPTIONAL_INPUTS): the bias (input 2) of
     * CONV_2D (3), DEPTHWISE_CONV_2D (4) and FULLY_CONNECTED (9), and input 3 of TRANSPOSE_CONV (67).
     */
    private static final int[][] OPTIONAL_INPUTS = {{3, 2}, {4, 2}, {9, 2}, {67, 3}};
    /** Scales within 2^-63..2^63, so that a product of two stays a finite, normal float32 (MIN_SCALE, MAX_SCALE). */
    private static final double MIN_SCALE = 0x1p-63;
    private static final double MAX_SCALE = 0x1p63;
    private static final String SCALE_RANGE = "1.0842e-19..9.22337e+18"; // as Python's {:g} writes them
    /**
     * The elements one tensor may hold: a floor for any file plus so many per byte of the file, at most 2^28
     * (serve/bundle.py TENSOR_ELEMENTS_FLOOR, TENSOR_ELEMENTS_PER_BYTE, MAX_TENSOR_ELEMENTS).
     */
    static final long TENSOR_ELEMENTS_FLOOR = 1L << 22;
    static final long TENSOR_ELEMENTS_PER_BYTE = 4;
    static final long MAX_TENSOR_ELEMENTS = 1L << 28;

    private final ByteBuffer data;
    private final long size;

    private ModelStructure(ByteBuffer model) {
        data = model.duplicate().order(ByteOrder.LITTLE_ENDIAN);
        size = data.limit();
    }

    /** BundleException saying what is wrong, and where ("tensor 3 ('conv/bias'): ..."), unless the model is sound. */
    public static void check(ByteBuffer model) throws BundleException {
        ModelStructure structure = new ModelStructure(model);
        if (structure.size < 8 || structure.data.getInt(4) != 0x334C4654) { // "TFL3", little endian
            throw new BundleException("not a TFLite model (no TFL3 identifier)");
        }
        long perBytes = TENSOR_ELEMENTS_PER_BYTE * structure.size;
        structure.check(Math.min(MAX_TENSOR_ELEMENTS, TENSOR_ELEMENTS_FLOOR + perBytes));
    }

    private void check(long maxElements) throws BundleException {
        long root = deref(0);
        long[] buffers = tables(root, MODEL_BUFFERS);
        for (int i = 0; i < buffers.length; i++) {
            // Data stored after the flatbuffer, for models over 2 GB; both fields are unsigned 64-bit.
            long offset = scalarLong(buffers[i], BUFFER_OFFSET);
            long end = offset + scalarLong(buffers[i], BUFFER_SIZE);
            boolean set = offset < 0 || offset > 1;
            if (set && (offset < 0 || end < 0 || end < offset || end > size)) {
                throw new BundleException("buffer " + i + " lies outside the " + size + "-byte file");
            }
        }
        // An operator code's builtin is the larger of its two fields (schema.fbs: the int8 one is for old readers).
        long[] codes = tables(root, MODEL_OPERATOR_CODES);
        int[] builtins = new int[codes.length];
        for (int i = 0; i < codes.length; i++) {
            builtins[i] = scalarByte(codes[i], OPERATOR_CODE_DEPRECATED_BUILTIN_CODE);
        }
        for (int i = 0; i < codes.length; i++) {
            builtins[i] = Math.max(builtins[i], scalarInt(codes[i], OPERATOR_CODE_BUILTIN_CODE));
        }
        long[] subgraphs = tables(root, MODEL_SUBGRAPHS);
        if (subgraphs.length == 0) {
            throw new BundleException("the model has no subgraph");
        }
        int[] tensorCounts = new int[subgraphs.length];
        for (int s = 0; s < subgraphs.length; s++) {
            String where = subgraphs.length == 1 ? "" : "subgraph " + s + " ";
            long[] tensors = tables(subgraphs[s], SUBGRAPH_TENSORS);
            for (int t = 0; t < tensors.length; t++) {
                checkTensor(tensors[t], where + "tensor " + t, buffers.length, maxElements);
            }
            int count = tensors.length;
            tensorCounts[s] = count;
            checkIndices(ints(subgraphs[s], SUBGRAPH_INPUTS), count, where + "input", -1);
            checkIndices(ints(subgraphs[s], SUBGRAPH_OUTPUTS), count, where + "output", -1);
            long[] operators = tables(subgraphs[s], SUBGRAPH_OPERATORS);
            for (int o = 0; o < operators.length; o++) {
                long opcode = scalarUnsigned(operators[o], OPERATOR_OPCODE_INDEX);
                if (opcode >= builtins.length) {
                    throw new BundleException(where + "operator " + o + " names operator code " + opcode + " of "
                            + builtins.length);
                }
                String what = where + "operator " + o;
                int optional = -1;
                for (int[] entry : OPTIONAL_INPUTS) {
                    if (entry[0] == builtins[(int) opcode]) {
                        optional = entry[1];
                    }
                }
                checkIndices(ints(operators[o], OPERATOR_INPUTS), count, what + " input", optional);
                checkIndices(ints(operators[o], OPERATOR_OUTPUTS), count, what + " output", -1);
                checkIndices(ints(operators[o], OPERATOR_INTERMEDIATES), count, what + " intermediate", -1);
            }
        }
        long[] signatures = tables(root, MODEL_SIGNATURE_DEFS);
        for (int d = 0; d < signatures.length; d++) {
            utf8(signatures[d], SIGNATURE_DEF_KEY, "signature " + d);
            long index = scalarUnsigned(signatures[d], SIGNATURE_DEF_SUBGRAPH_INDEX);
            if (index >= subgraphs.length) {
                throw new BundleException("signature " + d + " names subgraph " + index + " of " + subgraphs.length);
            }
            for (int field : new int[] {SIGNATURE_DEF_INPUTS, SIGNATURE_DEF_OUTPUTS}) {
                for (long entry : tables(signatures[d], field)) {
                    utf8(entry, TENSOR_MAP_NAME, "signature " + d);
                    long tensor = scalarUnsigned(entry, TENSOR_MAP_TENSOR_INDEX);
                    if (tensor >= tensorCounts[(int) index]) {
                        throw new BundleException("signature " + d + " names tensor " + tensor + " of "
                                + tensorCounts[(int) index]);
                    }
                }
            }
        }
    }

    /** Each of `indices` names one of `count` tensors, or is -1 (none) at the `optional` place. */
    private static void checkIndices(int[] indices, int count, String what, int optional) throws BundleException {
        if (indices == null) {
            return;
        }
        for (int place = 0; place < indices.length; place++) {
            int index = indices[place];
            if (!(index >= 0 && index < count || index == -1 && place == optional)) {
                throw new BundleException(what + " " + place + " names tensor " + index + " of " + count);
            }
        }
    }

    private void checkTensor(long tensor, String where, int bufferCount, long maxElements) throws BundleException {
        String name = utf8(tensor, TENSOR_NAME, where);
        boolean longName = name.codePointCount(0, name.length()) > 80; // Python counts code points, not chars
        where += " (" + quoted(longName ? name.substring(0, name.offsetByCodePoints(0, 80)) + "..." : name) + ")";
        int type = scalarByte(tensor, TENSOR_TYPE);
        if (type < 0 || type >= TENSOR_TYPES.length) {
            throw new BundleException(where + ": unknown type " + type);
        }
        int[] shape = ints(tensor, TENSOR_SHAPE);
        if (shape == null) {
            shape = new int[0];
        }
        for (int dimension : shape) {
            if (dimension < 0) {
                throw new BundleException(where + ": a negative dimension in its shape " + shown(shape));
            }
        }
        // The product, or a number past the limit as soon as it passes it (below 2^59: no overflow); 0 if any is.
        long elements = 1;
        for (int dimension : shape) {
            if (dimension == 0) {
                elements = 0;
                break;
            }
            elements = elements > maxElements ? elements : elements * dimension;
        }
        if (elements > maxElements) {
            throw new BundleException(where + ": its shape " + shown(shape) + " holds more than the "
                    + String.format(Locale.US, "%,d", maxElements)
                    + " elements a tensor of a model this size may have");
        }
        int[] signature = ints(tensor, TENSOR_SHAPE_SIGNATURE);
        if (signature != null) {
            boolean fits = signature.length == shape.length;
            for (int i = 0; fits && i < shape.length; i++) {
                fits = signature[i] == shape[i] || signature[i] == -1;
            }
            if (!fits) {
                throw new BundleException(where + ": its shape signature " + shown(signature)
                        + " does not fit its shape " + shown(shape));
            }
        }
        long index = scalarUnsigned(tensor, TENSOR_BUFFER);
        if (index >= bufferCount) {
            throw new BundleException(where + ": names buffer " + index + " of " + bufferCount);
        }
        long quantization = field(tensor, TENSOR_QUANTIZATION);
        if (quantization >= 0) {
            String problem = quantizationProblem(deref(quantization), TENSOR_TYPES[type], shape);
            if (problem != null) {
                throw new BundleException(where + ": " + problem);
            }
        }
    }

    /** What is wrong with a tensor's quantisation, or null. Without scales LiteRT ignores the rest (min/max). */
    private String quantizationProblem(long table, String typeName, int[] shape) throws BundleException {
        long scalesPos = field(table, QUANTIZATION_SCALE);
        if (scalesPos < 0) {
            return null;
        }
        long scalesStart = vector(scalesPos, 4);
        int scaleCount = (int) u32(scalesStart - 4);
        if (scaleCount == 0) {
            return null;
        }
        long zeroPointsPos = field(table, QUANTIZATION_ZERO_POINT);
        long zeroPointsStart = zeroPointsPos < 0 ? 0 : vector(zeroPointsPos, 8);
        int zeroPointCount = zeroPointsPos < 0 ? 0 : (int) u32(zeroPointsStart - 4);
        if (zeroPointCount != scaleCount) {
            return scaleCount + " scales but " + zeroPointCount + " zero points";
        }
        int dimension = scalarInt(table, QUANTIZATION_QUANTIZED_DIMENSION);
        if (dimension < 0 || dimension >= Math.max(shape.length, 1)) {
            return "quantized dimension " + dimension + " of a tensor of shape " + shown(shape);
        }
        if (scaleCount != 1 && (shape.length == 0 || scaleCount != shape[dimension])) {
            return scaleCount + " scales for dimension " + dimension + " of shape " + shown(shape);
        }
        for (int i = 0; i < scaleCount; i++) {
            double scale = data.getFloat((int) (scalesStart + 4L * i));
            if (!(scale >= MIN_SCALE && scale <= MAX_SCALE)) { // NaN fails both
                return "scale " + shownScale(scale) + " outside " + SCALE_RANGE;
            }
        }
        long low = 0;
        long high = 0;
        for (int i = 0; i < ZERO_POINT_TYPES.length; i++) {
            if (ZERO_POINT_TYPES[i].equals(typeName)) {
                low = ZERO_POINT_RANGES[i][0];
                high = ZERO_POINT_RANGES[i][1];
            }
        }
        for (int i = 0; i < zeroPointCount; i++) {
            long zeroPoint = data.getLong((int) (zeroPointsStart + 8L * i));
            if (zeroPoint < low || zeroPoint > high) {
                return "zero point " + zeroPoint + " outside " + typeName + "'s " + low + ".." + high;
            }
        }
        return null;
    }

    /** A scale as Python's repr writes it, near enough: inf, -inf, nan, else Java's shortest decimal. */
    private static String shownScale(double scale) {
        if (Double.isNaN(scale)) {
            return "nan";
        }
        if (Double.isInfinite(scale)) {
            return scale > 0 ? "inf" : "-inf";
        }
        return Double.toString(scale);
    }

    /** A name as Python's repr() writes it, as serve's messages show it: quoted, unprintable characters escaped. */
    private static String quoted(String name) {
        char quote = name.indexOf('\'') >= 0 && name.indexOf('"') < 0 ? '"' : '\'';
        StringBuilder text = new StringBuilder().append(quote);
        for (int i = 0; i < name.length(); i += Character.charCount(name.codePointAt(i))) {
            int c = name.codePointAt(i);
            int type = Character.getType(c);
            if (c == '\\' || c == quote) {
                text.append('\\').appendCodePoint(c);
            } else if (c == '\n' || c == '\r' || c == '\t') {
                text.append(c == '\n' ? "\\n" : c == '\r' ? "\\r" : "\\t");
            } else if (c != ' ' && (type == Character.CONTROL || type == Character.FORMAT
                    || type == Character.SURROGATE || type == Character.PRIVATE_USE || type == Character.UNASSIGNED
                    || type == Character.SPACE_SEPARATOR || type == Character.LINE_SEPARATOR
                    || type == Character.PARAGRAPH_SEPARATOR)) {
                text.append(String.format(c < 0x100 ? "\\x%02x" : c < 0x10000 ? "\\u%04x" : "\\U%08x", c));
            } else {
                text.appendCodePoint(c);
            }
        }
        return text.append(quote).toString();
    }

    /** A shape as a message shows it: a long one's first dimensions and its rank. */
    private static String shown(int[] shape) {
        if (shape.length <= 8) {
            return Arrays.toString(shape);
        }
        String first = Arrays.toString(Arrays.copyOf(shape, 8));
        return first.substring(0, first.length() - 1) + ", ...] (rank " + shape.length + ")";
    }

    // --- A bounds-checked flatbuffer reader: every position a long, every read inside the file or refused. -----

    private int at(long pos, long bytes) throws BundleException {
        if (pos < 0 || bytes < 0 || pos + bytes > size) {
            throw new BundleException("corrupt TFLite flatbuffer (offset " + pos + " is outside the " + size
                    + "-byte file)");
        }
        return (int) pos;
    }

    private long u32(long pos) throws BundleException {
        return data.getInt(at(pos, 4)) & 0xFFFFFFFFL;
    }

    private long deref(long pos) throws BundleException {
        return pos + u32(pos);
    }

    /** Absolute position of a table's field, or -1 when the field is absent. */
    private long field(long table, int index) throws BundleException {
        long vtable = table - data.getInt(at(table, 4));
        int vtableSize = data.getShort(at(vtable, 2)) & 0xFFFF;
        int slot = 4 + 2 * index;
        if (slot + 2 > vtableSize) {
            return -1;
        }
        int offset = data.getShort(at(vtable + slot, 2)) & 0xFFFF;
        return offset == 0 ? -1 : table + offset;
    }

    /** Position of the first element of the vector referenced at `pos`, its elements checked to lie in the file. */
    private long vector(long pos, int itemSize) throws BundleException {
        long start = deref(pos);
        long length = u32(start);
        at(start + 4, length * itemSize);
        return start + 4;
    }

    private int scalarByte(long table, int index) throws BundleException {
        long pos = field(table, index);
        return pos < 0 ? 0 : data.get(at(pos, 1)); // absent: the schema's default, 0
    }

    private int scalarInt(long table, int index) throws BundleException {
        long pos = field(table, index);
        return pos < 0 ? 0 : data.getInt(at(pos, 4));
    }

    private long scalarUnsigned(long table, int index) throws BundleException {
        long pos = field(table, index);
        return pos < 0 ? 0 : u32(pos);
    }

    /** An unsigned 64-bit field as a long (negative past 2^63). */
    private long scalarLong(long table, int index) throws BundleException {
        long pos = field(table, index);
        return pos < 0 ? 0 : data.getLong(at(pos, 8));
    }

    /** A table's vector of int32, or null when the field is absent. */
    private int[] ints(long table, int index) throws BundleException {
        long pos = field(table, index);
        if (pos < 0) {
            return null;
        }
        long start = vector(pos, 4);
        int[] values = new int[(int) u32(start - 4)];
        for (int i = 0; i < values.length; i++) {
            values[i] = data.getInt((int) (start + 4L * i));
        }
        return values;
    }

    /** The positions of the tables in a table's vector of tables (none when the field is absent). */
    private long[] tables(long table, int index) throws BundleException {
        long pos = field(table, index);
        if (pos < 0) {
            return new long[0];
        }
        long start = vector(pos, 4);
        long[] positions = new long[(int) u32(start - 4)];
        for (int i = 0; i < positions.length; i++) {
            positions[i] = deref(start + 4L * i);
        }
        return positions;
    }

    /** A table's string field ("" when absent), or a BundleException naming `where` when it is not UTF-8. */
    private String utf8(long table, int index, String where) throws BundleException {
        long pos = field(table, index);
        if (pos < 0) {
            return "";
        }
        long start = vector(pos, 1);
        ByteBuffer bytes = data.duplicate();
        bytes.position((int) start).limit((int) (start + u32(start - 4)));
        try {
            CharBuffer text = StandardCharsets.UTF_8.newDecoder().onMalformedInput(CodingErrorAction.REPORT)
                    .onUnmappableCharacter(CodingErrorAction.REPORT).decode(bytes);
            return text.toString();
        } catch (CharacterCodingException e) {
            throw new BundleException(where + ": its name is not UTF-8");
        }
    }
}

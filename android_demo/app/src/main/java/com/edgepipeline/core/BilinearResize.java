package com.edgepipeline.core;

/**
 * Pillow's bilinear Image.resize for 8-bit images (libImaging/Resample.c), so that the app hands the model
 * the same pixels serve does. Downscaling widens the triangle filter to the scale factor (an antialiased
 * resize, unlike Android's Bitmap.createScaledBitmap); weights are fixed-point with 22 fraction bits and the
 * two passes (horizontal, then vertical) round to 8 bits in between, exactly as Pillow does.
 */
final class BilinearResize {
    private static final int PRECISION_BITS = 32 - 8 - 2;

    private BilinearResize() {
    }

    /** Resizes interleaved pixels (`channels` bytes per pixel, rows top to bottom). */
    static byte[] resize(byte[] pixels, int width, int height, int channels, int outWidth, int outHeight) {
        byte[] out = pixels;
        if (outWidth != width) {
            out = horizontal(out, width, height, channels, new Weights(width, outWidth));
        }
        if (outHeight != height) {
            out = vertical(out, outWidth, height, channels, new Weights(height, outHeight));
        }
        return out == pixels ? pixels.clone() : out;
    }

    private static byte[] horizontal(byte[] in, int width, int height, int channels, Weights w) {
        int outWidth = w.first.length;
        byte[] out = new byte[outWidth * height * channels];
        for (int y = 0; y < height; y++) {
            int row = y * width;
            for (int x = 0; x < outWidth; x++) {
                int[] k = w.weights[x];
                for (int c = 0; c < channels; c++) {
                    int sum = 1 << (PRECISION_BITS - 1);
                    for (int i = 0; i < k.length; i++) {
                        sum += (in[(row + w.first[x] + i) * channels + c] & 0xFF) * k[i];
                    }
                    out[(y * outWidth + x) * channels + c] = clip8(sum);
                }
            }
        }
        return out;
    }

    private static byte[] vertical(byte[] in, int width, int height, int channels, Weights w) {
        int outHeight = w.first.length;
        int stride = width * channels;
        byte[] out = new byte[outHeight * stride];
        for (int y = 0; y < outHeight; y++) {
            int[] k = w.weights[y];
            for (int x = 0; x < stride; x++) {
                int sum = 1 << (PRECISION_BITS - 1);
                for (int i = 0; i < k.length; i++) {
                    sum += (in[(w.first[y] + i) * stride + x] & 0xFF) * k[i];
                }
                out[y * stride + x] = clip8(sum);
            }
        }
        return out;
    }

    private static byte clip8(int sum) {
        int value = sum >> PRECISION_BITS;
        return (byte) (value < 0 ? 0 : value > 255 ? 255 : value);
    }

    /** For each output position along one axis: the first input position used and fixed-point weights. */
    private static final class Weights {
        final int[] first;
        final int[][] weights;

        Weights(int inSize, int outSize) {
            first = new int[outSize];
            weights = new int[outSize][];
            double scale = (double) inSize / outSize;
            double filterScale = Math.max(scale, 1.0);
            double support = filterScale; // the triangle's support is 1, stretched when downscaling
            double inverse = 1.0 / filterScale; // multiplied, not divided: Pillow's rounding
            for (int xx = 0; xx < outSize; xx++) {
                double center = (xx + 0.5) * scale;
                int min = Math.max((int) (center - support + 0.5), 0);
                int count = Math.min((int) (center + support + 0.5), inSize) - min;
                double[] k = new double[count];
                double total = 0;
                for (int x = 0; x < count; x++) {
                    k[x] = triangle((x + min - center + 0.5) * inverse);
                    total += k[x];
                }
                int[] fixed = new int[count];
                for (int x = 0; x < count; x++) {
                    double normalised = total != 0 ? k[x] / total : k[x];
                    fixed[x] = (int) (normalised < 0 ? normalised * (1 << PRECISION_BITS) - 0.5
                            : normalised * (1 << PRECISION_BITS) + 0.5);
                }
                first[xx] = min;
                weights[xx] = fixed;
            }
        }

        private static double triangle(double x) {
            x = Math.abs(x);
            return x < 1.0 ? 1.0 - x : 0.0;
        }
    }
}

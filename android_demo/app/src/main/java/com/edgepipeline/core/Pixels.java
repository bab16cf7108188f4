package com.edgepipeline.core;

/**
 * Decoded pixels to the model's uint8 input, as serve/preprocess.py's to_pixels does after decoding:
 * transparency shown on white, grey or RGB, then the whole image resized bilinear to the input size.
 */
public final class Pixels {
    private Pixels() {
    }

    /**
     * `argb` holds width x height pixels, rows top to bottom, as Android's Bitmap.getPixels returns them
     * (0xAARRGGBB, not premultiplied). Returns outHeight x outWidth x channels bytes (1: grey, 3: RGB).
     */
    public static byte[] toModelInput(int[] argb, int width, int height, int outWidth, int outHeight, int channels) {
        if (argb.length != width * height) {
            throw new IllegalArgumentException(argb.length + " pixels for a " + width + "x" + height + " image");
        }
        if (channels != 1 && channels != 3) {
            throw new IllegalArgumentException("channels must be 1 or 3, not " + channels);
        }
        byte[] pixels = new byte[argb.length * channels];
        for (int i = 0; i < argb.length; i++) {
            int alpha = argb[i] >>> 24;
            int r = onWhite((argb[i] >> 16) & 0xFF, alpha);
            int g = onWhite((argb[i] >> 8) & 0xFF, alpha);
            int b = onWhite(argb[i] & 0xFF, alpha);
            if (channels == 1) {
                // Pillow's RGB -> L: ITU-R 601-2 luma in 16-bit fixed point, rounded.
                pixels[i] = (byte) ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16);
            } else {
                pixels[3 * i] = (byte) r;
                pixels[3 * i + 1] = (byte) g;
                pixels[3 * i + 2] = (byte) b;
            }
        }
        return BilinearResize.resize(pixels, width, height, channels, outWidth, outHeight);
    }

    /** Pillow's paste onto white with an alpha mask: (white * (255 - a) + c * a) / 255, rounded its way. */
    private static int onWhite(int c, int alpha) {
        int t = 255 * (255 - alpha) + c * alpha + 128;
        return ((t >> 8) + t) >> 8;
    }
}

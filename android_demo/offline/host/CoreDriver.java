import com.edgepipeline.core.BundleException;
import com.edgepipeline.core.BundleInfo;
import com.edgepipeline.core.ModelStructure;
import com.edgepipeline.core.Pixels;
import com.edgepipeline.core.Prediction;
import com.edgepipeline.core.TensorCodec;

import java.io.BufferedInputStream;
import java.io.DataInputStream;
import java.io.EOFException;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.io.PrintStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;

/**
 * Runs the app's plain-Java core on a desktop JVM for tests/test_android.py, which compares it with serve.
 *
 *   info MODEL                  the bundle's metadata as "key<TAB>value" lines, then one "label<TAB>name" per class
 *   input MODEL IMAGES OUT      each image's input tensor bytes, one after another
 *   pixels W H C IMAGES OUT     each image resized to W x H with C channels, uint8
 *   topk MODEL K RAW            for each raw output in RAW: K "index<TAB>score" lines, then "--"
 *   check LIST                  for each model named in LIST (one path a line): "ok", or "refused<TAB>why"
 *                               when ModelStructure refuses it
 *
 * IMAGES holds, per image, a big-endian int32 width and height and then width x height int32 ARGB pixels.
 */
public final class CoreDriver {
    public static void main(String[] args) throws Exception {
        PrintStream out = new PrintStream(System.out, true, "UTF-8");
        String command = args[0];
        if ("info".equals(command)) {
            BundleInfo bundle = read(args[1]);
            out.println("name\t" + bundle.name);
            out.println("quantization\t" + bundle.quantization);
            out.println("height\t" + bundle.height);
            out.println("width\t" + bundle.width);
            out.println("channels\t" + bundle.channels);
            out.println("input_dtype\t" + bundle.inputDtype);
            out.println("input_scale\t" + bundle.inputScale);
            out.println("input_zero_point\t" + bundle.inputZeroPoint);
            out.println("output_dtype\t" + bundle.outputDtype);
            out.println("output_scale\t" + bundle.outputScale);
            out.println("output_zero_point\t" + bundle.outputZeroPoint);
            for (String label : bundle.labels) {
                out.println("label\t" + label);
            }
        } else if ("input".equals(command)) {
            BundleInfo bundle = read(args[1]);
            TensorCodec codec = new TensorCodec(bundle);
            try (DataInputStream images = open(args[2]); OutputStream tensors = new FileOutputStream(args[3])) {
                int[] size = new int[2];
                int[] argb;
                while ((argb = nextImage(images, size)) != null) {
                    byte[] pixels = Pixels.toModelInput(argb, size[0], size[1], bundle.width, bundle.height,
                            bundle.channels);
                    ByteBuffer input = codec.encodeInput(pixels);
                    byte[] bytes = new byte[input.remaining()];
                    input.get(bytes);
                    tensors.write(bytes);
                }
            }
        } else if ("pixels".equals(command)) {
            int width = Integer.parseInt(args[1]);
            int height = Integer.parseInt(args[2]);
            int channels = Integer.parseInt(args[3]);
            try (DataInputStream images = open(args[4]); OutputStream resized = new FileOutputStream(args[5])) {
                int[] size = new int[2];
                int[] argb;
                while ((argb = nextImage(images, size)) != null) {
                    resized.write(Pixels.toModelInput(argb, size[0], size[1], width, height, channels));
                }
            }
        } else if ("topk".equals(command)) {
            BundleInfo bundle = read(args[1]);
            TensorCodec codec = new TensorCodec(bundle);
            int k = Integer.parseInt(args[2]);
            byte[] raw = Files.readAllBytes(Paths.get(args[3]));
            for (int start = 0; start < raw.length; start += bundle.outputBytes()) {
                ByteBuffer output = codec.newOutput();
                output.put(raw, start, bundle.outputBytes());
                for (Prediction p : Prediction.topK(codec.decodeOutput(output), bundle.labels, k)) {
                    out.println(p.index + "\t" + p.score);
                }
                out.println("--");
            }
        } else if ("check".equals(command)) {
            for (String path : Files.readAllLines(Paths.get(args[1]), StandardCharsets.UTF_8)) {
                try {
                    ModelStructure.check(ByteBuffer.wrap(Files.readAllBytes(Paths.get(path))));
                    out.println("ok");
                } catch (BundleException e) {
                    out.println("refused\t" + e.getMessage());
                }
            }
        } else {
            throw new IllegalArgumentException("unknown command " + command);
        }
    }

    private static BundleInfo read(String path) throws Exception {
        return BundleInfo.read(ByteBuffer.wrap(Files.readAllBytes(Paths.get(path))).order(ByteOrder.LITTLE_ENDIAN));
    }

    private static DataInputStream open(String path) throws IOException {
        return new DataInputStream(new BufferedInputStream(new FileInputStream(path)));
    }

    /** The next image's ARGB pixels (its width and height go into `size`), or null at the end of the file. */
    private static int[] nextImage(DataInputStream in, int[] size) throws IOException {
        try {
            size[0] = in.readInt();
        } catch (EOFException end) {
            return null;
        }
        size[1] = in.readInt();
        int[] argb = new int[size[0] * size[1]];
        for (int i = 0; i < argb.length; i++) {
            argb[i] = in.readInt();
        }
        return argb;
    }
}

package com.edgepipeline.demo;

import android.os.SystemClock;

import com.edgepipeline.core.BundleException;
import com.edgepipeline.core.BundleInfo;
import com.edgepipeline.core.Pixels;
import com.edgepipeline.core.Prediction;
import com.edgepipeline.core.TensorCodec;

import org.tensorflow.lite.Interpreter;
import org.tensorflow.lite.gpu.GpuDelegate;

import java.nio.ByteBuffer;
import java.util.List;

/**
 * A bundle run by LiteRT's Interpreter with the chosen threads and delegate. Everything about the model
 * (input size, channels, dtype, quantisation, labels) comes from its BundleInfo. Not thread-safe: the
 * activity uses it from its one inference thread.
 */
final class LiteRtClassifier {
    enum Accelerator { CPU, GPU, NNAPI }

    /** One classified frame or picture. */
    static final class Result {
        final List<Prediction> top;
        final double preprocessMs;
        final double inferenceMs;

        Result(List<Prediction> top, double preprocessMs, double inferenceMs) {
            this.top = top;
            this.preprocessMs = preprocessMs;
            this.inferenceMs = inferenceMs;
        }
    }

    final BundleInfo bundle;
    final int threads;
    final Accelerator accelerator;
    private final TensorCodec codec;
    private final Interpreter interpreter;
    private final GpuDelegate gpu;

    /** `model` must be a direct or memory-mapped buffer holding the whole .tflite file. */
    LiteRtClassifier(ByteBuffer model, int threads, Accelerator accelerator) throws BundleException {
        bundle = BundleInfo.read(model);
        this.threads = threads;
        this.accelerator = accelerator;
        codec = new TensorCodec(bundle);
        Interpreter.Options options = new Interpreter.Options().setNumThreads(threads);
        gpu = accelerator == Accelerator.GPU ? new GpuDelegate() : null;
        if (gpu != null) {
            options.addDelegate(gpu);
        }
        if (accelerator == Accelerator.NNAPI) {
            options.setUseNNAPI(true);
        }
        interpreter = new Interpreter(model, options);
    }

    /** Top `k` labels of an image given as ARGB pixels (Bitmap.getPixels), whole image resized as serve does. */
    Result classify(int[] argb, int width, int height, int k) {
        long start = SystemClock.elapsedRealtimeNanos();
        byte[] pixels = Pixels.toModelInput(argb, width, height, bundle.width, bundle.height, bundle.channels);
        ByteBuffer input = codec.encodeInput(pixels);
        ByteBuffer output = codec.newOutput();
        long invoke = SystemClock.elapsedRealtimeNanos();
        interpreter.run(input, output);
        long end = SystemClock.elapsedRealtimeNanos();
        List<Prediction> top = Prediction.topK(codec.decodeOutput(output), bundle.labels, k);
        return new Result(top, (invoke - start) / 1e6, (end - invoke) / 1e6);
    }

    void close() {
        interpreter.close();
        if (gpu != null) {
            gpu.close();
        }
    }
}

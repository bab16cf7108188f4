package com.edgepipeline.demo;

import android.Manifest;
import android.app.Activity;
import android.content.Intent;
import android.content.pm.PackageManager;
import android.content.res.AssetFileDescriptor;
import android.database.Cursor;
import android.graphics.Bitmap;
import android.graphics.BitmapFactory;
import android.graphics.Matrix;
import android.graphics.SurfaceTexture;
import android.hardware.camera2.CameraAccessException;
import android.net.Uri;
import android.os.Build;
import android.os.Bundle;
import android.os.Handler;
import android.os.HandlerThread;
import android.provider.MediaStore;
import android.util.Size;
import android.view.TextureView;
import android.view.View;
import android.view.ViewGroup;
import android.widget.AdapterView;
import android.widget.ArrayAdapter;
import android.widget.ImageView;
import android.widget.Spinner;
import android.widget.TextView;

import com.edgepipeline.core.BundleException;
import com.edgepipeline.core.Prediction;

import org.tensorflow.lite.gpu.CompatibilityList;

import java.io.ByteArrayOutputStream;
import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.channels.FileChannel;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;

/**
 * Live camera or a gallery picture, labelled by the bundle in assets/model.tflite (or one chosen from
 * storage): top-3 labels and scores over the image, the time per frame, and a choice of threads and delegate.
 */
public class MainActivity extends Activity implements TextureView.SurfaceTextureListener {
    private static final String ASSET = "model.tflite";
    private static final int TOP_K = 3;
    private static final int PICK_PICTURE = 1;
    private static final int PICK_MODEL = 2;
    private static final int ASK_CAMERA = 3;
    private static final Integer[] THREADS = {1, 2, 4};

    private TextureView preview;
    private ImageView picture;
    private TextView results;
    private Spinner threads;
    private Spinner delegate;
    private CameraPreview camera;

    /** All interpreter work happens on this thread; the UI thread only reads `classifier.bundle`. */
    private HandlerThread inferenceThread;
    private Handler inference;
    private volatile LiteRtClassifier classifier;
    private volatile ByteBuffer model;
    /** Set on the UI thread when a frame is handed over, cleared when its result is shown: drops frames while busy. */
    private boolean busy;
    private boolean cameraMode = true;

    @Override
    protected void onCreate(Bundle savedInstanceState) {
        super.onCreate(savedInstanceState);
        setContentView(R.layout.activity_main);
        preview = (TextureView) findViewById(R.id.preview);
        picture = (ImageView) findViewById(R.id.picture);
        results = (TextView) findViewById(R.id.results);
        threads = (Spinner) findViewById(R.id.threads);
        delegate = (Spinner) findViewById(R.id.delegate);
        camera = new CameraPreview(this);
        preview.setSurfaceTextureListener(this);

        threads.setAdapter(new ArrayAdapter<Integer>(this, android.R.layout.simple_spinner_item, THREADS));
        delegate.setAdapter(new ArrayAdapter<LiteRtClassifier.Accelerator>(
                this, android.R.layout.simple_spinner_item, availableAccelerators()));
        AdapterView.OnItemSelectedListener reload = new AdapterView.OnItemSelectedListener() {
            @Override
            public void onItemSelected(AdapterView<?> parent, View view, int position, long id) {
                loadClassifier();
            }

            @Override
            public void onNothingSelected(AdapterView<?> parent) {
            }
        };
        threads.setOnItemSelectedListener(reload);
        delegate.setOnItemSelectedListener(reload);

        findViewById(R.id.camera).setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                showCamera();
            }
        });
        findViewById(R.id.gallery).setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                pick("image/*", PICK_PICTURE);
            }
        });
        findViewById(R.id.model).setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                pick("*/*", PICK_MODEL); // .tflite has no registered MIME type
            }
        });

        inferenceThread = new HandlerThread("inference");
        inferenceThread.start();
        inference = new Handler(inferenceThread.getLooper());
        try {
            model = mapAsset(ASSET);
        } catch (IOException e) {
            results.setText(R.string.no_model);
        }
    }

    @Override
    protected void onResume() {
        super.onResume();
        if (cameraMode && preview.isAvailable()) {
            startCamera();
        }
    }

    @Override
    protected void onPause() {
        camera.stop();
        super.onPause();
    }

    @Override
    protected void onDestroy() {
        inference.post(new Runnable() {
            @Override
            public void run() {
                closeClassifier();
            }
        });
        inferenceThread.quitSafely();
        super.onDestroy();
    }

    // --- Model ---------------------------------------------------------------------------------------------

    /** The GPU only where LiteRT's list says it works, NNAPI only from Android 8.1 (API 27), where it is usable. */
    private List<LiteRtClassifier.Accelerator> availableAccelerators() {
        List<LiteRtClassifier.Accelerator> list = new ArrayList<LiteRtClassifier.Accelerator>();
        list.add(LiteRtClassifier.Accelerator.CPU);
        CompatibilityList compatibility = new CompatibilityList();
        if (compatibility.isDelegateSupportedOnThisDevice()) {
            list.add(LiteRtClassifier.Accelerator.GPU);
        }
        compatibility.close();
        if (Build.VERSION.SDK_INT >= 27) {
            list.add(LiteRtClassifier.Accelerator.NNAPI);
        }
        return list;
    }

    /** (Re)creates the classifier on the inference thread with the current model and settings. */
    private void loadClassifier() {
        if (model == null) {
            return;
        }
        final ByteBuffer bytes = model;
        final int threadCount = (Integer) threads.getSelectedItem();
        final LiteRtClassifier.Accelerator accelerator = (LiteRtClassifier.Accelerator) delegate.getSelectedItem();
        inference.post(new Runnable() {
            @Override
            public void run() {
                closeClassifier();
                String message;
                try {
                    classifier = new LiteRtClassifier(bytes, threadCount, accelerator);
                    message = classifier.bundle.name + " (" + classifier.bundle.quantization + "), "
                            + classifier.bundle.width + "x" + classifier.bundle.height + "x"
                            + classifier.bundle.channels + ", " + classifier.bundle.labels.size() + " labels";
                } catch (BundleException e) {
                    message = "Not a usable bundle: " + e.getMessage();
                } catch (RuntimeException e) {
                    // LiteRT reports a delegate that cannot take the model with an IllegalArgumentException.
                    message = accelerator + " cannot run this model: " + e.getMessage();
                }
                showOnUi(message);
            }
        });
    }

    private void closeClassifier() {
        if (classifier != null) {
            classifier.close();
            classifier = null;
        }
    }

    /** The asset memory-mapped, which is why the build stores .tflite files uncompressed. */
    private ByteBuffer mapAsset(String name) throws IOException {
        AssetFileDescriptor descriptor = getAssets().openFd(name);
        try {
            FileInputStream stream = new FileInputStream(descriptor.getFileDescriptor());
            try {
                return stream.getChannel().map(FileChannel.MapMode.READ_ONLY,
                        descriptor.getStartOffset(), descriptor.getDeclaredLength());
            } finally {
                stream.close();
            }
        } finally {
            descriptor.close();
        }
    }

    /** A model chosen from storage, read into a direct buffer (the interpreter takes direct buffers only). */
    private ByteBuffer readModel(Uri uri) throws IOException {
        InputStream in = getContentResolver().openInputStream(uri);
        if (in == null) {
            throw new IOException("cannot open " + uri);
        }
        ByteArrayOutputStream bytes = new ByteArrayOutputStream();
        try {
            byte[] chunk = new byte[1 << 16];
            for (int n = in.read(chunk); n >= 0; n = in.read(chunk)) {
                bytes.write(chunk, 0, n);
            }
        } finally {
            in.close();
        }
        ByteBuffer buffer = ByteBuffer.allocateDirect(bytes.size()).order(ByteOrder.nativeOrder());
        buffer.put(bytes.toByteArray());
        buffer.rewind();
        return buffer;
    }

    // --- Camera --------------------------------------------------------------------------------------------

    private void showCamera() {
        cameraMode = true;
        picture.setVisibility(View.GONE);
        preview.setVisibility(View.VISIBLE);
        if (preview.isAvailable()) {
            startCamera();
        }
    }

    private void startCamera() {
        if (Build.VERSION.SDK_INT >= 23
                && checkSelfPermission(Manifest.permission.CAMERA) != PackageManager.PERMISSION_GRANTED) {
            requestPermissions(new String[] {Manifest.permission.CAMERA}, ASK_CAMERA);
            return;
        }
        camera.stop();
        try {
            Size size = camera.choose();
            if (size == null) {
                results.setText(R.string.no_camera);
                return;
            }
            // The portrait screen shows the landscape sensor image turned upright: keep its aspect ratio.
            ViewGroup.LayoutParams params = preview.getLayoutParams();
            params.height = preview.getWidth() * size.getWidth() / size.getHeight();
            preview.setLayoutParams(params);
            camera.start(preview.getSurfaceTexture(), size);
        } catch (CameraAccessException e) {
            results.setText(e.getMessage());
        }
    }

    @Override
    public void onRequestPermissionsResult(int requestCode, String[] permissions, int[] grantResults) {
        if (requestCode != ASK_CAMERA) {
            return;
        }
        if (grantResults.length > 0 && grantResults[0] == PackageManager.PERMISSION_GRANTED) {
            startCamera();
        } else {
            results.setText(R.string.no_camera);
        }
    }

    @Override
    public void onSurfaceTextureAvailable(SurfaceTexture surface, int width, int height) {
        if (cameraMode) {
            startCamera();
        }
    }

    @Override
    public void onSurfaceTextureSizeChanged(SurfaceTexture surface, int width, int height) {
    }

    @Override
    public boolean onSurfaceTextureDestroyed(SurfaceTexture surface) {
        camera.stop();
        return true;
    }

    /** A new preview frame: classify it unless the previous one is still running. */
    @Override
    public void onSurfaceTextureUpdated(SurfaceTexture surface) {
        if (cameraMode && !busy) {
            Bitmap frame = preview.getBitmap();
            if (frame != null) {
                classify(frame);
            }
        }
    }

    // --- Gallery -------------------------------------------------------------------------------------------

    private void pick(String type, int request) {
        Intent intent = new Intent(Intent.ACTION_GET_CONTENT);
        intent.setType(type);
        intent.addCategory(Intent.CATEGORY_OPENABLE);
        startActivityForResult(intent, request);
    }

    @Override
    protected void onActivityResult(int requestCode, int resultCode, Intent data) {
        if (resultCode != RESULT_OK || data == null || data.getData() == null) {
            return;
        }
        try {
            if (requestCode == PICK_MODEL) {
                model = readModel(data.getData());
                loadClassifier();
            } else if (requestCode == PICK_PICTURE) {
                Bitmap bitmap = decodePicture(data.getData());
                if (bitmap == null) {
                    results.setText("Not a picture this phone can decode");
                    return;
                }
                cameraMode = false;
                camera.stop();
                preview.setVisibility(View.GONE);
                picture.setVisibility(View.VISIBLE);
                picture.setImageBitmap(bitmap);
                classify(bitmap);
            }
        } catch (IOException e) {
            results.setText(e.getMessage());
        }
    }

    /**
     * The picture upright. Like serve's JPEG draft mode, large photos are decoded at 1/2, 1/4 or 1/8 scale,
     * never below the model's input size; the whole picture is then resized to the input, as serve does.
     */
    private Bitmap decodePicture(Uri uri) throws IOException {
        BitmapFactory.Options bounds = new BitmapFactory.Options();
        bounds.inJustDecodeBounds = true;
        decode(uri, bounds);
        BitmapFactory.Options options = new BitmapFactory.Options();
        options.inSampleSize = 1;
        LiteRtClassifier current = classifier;
        int side = current == null ? 224 : Math.max(current.bundle.width, current.bundle.height);
        while (options.inSampleSize < 8 && Math.min(bounds.outWidth, bounds.outHeight) / (options.inSampleSize * 2) >= side) {
            options.inSampleSize *= 2;
        }
        Bitmap bitmap = decode(uri, options);
        int degrees = orientation(uri);
        if (bitmap == null || degrees == 0) {
            return bitmap;
        }
        Matrix rotation = new Matrix();
        rotation.postRotate(degrees);
        return Bitmap.createBitmap(bitmap, 0, 0, bitmap.getWidth(), bitmap.getHeight(), rotation, true);
    }

    private Bitmap decode(Uri uri, BitmapFactory.Options options) throws IOException {
        InputStream in = getContentResolver().openInputStream(uri);
        if (in == null) {
            throw new IOException("cannot open " + uri);
        }
        try {
            return BitmapFactory.decodeStream(in, null, options);
        } finally {
            in.close();
        }
    }

    /** The gallery's record of the photo's EXIF rotation (ExifInterface on a stream needs API 24). */
    private int orientation(Uri uri) {
        Cursor cursor = null;
        try {
            cursor = getContentResolver().query(uri, new String[] {MediaStore.Images.ImageColumns.ORIENTATION},
                    null, null, null);
            return cursor != null && cursor.moveToFirst() ? cursor.getInt(0) : 0;
        } catch (RuntimeException e) {
            return 0; // a provider without that column: show the picture as stored
        } finally {
            if (cursor != null) {
                cursor.close();
            }
        }
    }

    // --- Classification ------------------------------------------------------------------------------------

    /** Hands the bitmap's pixels to the inference thread and shows the result when it comes back. */
    private void classify(Bitmap bitmap) {
        busy = true;
        final int width = bitmap.getWidth();
        final int height = bitmap.getHeight();
        final int[] argb = new int[width * height];
        bitmap.getPixels(argb, 0, width, 0, 0, width, height);
        inference.post(new Runnable() {
            @Override
            public void run() {
                String text;
                if (classifier == null) {
                    text = model == null ? getString(R.string.no_model) : "Loading the model…";
                } else {
                    text = describe(classifier, classifier.classify(argb, width, height, TOP_K));
                }
                showOnUi(text);
            }
        });
    }

    private static String describe(LiteRtClassifier classifier, LiteRtClassifier.Result result) {
        StringBuilder text = new StringBuilder();
        for (Prediction p : result.top) {
            text.append(String.format(Locale.ROOT, "%-14s %5.1f%%%n", p.label, 100 * p.score));
        }
        text.append(String.format(Locale.ROOT, "inference %.2f ms, preprocessing %.2f ms (%s, %s thread(s))",
                result.inferenceMs, result.preprocessMs, classifier.accelerator, classifier.threads));
        return text.toString();
    }

    private void showOnUi(final String text) {
        runOnUiThread(new Runnable() {
            @Override
            public void run() {
                results.setText(text);
                busy = false;
            }
        });
    }
}

package com.edgepipeline.demo;

import android.content.Context;
import android.graphics.SurfaceTexture;
import android.hardware.camera2.CameraAccessException;
import android.hardware.camera2.CameraCaptureSession;
import android.hardware.camera2.CameraCharacteristics;
import android.hardware.camera2.CameraDevice;
import android.hardware.camera2.CameraManager;
import android.hardware.camera2.CaptureRequest;
import android.hardware.camera2.params.StreamConfigurationMap;
import android.os.Handler;
import android.os.HandlerThread;
import android.util.Log;
import android.util.Size;
import android.view.Surface;

import java.util.Collections;

/**
 * The back camera's live preview into a SurfaceTexture, with Camera2 (part of the platform since API 21, so
 * no extra library). Frames are not read here: the activity copies the TextureView's bitmap when the
 * classifier is free, so the model sees the preview as it is shown, upright.
 */
final class CameraPreview {
    private static final String TAG = "CameraPreview";
    /** Larger previews cost more to copy per frame and the model's input is small anyway. */
    private static final int MAX_PREVIEW_PIXELS = 1280 * 960;

    private final CameraManager manager;
    private HandlerThread thread;
    private Handler handler;
    private CameraDevice camera;
    private CameraCaptureSession session;

    CameraPreview(Context context) {
        manager = (CameraManager) context.getSystemService(Context.CAMERA_SERVICE);
    }

    /** The preview size to use (in sensor orientation, so usually landscape), or null without a back camera. */
    Size choose() throws CameraAccessException {
        return backCamera() == null ? null : previewSize(backCamera());
    }

    /** Starts the preview into `texture`; the caller has checked the CAMERA permission. */
    void start(SurfaceTexture texture, Size size) throws CameraAccessException, SecurityException {
        final String id = backCamera();
        texture.setDefaultBufferSize(size.getWidth(), size.getHeight());
        final Surface surface = new Surface(texture);
        thread = new HandlerThread("camera");
        thread.start();
        handler = new Handler(thread.getLooper());
        manager.openCamera(id, new CameraDevice.StateCallback() {
            @Override
            public void onOpened(CameraDevice device) {
                camera = device;
                startSession(surface);
            }

            @Override
            public void onDisconnected(CameraDevice device) {
                device.close();
                camera = null;
            }

            @Override
            public void onError(CameraDevice device, int error) {
                Log.e(TAG, "camera error " + error);
                device.close();
                camera = null;
            }
        }, handler);
    }

    void stop() {
        if (session != null) {
            session.close();
            session = null;
        }
        if (camera != null) {
            camera.close();
            camera = null;
        }
        if (thread != null) {
            thread.quitSafely();
            thread = null;
        }
    }

    private void startSession(final Surface surface) {
        try {
            camera.createCaptureSession(Collections.singletonList(surface), new CameraCaptureSession.StateCallback() {
                @Override
                public void onConfigured(CameraCaptureSession configured) {
                    if (camera == null) {
                        return;
                    }
                    session = configured;
                    try {
                        CaptureRequest.Builder request = camera.createCaptureRequest(CameraDevice.TEMPLATE_PREVIEW);
                        request.addTarget(surface);
                        request.set(CaptureRequest.CONTROL_AF_MODE, CaptureRequest.CONTROL_AF_MODE_CONTINUOUS_PICTURE);
                        session.setRepeatingRequest(request.build(), null, handler);
                    } catch (CameraAccessException e) {
                        Log.e(TAG, "cannot start the preview", e);
                    }
                }

                @Override
                public void onConfigureFailed(CameraCaptureSession failed) {
                    Log.e(TAG, "cannot configure the preview session");
                }
            }, handler);
        } catch (CameraAccessException e) {
            Log.e(TAG, "cannot create the preview session", e);
        }
    }

    private String backCamera() throws CameraAccessException {
        for (String id : manager.getCameraIdList()) {
            Integer facing = manager.getCameraCharacteristics(id).get(CameraCharacteristics.LENS_FACING);
            if (facing != null && facing == CameraCharacteristics.LENS_FACING_BACK) {
                return id;
            }
        }
        return null;
    }

    /** The largest output size for a SurfaceTexture that stays within MAX_PREVIEW_PIXELS. */
    private Size previewSize(String id) throws CameraAccessException {
        StreamConfigurationMap map = manager.getCameraCharacteristics(id)
                .get(CameraCharacteristics.SCALER_STREAM_CONFIGURATION_MAP);
        Size best = null;
        for (Size size : map.getOutputSizes(SurfaceTexture.class)) {
            long pixels = (long) size.getWidth() * size.getHeight();
            if (pixels <= MAX_PREVIEW_PIXELS
                    && (best == null || pixels > (long) best.getWidth() * best.getHeight())) {
                best = size;
            }
        }
        return best != null ? best : map.getOutputSizes(SurfaceTexture.class)[0];
    }
}

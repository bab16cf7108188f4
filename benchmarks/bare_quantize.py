"""The baseline for `pipeline quantize`: what a user would write with TFLiteConverter alone. The trained Keras
model to float32 and to full-integer int8 (calibrated on 500 training images), both written out, and both
evaluated on the 10,000 Fashion-MNIST test images with ai-edge-litert.

usage: python bare_quantize.py MODEL.keras FASHION_MNIST_DIR OUT_DIR
"""

import gzip
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # the pipeline's models are tf_keras models
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

model_path, data_dir, out_dir = sys.argv[1:4]


def read_idx(name, offset):
    with gzip.open(os.path.join(data_dir, name)) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


train_x = read_idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)
test_x = read_idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)
test_y = read_idx("t10k-labels-idx1-ubyte.gz", 8)
calibration = train_x[np.random.default_rng(0).choice(len(train_x), 500, replace=False)]

model = keras.models.load_model(model_path, compile=False)
converter = tf.lite.TFLiteConverter.from_keras_model(model)
models = {"float32": converter.convert()}
converter.optimizations = [tf.lite.Optimize.DEFAULT]
converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in calibration)
converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
converter.inference_input_type = tf.uint8
models["int8"] = converter.convert()

os.makedirs(out_dir, exist_ok=True)
for name, flat in models.items():
    with open(os.path.join(out_dir, f"model_{name}.tflite"), "wb") as f:
        f.write(flat)
    interpreter = Interpreter(model_content=flat)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    predictions = []
    for start in range(0, len(test_x), 256):
        batch = test_x[start : start + 256]
        interpreter.resize_tensor_input(inp["index"], batch.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], batch.astype(inp["dtype"]))
        interpreter.invoke()
        predictions.append(interpreter.get_tensor(out["index"]).argmax(1))
    print(f"{name}: {len(flat) / 1024:.1f} KiB, test accuracy {np.mean(np.concatenate(predictions) == test_y):.4f}")

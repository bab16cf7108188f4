"""What a Keras user writes to train the small CNN on Fashion-MNIST: load the arrays, model.fit, model.evaluate.

The baseline `benchmarks/train_bench.py` times `pipeline train` against: the same model (small_cnn at width 1),
batch, optimizer, epochs and numbers of images (a seeded 90/10 split of `--per-class` images of each class).

    python benchmarks/bare_train.py [--epochs 3] [--per-class 1800] [--batch-size 128]
"""

import argparse
import gzip
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402


def load_idx(path: str, header: int) -> np.ndarray:
    """What keras.datasets.fashion_mnist.load_data() does with each downloaded file."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


def conv_bn_relu(filters: int) -> list:
    return [
        keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(momentum=0.9),
        keras.layers.ReLU(),
    ]


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--per-class", type=int, default=1800)
parser.add_argument("--batch-size", type=int, default=128)
args = parser.parse_args()
print(f"TensorFlow {tf.__version__}, tf_keras {keras.__version__}", flush=True)

y_train = load_idx(os.path.join(args.data, "train-labels-idx1-ubyte.gz"), 8)
x_train = load_idx(os.path.join(args.data, "train-images-idx3-ubyte.gz"), 16).reshape(-1, 28, 28, 1)
y_test = load_idx(os.path.join(args.data, "t10k-labels-idx1-ubyte.gz"), 8)
x_test = load_idx(os.path.join(args.data, "t10k-images-idx3-ubyte.gz"), 16).reshape(-1, 28, 28, 1)
rng = np.random.default_rng(42)
keep = np.concatenate([rng.permutation(np.flatnonzero(y_train == c))[: args.per_class] for c in range(10)])
keep = rng.permutation(keep)
n_val = len(keep) // 10
x_val, y_val = x_train[keep[:n_val]], y_train[keep[:n_val]]
x_train, y_train = x_train[keep[n_val:]], y_train[keep[n_val:]]
print(f"data: {len(x_train)} train / {len(x_val)} val / {len(x_test)} test images", flush=True)

keras.utils.set_random_seed(42)
model = keras.Sequential(
    [
        keras.Input((28, 28, 1)),
        keras.layers.Rescaling(1 / 255),
        *conv_bn_relu(16),
        *conv_bn_relu(16),
        keras.layers.MaxPooling2D(),
        *conv_bn_relu(32),
        *conv_bn_relu(32),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(10, activation="softmax"),
    ]
)
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, validation_data=(x_val, y_val), verbose=2)
loss, accuracy = model.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0)
print(f"test accuracy {accuracy:.4f} ({model.count_params():,} parameters)", flush=True)

"""The baseline for the pipeline's Horovod overhead: Horovod's Keras recipe, bare, on the same model and data.

    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/bare_horovod.py OUT.json --batch-size 64 --epochs 4

Rank 0 writes the wall time of model.fit (validation included, as in the pipeline) to OUT.json.
"""

import argparse
import json
import os
import time

import numpy as np

# As a user would: Keras 2 for Horovod (with Keras 3 its optimizer does not allreduce), and quiet C++ logs.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import horovod.tensorflow as hvd_tf
import horovod.tensorflow.keras as hvd
import tf_keras as keras

from train.data import cap_per_class, find_fashion_mnist, read_fashion_mnist
from train.models import build_model

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--batch-size", type=int, required=True)
parser.add_argument("--epochs", type=int, required=True)
parser.add_argument("--per-class", type=int, required=True)
args = parser.parse_args()

hvd.init()
images, labels = read_fashion_mnist(find_fashion_mnist(None), "train")
keep = cap_per_class(labels, args.per_class, 0)
x, y = images[keep][..., None].astype(np.float32), keras.utils.to_categorical(labels[keep], 10)
val_x, val_y = x[: len(x) // 10], y[: len(y) // 10]
x, y = x[len(x) // 10 :], y[len(y) // 10 :]
shard = slice(hvd.rank(), None, hvd.size())  # each worker its own part of the data

keras.utils.set_random_seed(0)
model = build_model("small_cnn", 28, 1, 10, 1.0, 0.3)
optimizer = hvd.DistributedOptimizer(keras.optimizers.Adam(0.001 * hvd.size()), compression=hvd.Compression.fp16)
model.compile(optimizer, keras.losses.CategoricalCrossentropy(), metrics=["accuracy"])
hvd_tf.broadcast_variables(model.variables, root_rank=0)
started = time.time()
model.fit(x[shard], y[shard], batch_size=args.batch_size, epochs=args.epochs, validation_data=(val_x, val_y), verbose=0)
seconds = time.time() - started
if hvd.rank() == 0:
    json.dump({"fit_seconds": seconds, "images": len(x) // hvd.size() * hvd.size() * args.epochs}, open(args.out, "w"))

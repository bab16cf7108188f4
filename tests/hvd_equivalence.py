"""A few steps of SGD through the pipeline's data sharding and distributed optimizer; rank 0 saves the weights.

    python tests/hvd_equivalence.py OUT.npz --batch-size 64 --compression none            # alone
    horovodrun -np 2 -H localhost:2 --gloo python tests/hvd_equivalence.py OUT.npz --batch-size 32 ...

From the same initial weights and the same global batch, both must land on the same weights. The model has no
BatchNorm or dropout: those see each worker's own batch by design, so they are not part of the equivalence.
Rank 0 saves the initial weights too (initial_N beside final_N), so a run that never stepped shows as one.
"""

import argparse

import numpy as np

from pipeline.tensorflow_env import prepare


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--compression", choices=["fp16", "none"], required=True)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    prepare()  # before TensorFlow loads: Horovod needs Keras 2
    import tf_keras as keras

    from train import distributed
    from train.batches import train_batches
    from train.data import Dataset

    distributed.init()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (512, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 512)
    data = Dataset([str(i) for i in range(10)], images, labels, images[:0], labels[:0], None, None, "", "random")
    config = {"batch_size": args.batch_size, "seed": 3, "augment": False, "epochs": 1}

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        distributed.distributed_optimizer(keras.optimizers.SGD(0.1), args.compression),
        keras.losses.CategoricalCrossentropy(),
    )
    distributed.broadcast_from_chief(model.variables)
    initial = model.get_weights()
    model.fit(train_batches(data, config, 0), steps_per_epoch=args.steps, epochs=1, verbose=0)
    checksums = distributed.all_checksums(model)
    if distributed.is_chief():
        weights = {f"initial_{i}": w for i, w in enumerate(initial)}
        weights.update({f"final_{i}": w for i, w in enumerate(model.get_weights())})
        np.savez(args.out, **weights, checksums=np.array(checksums))


if __name__ == "__main__":
    main()

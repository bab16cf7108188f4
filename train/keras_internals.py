"""The one place that reaches into private tf_keras API: the dropout layers' random generators, which an exact
resume has to checkpoint. Written against tf_keras 2.18; any other version is refused with a clear error,
rather than resuming with dropout streams that silently restart."""

from __future__ import annotations

import tf_keras as keras

from serve.errors import PipelineError

SUPPORTED = "2.18"  # tf_keras minor version whose internals this module was written and tested against


def dropout_generators(model: keras.Model) -> list:
    """The tf.random.Generator of each dropout layer of `model` (its `_random_generator._generator`).

    Keras keeps them out of checkpoints, yet a resumed run must continue their streams to draw the masks an
    uninterrupted run would. They exist once `keras.backend.experimental.enable_tf_random_generator()` ran
    before the model was built; layers without one are left out.
    """
    _check_version()
    generators = []
    for layer in model.layers:
        random = getattr(layer, "_random_generator", None)
        if random is None:
            if isinstance(layer, keras.layers.Dropout):
                raise _changed(f"dropout layer {layer.name!r} has no _random_generator")
            continue
        try:
            random._maybe_init()  # generators are made lazily, when the layer is built
            generator = random._generator
        except AttributeError as err:
            raise _changed(f"layer {layer.name!r}: {err}") from None
        if generator is not None:
            generators.append(generator)
    return generators


def _check_version() -> None:
    if not keras.__version__.startswith(f"{SUPPORTED}."):
        raise PipelineError(
            f"tf_keras {keras.__version__} is installed; train/keras_internals.py supports tf_keras {SUPPORTED}.x "
            "only (it reads the dropout layers' private random generators): pip install -e '.[train]'"
        )


def _changed(problem: str) -> PipelineError:
    return PipelineError(
        f"tf_keras {keras.__version__}: {problem}; train/keras_internals.py no longer matches tf_keras' internals"
    )

"""Training: data sources, models, the training loop and its run directory, Horovod when distributed, and the
pretrained EfficientNet-Lite0. Importing it sets nothing: entry points call pipeline.tensorflow_env.prepare()."""

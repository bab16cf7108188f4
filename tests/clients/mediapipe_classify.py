"""Run MediaPipe Tasks' ImageClassifier as an app would: `python mediapipe_classify.py TOP_K MODEL IMAGE [MODEL
IMAGE ...]` prints a JSON list, per pair, of {"label", "index", "score"}, best first. Runs in the clients' own
venv (.venv-clients/mediapipe: `make clients`), which has MediaPipe and its numpy, not this project."""

import json
import sys

import mediapipe as mp
from mediapipe.tasks.python import BaseOptions, vision


def classify(model: str, image: str, top_k: int) -> list[dict]:
    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=model), max_results=top_k)
    with vision.ImageClassifier.create_from_options(options) as classifier:
        result = classifier.classify(mp.Image.create_from_file(image))
    return [
        {"label": c.category_name, "index": c.index, "score": c.score} for c in result.classifications[0].categories
    ]


if __name__ == "__main__":
    top_k, pairs = int(sys.argv[1]), sys.argv[2:]
    print(json.dumps([classify(model, image, top_k) for model, image in zip(pairs[::2], pairs[1::2])]))

"""Run the TFLite Task Library (tflite-support) on bundles as an app would, in the clients' own venv
(.venv-clients/tflite-support: `make clients`).

`python task_library_classify.py classify TOP_K MODEL IMAGE [MODEL IMAGE ...]`: a JSON list, per pair, of
{"label", "index", "score"}, best first.
`python task_library_classify.py describe MODEL`: what tflite-support reads of the model's TFLite Metadata: the
metadata as JSON, the files packed in the model, and the oldest metadata parser that can read it.
"""

import json
import sys

from tensorflow_lite_support.metadata.cc.python import _pywrap_metadata_version
from tflite_support import metadata
from tflite_support.task import core, processor, vision


def classify(model: str, image: str, top_k: int) -> list[dict]:
    options = vision.ImageClassifierOptions(
        base_options=core.BaseOptions(file_name=model),
        classification_options=processor.ClassificationOptions(max_results=top_k),
    )
    result = vision.ImageClassifier.create_from_options(options).classify(vision.TensorImage.create_from_file(image))
    return [
        {"label": c.category_name, "index": c.index, "score": c.score} for c in result.classifications[0].categories
    ]


def describe(model: str) -> dict:
    displayer = metadata.MetadataDisplayer.with_model_file(model)
    return {
        "metadata": json.loads(displayer.get_metadata_json()),
        "packed_files": displayer.get_packed_associated_file_list(),
        "labels": displayer.get_associated_file_buffer("labels.txt").decode("utf-8").splitlines(),
        "needs_parser_version": _pywrap_metadata_version.GetMinimumMetadataParserVersion(
            bytes(displayer.get_metadata_buffer())
        ),
    }


if __name__ == "__main__":
    if sys.argv[1] == "describe":
        print(json.dumps(describe(sys.argv[2])))
    else:
        top_k, pairs = int(sys.argv[2]), sys.argv[3:]
        print(json.dumps([classify(model, image, top_k) for model, image in zip(pairs[::2], pairs[1::2])]))

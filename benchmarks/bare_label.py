"""The baseline for `pipeline label`: label_image in the fewest lines ai-edge-litert allows, one image at a time.

usage: python bare_label.py IMAGE MODEL LABELS [MORE_IMAGES ...]
"""

import sys

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

image_path, model_path, labels_path = sys.argv[1:4]
interpreter = Interpreter(model_path=model_path)
interpreter.allocate_tensors()
inp = interpreter.get_input_details()[0]
out = interpreter.get_output_details()[0]
_, height, width, channels = inp["shape"]
labels = open(labels_path).read().splitlines()
for path in [image_path, *sys.argv[4:]]:
    image = Image.open(path).convert("L" if channels == 1 else "RGB").resize((width, height))
    pixels = np.asarray(image, dtype=np.uint8).reshape(1, height, width, channels)
    interpreter.set_tensor(inp["index"], pixels if inp["dtype"] == np.uint8 else pixels.astype(np.float32))
    interpreter.invoke()
    scores = interpreter.get_tensor(out["index"])[0].astype(np.float32)
    scale, zero_point = out["quantization"]
    if scale:
        scores = (scores - zero_point) * scale
    if len(sys.argv) > 4:
        print(f"{path}:")
    for i in np.argsort(-scores)[:5]:
        print(f"{labels[i]} ({i}): {scores[i]:.6f}")

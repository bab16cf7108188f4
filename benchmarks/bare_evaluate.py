"""The baseline for `pipeline evaluate`: what a user would write instead, in one process, one image at a time:
Pillow, the ai-edge-litert interpreter and numpy for the metrics.

usage: python bare_evaluate.py FOLDER MODEL LABELS   (FOLDER: one sub-folder per class, named as `pipeline samples`
                                                      names its files: t_shirt_top for "T-shirt/top")
"""

import os
import sys

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

folder, model_path, labels_path = sys.argv[1:4]
labels = open(labels_path).read().splitlines()
slugs = [label.lower().replace("/", "_").replace(" ", "_").replace("-", "_") for label in labels]
interpreter = Interpreter(model_path=model_path)
interpreter.allocate_tensors()
inp = interpreter.get_input_details()[0]
out = interpreter.get_output_details()[0]
_, height, width, channels = inp["shape"]
scale, zero_point = out["quantization"]
truth, top5 = [], []
for name in sorted(os.listdir(folder)):
    if name not in slugs:
        continue
    for file in sorted(os.listdir(os.path.join(folder, name))):
        image = Image.open(os.path.join(folder, name, file)).convert("L" if channels == 1 else "RGB")
        pixels = np.asarray(image.resize((width, height)), dtype=np.uint8).reshape(1, height, width, channels)
        interpreter.set_tensor(inp["index"], pixels if inp["dtype"] == np.uint8 else pixels.astype(np.float32))
        interpreter.invoke()
        scores = interpreter.get_tensor(out["index"])[0].astype(np.float32)
        if scale:
            scores = (scores - zero_point) * scale
        truth.append(slugs.index(name))
        top5.append(np.argsort(-scores)[:5])
truth, top5 = np.array(truth), np.array(top5)
predicted = top5[:, 0]
matrix = np.zeros((len(labels), len(labels)), np.int64)
np.add.at(matrix, (truth, predicted), 1)
hits, support, predicted_count = np.diag(matrix), matrix.sum(1), matrix.sum(0)
precision = np.divide(hits, predicted_count, out=np.zeros(len(labels)), where=predicted_count > 0)
recall = np.divide(hits, support, out=np.zeros(len(labels)), where=support > 0)
f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(labels)), where=precision + recall > 0)
print(f"top-1 {np.mean(predicted == truth):.4f}  top-5 {np.mean(np.any(top5 == truth[:, None], axis=1)):.4f}")
for i, label in enumerate(labels):
    print(f"{label:<16} {precision[i]:.4f} {recall[i]:.4f} {f1[i]:.4f} {support[i]}")
print(f"macro F1 {f1.mean():.4f}  weighted F1 {f1 @ support / support.sum():.4f}")

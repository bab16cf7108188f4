// Runs an edge-pipeline bundle in the browser with LiteRT.js (WebAssembly on the CPU), preparing the input
// and reading the output exactly as serve/classifier.py does. `/?selftest=1` runs the server's tensors instead
// of a photo and writes the raw results as JSON into #result, for tests/test_web.py.
import { loadAndCompile, loadLiteRt, Tensor } from "@litertjs/core";

const WASM_DIR = "/node_modules/@litertjs/core/wasm/";
const $ = (id) => document.getElementById(id);

async function fetchJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

// Bundles take raw 0..255 pixels: unchanged as uint8 when the input quantisation is scale 1, zero point 0,
// as float32 values for float bundles. Normalisation is inside the model.
function toInput(pixels, bundle) {
  const { height, width, channels } = bundle.input;
  const shape = [1, height, width, channels];
  if (bundle.input_dtype === "float32") return new Tensor(Float32Array.from(pixels), shape);
  const { scale, zero_point: zeroPoint } = bundle.input_quantization;
  if (bundle.input_dtype === "uint8" && scale === 1 && zeroPoint === 0) return new Tensor(Uint8Array.from(pixels), shape);
  throw new Error(`unsupported input: ${bundle.input_dtype}, scale ${scale}, zero point ${zeroPoint}`);
}

// uint8 scores become (q - zero_point) * scale. Float32Array rounds each product to float32 as numpy does,
// so int8 results match serve bit for bit.
function dequantize(raw, bundle) {
  const { scale, zero_point: zeroPoint } = bundle.output_quantization;
  if (!(raw instanceof Uint8Array) || !scale) return Float32Array.from(raw);
  return Float32Array.from(raw, (q) => (q - zeroPoint) * scale);
}

async function classify(model, bundle, pixels) {
  const input = toInput(pixels, bundle);
  const started = performance.now();
  const outputs = await model.run(input);
  const ms = performance.now() - started;
  input.delete();
  const raw = outputs[0].toTypedArray().slice(); // a copy: delete() frees the tensor's WebAssembly memory
  outputs.forEach((tensor) => tensor.delete());
  return { raw, scores: dequantize(raw, bundle), ms };
}

// The whole photo resized to the model input, transparency on white, grey as Pillow's "L": as serve does it,
// though the browser's resampling differs a little from Pillow's.
async function photoPixels(file, { height, width, channels }) {
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  const canvas = $("preview");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.fillStyle = "white";
  context.fillRect(0, 0, width, height);
  context.imageSmoothingQuality = "high";
  context.drawImage(bitmap, 0, 0, width, height);
  bitmap.close();
  const rgba = context.getImageData(0, 0, width, height).data;
  const pixels = new Uint8Array(height * width * channels);
  for (let i = 0; i < height * width; i++) {
    const [r, g, b] = rgba.subarray(4 * i, 4 * i + 3);
    if (channels === 1) pixels[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
    else pixels.set([r, g, b], 3 * i);
  }
  return pixels;
}

function showTop5(scores, labels, ms) {
  const ranked = Array.from(scores, (score, index) => ({ score, index }));
  ranked.sort((a, b) => b.score - a.score); // stable: ties keep the lower index first, like serve's top_k
  $("top5").replaceChildren(
    ...ranked.slice(0, 5).map(({ score, index }) => {
      const item = document.createElement("li");
      item.textContent = `${labels[index]} (${index}): ${score.toFixed(4)}`;
      return item;
    }),
  );
  $("timing").textContent = `Inference: ${ms.toFixed(1)} ms`;
}

async function selftest(model, bundle) {
  const { inputs } = await fetchJson("/selftest.json");
  const results = [];
  for (const pixels of inputs) {
    const { raw, scores } = await classify(model, bundle, pixels);
    results.push({ raw: Array.from(raw), scores: Array.from(scores) });
  }
  $("result").textContent = JSON.stringify({ results });
  $("status").textContent = `Self-test: ${results.length} inputs run.`;
}

async function main() {
  const [bundle, labels] = await Promise.all([fetchJson("/bundle.json"), fetchJson("/labels.json")]);
  $("title").textContent = `Classify a photo: ${bundle.name} (${bundle.quantization})`;
  await loadLiteRt(WASM_DIR);
  const model = await loadAndCompile("/model.tflite", { accelerator: "wasm" });
  if (new URLSearchParams(location.search).has("selftest")) return selftest(model, bundle);
  $("status").textContent = "Ready: take or choose a photo.";
  for (const input of [$("camera"), $("file")]) {
    input.disabled = false;
    input.addEventListener("change", async () => {
      if (!input.files.length) return;
      try {
        const { scores, ms } = await classify(model, bundle, await photoPixels(input.files[0], bundle.input));
        showTop5(scores, labels, ms);
        $("status").textContent = input.files[0].name;
      } catch (err) {
        $("status").textContent = `Error: ${err.message}`;
      }
      input.value = ""; // choosing the same photo again fires "change" again
    });
  }
}

main().catch((err) => {
  $("status").textContent = `Error: ${err.message}`;
  $("result").textContent = JSON.stringify({ error: String(err) });
});

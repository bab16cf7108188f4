// Runs an edge-pipeline bundle in the browser with LiteRT.js (WebAssembly on the CPU), preparing the input
// and reading the output exactly as serve/classifier.py does. `/?selftest=1` runs the server's tensors instead
// of a photo and writes the raw results and what the page read of the bundle as JSON into #result, for
// tests/test_web.py.
import { loadAndCompile, loadLiteRt, Tensor } from "@litertjs/core";

const WASM_DIR = "/node_modules/@litertjs/core/wasm/";
const $ = (id) => document.getElementById(id);

async function fetchJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

// What the page uses of the bundle's metadata: /bundle.json is serve's BundleMetadata as JSON (less its
// provenance), /labels.json its labels.
function bundleInfo(metadata, labels) {
  const { height, width, channels } = metadata.input;
  return {
    name: metadata.name,
    quantization: metadata.quantization,
    labels,
    height,
    width,
    channels,
    inputDtype: metadata.input_dtype,
    inputScale: metadata.input_quantization.scale,
    inputZeroPoint: metadata.input_quantization.zero_point,
    outputScale: metadata.output_quantization.scale,
    outputZeroPoint: metadata.output_quantization.zero_point,
  };
}

// Bundles take raw 0..255 pixels: unchanged as uint8 when the input quantisation is scale 1, zero point 0,
// as float32 values for float bundles. Normalisation is inside the model.
function toInput(pixels, bundle) {
  const { inputDtype, inputScale: scale, inputZeroPoint: zeroPoint } = bundle;
  const shape = [1, bundle.height, bundle.width, bundle.channels];
  if (inputDtype === "float32") return new Tensor(Float32Array.from(pixels), shape);
  if (inputDtype === "uint8" && scale === 1 && zeroPoint === 0) return new Tensor(Uint8Array.from(pixels), shape);
  throw new Error(`unsupported input: ${inputDtype}, scale ${scale}, zero point ${zeroPoint}`);
}

// uint8 scores become (q - zero_point) * scale. Float32Array rounds each product to float32 as numpy does,
// so int8 results match serve bit for bit.
function dequantize(raw, bundle) {
  const { outputScale: scale, outputZeroPoint: zeroPoint } = bundle;
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

function showTop5(scores, { labels }, ms) {
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
  $("result").textContent = JSON.stringify({ bundle, results });
  $("status").textContent = `Self-test: ${results.length} inputs run.`;
}

async function main() {
  const [metadata, labels] = await Promise.all([fetchJson("/bundle.json"), fetchJson("/labels.json")]);
  const bundle = bundleInfo(metadata, labels);
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
        const { scores, ms } = await classify(model, bundle, await photoPixels(input.files[0], bundle));
        showTop5(scores, bundle, ms);
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

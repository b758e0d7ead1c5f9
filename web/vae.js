// The model side of the explorer: onnxruntime-web sessions for decoder.onnx (and encoder.onnx), one call at a time,
// plus the small maths the page shares with sample.py (N(0, I) draws, great-circle interpolation).
// Only the wasm backend with one thread: a static page is not cross-origin isolated, so no SharedArrayBuffer.
import * as ort from "./ort/ort.wasm.bundle.min.mjs";

ort.env.wasm.numThreads = 1;
ort.env.wasm.proxy = false;
ort.env.logLevel = "error";

const MAX_BATCH = 4096;  // images per call: bounds what one call may allocate in the page

let queue = Promise.resolve();
function exclusive(job) {  // a session runs one call at a time; calls wait their turn
  const result = queue.then(job);
  queue = result.catch(() => {});
  return result;
}

// A flat Array or typed array of n * width finite numbers within [low, high], as float32; anything else (a string, an
// array-like object, strings or holes inside, a BigInt array) is refused with the reason.
function floats(values, width, what, low = -Infinity, high = Infinity) {
  const typed = ArrayBuffer.isView(values) && !(values instanceof DataView) &&
    !(values instanceof BigInt64Array) && !(values instanceof BigUint64Array);
  if (!typed && !Array.isArray(values)) {
    throw new TypeError(`${what} must be an Array or a typed array (such as Float32Array) of numbers`);
  }
  if (values.length === 0 || values.length % width !== 0) {
    throw new RangeError(`${what} must be a flat array of n * ${width} numbers`);
  }
  const n = values.length / width;
  if (n > MAX_BATCH) throw new RangeError(`${what}: at most ${MAX_BATCH} at a time (got ${n})`);
  if (!typed && !values.every((v) => typeof v === "number")) throw new TypeError(`${what} must hold numbers only`);
  const out = Float32Array.from(values);
  if (!out.every((v) => Number.isFinite(v) && v >= low && v <= high)) {
    throw new RangeError(`${what} must hold finite numbers only` + (low > -Infinity ? `, from ${low} to ${high}` : ""));
  }
  return [out, n];
}

function finite(data, what) {  // far-out latents can overflow inside the model: NaN pixels are refused, not drawn
  const out = new Float32Array(data);
  if (!out.every(Number.isFinite)) throw new RangeError(`the ${what} returned values that are not finite numbers`);
  return out;
}

export async function loadModel(base = ".") {
  const meta = await (await fetch(`${base}/model.json`)).json();
  const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
  const [decoder, encoder] = await Promise.all([
    ort.InferenceSession.create(`${base}/${meta.decoder}`, options),
    meta.encoder ? ort.InferenceSession.create(`${base}/${meta.encoder}`, options) : null,
  ]);
  const d = meta.latent_dim;
  const pixelsPerImage = meta.image_shape.reduce((a, b) => a * b, 1);

  // z: n * d numbers -> n * pixels in [0, 1], row-major (n, 1, H, W)
  async function decode(z) {
    const [data, n] = floats(z, d, "z");
    return exclusive(async () => {
      const { images } = await decoder.run({ z: new ort.Tensor("float32", data, [n, d]) });
      return finite(images.data, "decoder");
    });
  }

  // pixels: n * H * W numbers in [0, 1] (0 black) -> {mu, logvar}, each n * d; the encoder takes [-1, 1]
  async function encode(pixels) {
    const [data, n] = floats(pixels, pixelsPerImage, "pixels", 0, 1);
    for (let i = 0; i < data.length; i++) data[i] = data[i] * 2 - 1;
    return exclusive(async () => {
      const out = await encoder.run({ images: new ort.Tensor("float32", data, [n, ...meta.image_shape]) });
      return { mu: finite(out.mu.data, "encoder"), logvar: finite(out.logvar.data, "encoder") };
    });
  }

  return { meta, decode, encode: encoder ? encode : null, pixelsPerImage };
}

export function randn(n, temperature = 1) {  // Box-Muller from crypto-quality uniforms
  const u = new Uint32Array(2 * n);
  for (let i = 0; i < u.length; i += 16384)  // getRandomValues fills at most 65,536 bytes a call
    crypto.getRandomValues(u.subarray(i, i + 16384));
  const z = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const a = (u[2 * i] + 1) / 4294967297, b = u[2 * i + 1] / 4294967296;
    z[i] = Math.sqrt(-2 * Math.log(a)) * Math.cos(2 * Math.PI * b) * temperature;
  }
  return z;
}

// Great-circle interpolation, as sample.py: the straight line between two draws of N(0, I) passes through the
// low-norm middle that the decoder rarely saw (White 2016).
export function slerp(a, b, t) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  const omega = Math.acos(Math.min(1, Math.max(-1, dot / Math.max(Math.sqrt(na * nb), 1e-12))));
  const s = Math.sin(omega);
  const [wa, wb] = s > 1e-6 ? [Math.sin((1 - t) * omega) / s, Math.sin(t * omega) / s] : [1 - t, t];
  return Float32Array.from(a, (v, i) => wa * v + wb * b[i]);
}

// The explorer page: sliders over z, samples, interpolation, a drawing pad and a scatter of test images, drawn with
// plain canvases. window.betaVAE is the scripting interface (see docs/explorer.md); the tests drive the page with it.
import { loadModel, randn, slerp } from "./vae.js";

const $ = (id) => document.getElementById(id);
const COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
  "#5f6b75"];  // Tableau 10: distinct for the ten classes
const GRID = 8, FRAMES = 11, PAD = 2;

const timings = { firstImageMs: null, updates: [] };

function latest(job) {  // run job now, or once more after the running one: never a queue of stale work
  let running = null, again = false;
  return () => {
    if (running) { again = true; return running; }
    running = (async () => {
      do { again = false; await job(); } while (again);
      running = null;
    })();
    return running;
  };
}
const api = { timings };
window.betaVAE = api;

// A file dropped anywhere on the page goes to the drawing pad (with an encoder) or nowhere: never does the browser
// leave the page to show it, as it does with a drop that no handler takes.
let dropTarget = null;
window.addEventListener("dragover", (e) => {
  e.preventDefault();
  e.dataTransfer.dropEffect = dropTarget ? "copy" : "none";
});
window.addEventListener("drop", (e) => {
  e.preventDefault();
  if (dropTarget && e.dataTransfer.files[0]) dropTarget(e.dataTransfer.files[0]);
});

function problem(text) {  // the page's one line about what went wrong, or none
  $("problem").hidden = !text;
  $("problem").textContent = text || "";
}
api.ready = start().then(() => api, (err) => {
  problem(`The explorer could not start: ${err.message || err}`);
  console.error(err);
  throw err;
});

async function start() {
  const model = await loadModel();
  const { meta } = model, d = meta.latent_dim, [, H, W] = meta.image_shape;
  const z = new Float32Array(d);
  const sliders = new Map();
  let lastImage = null, pending = null, busy = null, scatter = null;
  for (const [id, cols, rows] of [["image", 1, 1], ["samples", GRID, GRID], ["strip", FRAMES, 1],
    ["hover-original", 1, 1], ["hover-decoded", 1, 1], ["reconstruction", 1, 1]]) {
    const pad = cols > 1 ? PAD : 0;  // canvases sized from the model's image shape
    Object.assign($(id), { width: pad + cols * (W + pad), height: pad + rows * (H + pad) });
  }

  // ------------------------------------------------------------------------------------------------ drawing

  function paint(canvas, pixels, count, cols, pad = 0) {  // images in [0, 1] as gray tiles, row-major
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(canvas.width, canvas.height);
    for (let k = 0; k < count; k++) {
      const x0 = pad + (k % cols) * (W + pad), y0 = pad + Math.floor(k / cols) * (H + pad);
      for (let y = 0; y < H; y++) {
        for (let x = 0; x < W; x++) {
          const v = Math.round(pixels[k * H * W + y * W + x] * 255), o = 4 * ((y0 + y) * canvas.width + x0 + x);
          img.data[o] = img.data[o + 1] = img.data[o + 2] = v;
          img.data[o + 3] = 255;
        }
      }
    }
    ctx.putImageData(img, 0, 0);
  }

  function render(since) {  // the latest request wins: a slider moving faster than decoding skips stale frames
    pending = since;
    if (!busy) busy = pump();
    return busy;
  }

  async function pump() {
    while (pending !== null) {
      const since = pending;
      pending = null;
      const image = await model.decode(z);
      paint($("image"), image, 1, 1);
      lastImage = image;
      const now = performance.now();
      if (timings.firstImageMs === null) timings.firstImageMs = now;
      else if (since !== undefined && timings.updates.push(now - since) > 1000) timings.updates.shift();
      scatter?.draw();
    }
    busy = null;
  }

  function setLatent(values) {
    if (values.length !== d || !Array.from(values).every(Number.isFinite)) {
      return Promise.reject(new RangeError(`setLatent takes ${d} finite numbers`));
    }
    z.set(values);
    for (const [dim, s] of sliders) {
      s.input.value = z[dim];
      s.output.textContent = z[dim].toFixed(2);
    }
    return render(undefined);
  }

  // ------------------------------------------------------------------------------------------------ sliders

  const maxKL = Math.max(1e-9, ...meta.dims.map((x) => x.kl ?? 0));
  for (const { index, kl, unused } of meta.dims) {
    const row = document.createElement("div");
    row.className = "slider" + (unused ? " off" : "");
    const label = document.createElement("label");
    label.htmlFor = `z${index}`;
    label.innerHTML = `<b>z${index}</b> <span>${kl === null ? "" : `${kl.toFixed(2)} nats`}</span>`;
    if (kl !== null) {
      const bar = document.createElement("i");
      bar.style.width = `${Math.max(1, (60 * kl) / maxKL)}px`;
      label.append(bar);
    }
    const input = Object.assign(document.createElement("input"),
      { type: "range", min: -3, max: 3, step: 0.01, value: 0, id: `z${index}` });
    input.dataset.dim = index;
    const output = Object.assign(document.createElement("output"), { textContent: "0.00" });
    input.addEventListener("input", (e) => {
      z[index] = input.valueAsNumber;
      output.textContent = z[index].toFixed(2);
      render(e.timeStamp);
    });
    row.append(label, input, output);
    (unused ? $("unused-sliders") : $("sliders")).append(row);
    sliders.set(index, { input, output });
  }
  const off = meta.dims.filter((x) => x.unused).length;
  if (off) {
    $("unused").hidden = false;
    $("unused").querySelector("summary").textContent =
      `${off} dimension${off > 1 ? "s" : ""} the model does not use (KL ≤ ${meta.unused_kl} nats)`;
  }
  const m = meta.model, used = d - off;
  $("summary").textContent = `β = ${m.beta ?? "?"} (${m.objective ?? "beta"}), ${d} latent dimensions, ` +
    (meta.kl_known ? `${used} in use, ${meta.dims.reduce((a, x) => a + x.kl, 0).toFixed(1)} nats of KL in all` :
      "no per-dimension KL in this decoder (export it again to rank the sliders)") + `, epoch ${m.epochs ?? "?"}`;
  $("footer").textContent = `onnxruntime-web ${meta.onnxruntime_web} (wasm, 1 thread) · ` +
    `checkpoint ${(m.checkpoint_sha256 || "").slice(0, 12)} · scripting: window.betaVAE`;

  // ------------------------------------------------------------------------------------------------ samples

  const temperature = () => $("temperature").valueAsNumber;
  let noise = randn(GRID * GRID * d);
  const drawSamples = latest(async () => {
    paint($("samples"), await model.decode(noise.map((v) => v * temperature())), GRID * GRID, GRID, PAD);
  });
  $("resample").onclick = () => { noise = randn(GRID * GRID * d); drawSamples(); };
  $("random").onclick = () => setLatent(randn(d, temperature()));
  $("zero").onclick = () => setLatent(new Float32Array(d));
  $("temperature").oninput = () => {
    $("temperature-value").textContent = temperature().toFixed(2);
    drawSamples();
  };
  $("samples").onclick = (e) => {
    const [col, row] = cell(e, $("samples"), GRID);
    const k = row * GRID + col;
    if (row < GRID) setLatent(noise.slice(k * d, (k + 1) * d).map((v) => v * temperature()));
  };

  function cell(e, canvas, cols) {  // which tile of a grid canvas the pointer is on
    const r = canvas.getBoundingClientRect();
    const x = ((e.clientX - r.left) / r.width) * canvas.width, y = ((e.clientY - r.top) / r.height) * canvas.height;
    return [Math.min(cols - 1, Math.floor(x / (W + PAD))), Math.floor(y / (H + PAD))];
  }

  // ------------------------------------------------------------------------------------------ interpolation

  let a = randn(d), b = randn(d), frames = [];
  const drawStrip = latest(async () => {
    frames = Array.from({ length: FRAMES }, (_, i) => slerp(a, b, i / (FRAMES - 1)));
    const flat = new Float32Array(FRAMES * d);
    frames.forEach((f, i) => flat.set(f, i * d));
    paint($("strip"), await model.decode(flat), FRAMES, FRAMES, PAD);
  });
  $("set-a").onclick = () => { a = Float32Array.from(z); drawStrip(); };
  $("set-b").onclick = () => { b = Float32Array.from(z); drawStrip(); };
  $("random-b").onclick = () => { b = randn(d); drawStrip(); };
  $("strip").onclick = (e) => setLatent(frames[cell(e, $("strip"), FRAMES)[0]]);

  // ------------------------------------------------------------------------------------- encoder and scatter

  const pad = model.encode ? setupPad(model, setLatent, H, W) : null;
  scatter = meta.points ? await setupScatter(model, meta, z, setLatent, paint) : null;

  Object.assign(api, {
    latentDim: d, imageShape: meta.image_shape, dims: meta.dims, decode: model.decode, setLatent,
    getLatent: () => Float32Array.from(z),
    idle: () => busy || Promise.resolve(),
    points: scatter ? scatter.count : 0, scatter,
  });
  Object.defineProperty(api, "lastImage", { get: () => lastImage && Float32Array.from(lastImage) });
  if (model.encode) Object.assign(api, { encode: model.encode, padPixels: pad.pixels, padIdle: pad.idle });
  await Promise.all([render(undefined), drawSamples(), drawStrip()]);
}

function setupPad(model, setLatent, H, W) {
  const canvas = $("pad"), ctx = canvas.getContext("2d");
  const small = Object.assign(document.createElement("canvas"), { width: W, height: H });
  const sctx = small.getContext("2d", { willReadFrequently: true });
  let drawing = false, last = null;
  const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height); };
  clear();

  function pixels() {  // the pad shrunk to the model's image size, gray values in [0, 1]
    sctx.imageSmoothingEnabled = true;
    sctx.imageSmoothingQuality = "high";
    sctx.drawImage(canvas, 0, 0, W, H);
    const data = sctx.getImageData(0, 0, W, H).data;
    return Float32Array.from({ length: W * H }, (_, i) => data[4 * i] / 255);
  }

  async function encodeNow() {
    const { mu } = await model.encode(pixels());
    await setLatent(mu);
    const recon = $("reconstruction").getContext("2d"), main = $("image");
    recon.drawImage(main, 0, 0);
  }

  const encodeLatest = latest(encodeNow);  // while drawing, encode the latest strokes, not every one
  let busy = Promise.resolve();
  const schedule = () => { busy = encodeLatest(); };

  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [((e.clientX - r.left) / r.width) * canvas.width, ((e.clientY - r.top) / r.height) * canvas.height];
  };
  canvas.addEventListener("pointerdown", (e) => {
    unreadable(null);  // drawing instead
    drawing = true;
    last = at(e);
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointerup", () => { drawing = false; schedule(); });
  canvas.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const p = at(e);
    Object.assign(ctx, { strokeStyle: "#fff", lineWidth: canvas.width / 12, lineCap: "round", lineJoin: "round" });
    ctx.beginPath();
    ctx.moveTo(...last);
    ctx.lineTo(...p);
    ctx.stroke();
    last = p;
    schedule();
  });
  $("clear").onclick = () => { clear(); schedule(); };

  let told = false;
  function unreadable(file) {  // say that a file is no picture, or take back only that (never the page's other lines)
    if (file || told) problem(file && `${file.name} is not an image the browser can read: choose a PNG or JPEG`);
    told = !!file;
  }

  async function useFile(file) {  // fit the picture on a black square; a light background is inverted to black
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch {  // a text file, a PDF, a broken or unsupported picture: say so instead of an uncaught error
      unreadable(file);
      return;
    }
    unreadable(null);
    const s = Math.min(W / bitmap.width, H / bitmap.height), w = bitmap.width * s, h = bitmap.height * s;
    sctx.fillStyle = "#fff";
    sctx.fillRect(0, 0, W, H);
    sctx.drawImage(bitmap, (W - w) / 2, (H - h) / 2, w, h);
    const img = sctx.getImageData(0, 0, W, H), px = img.data;
    let border = 0, count = 0;
    for (let i = 0; i < W * H; i++) {
      const g = 0.299 * px[4 * i] + 0.587 * px[4 * i + 1] + 0.114 * px[4 * i + 2];
      px[4 * i] = px[4 * i + 1] = px[4 * i + 2] = g;
      const x = i % W, y = Math.floor(i / W);
      if (x < 2 || y < 2 || x >= W - 2 || y >= H - 2) { border += g; count++; }
    }
    if (border / count > 127) {
      for (let i = 0; i < W * H; i++) px[4 * i] = px[4 * i + 1] = px[4 * i + 2] = 255 - px[4 * i];
    }
    sctx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
    schedule();
  }
  $("file").onchange = (e) => {
    if (e.target.files[0]) useFile(e.target.files[0]);
    e.target.value = "";  // choosing the same file again is a change too
  };
  dropTarget = useFile;  // a drop on the pad, or anywhere else on the page
  $("encoder-card").hidden = false;
  return { pixels, idle: () => busy };
}

async function setupScatter(model, meta, z, setLatent, paint) {
  const { count, classes, axes } = meta.points, d = meta.latent_dim;
  const buf = await (await fetch(meta.points.file)).arrayBuffer();
  const mu = new Float32Array(buf, 0, count * d), labels = new Uint8Array(buf, count * d * 4, count);
  const images = new Uint8Array(buf, count * d * 4 + count, count * 28 * 28);
  const canvas = $("scatter"), ctx = canvas.getContext("2d"), size = canvas.width, margin = 28;
  const hidden = new Set();
  let [ax, ay] = axes, hover = -1, scale = 1;

  for (const [select, value] of [[$("axis-x"), ax], [$("axis-y"), ay]]) {
    for (const { index, kl } of meta.dims) {
      select.append(new Option(`z${index}` + (kl === null ? "" : `  (${kl.toFixed(2)} nats)`), index));
    }
    select.value = value;
    select.onchange = () => { [ax, ay] = [+$("axis-x").value, +$("axis-y").value]; fit(); draw(); };
  }
  const legend = $("legend");
  classes.forEach((name, c) => {
    const li = document.createElement("li");
    li.innerHTML = `<i style="background:${COLORS[c]}"></i>${name}`;
    li.title = "click to hide or show";
    li.onclick = () => {
      hidden.has(c) ? hidden.delete(c) : hidden.add(c);
      li.classList.toggle("hidden");
      if (hover >= 0 && hidden.has(labels[hover])) unshow();  // no marker or panel on a point that is not drawn
      draw();
    };
    legend.append(li);
  });

  function fit() {  // symmetric about 0, wide enough for every point on the two axes
    let m = 1;
    for (let i = 0; i < count; i++) m = Math.max(m, Math.abs(mu[i * d + ax]), Math.abs(mu[i * d + ay]));
    scale = (size / 2 - margin) / (m * 1.05);
  }
  const px = (i) => [size / 2 + mu[i * d + ax] * scale, size / 2 - mu[i * d + ay] * scale];

  function draw() {
    ctx.clearRect(0, 0, size, size);
    ctx.strokeStyle = "#ccd";
    ctx.beginPath();
    ctx.moveTo(margin / 2, size / 2); ctx.lineTo(size - margin / 2, size / 2);
    ctx.moveTo(size / 2, margin / 2); ctx.lineTo(size / 2, size - margin / 2);
    ctx.stroke();
    ctx.fillStyle = "#667";
    ctx.font = "12px system-ui, sans-serif";
    ctx.fillText(`z${ax} →`, size - margin * 2, size / 2 - 6);
    ctx.fillText(`↑ z${ay}`, size / 2 + 6, margin / 2 + 4);
    ctx.globalAlpha = 0.7;
    for (let i = 0; i < count; i++) {
      if (hidden.has(labels[i])) continue;
      const [x, y] = px(i);
      ctx.fillStyle = COLORS[labels[i]];
      ctx.fillRect(x - 2, y - 2, 4, 4);
    }
    ctx.globalAlpha = 1;
    if (hover >= 0) {
      const [x, y] = px(hover);
      ctx.strokeStyle = "#000";
      ctx.strokeRect(x - 5, y - 5, 10, 10);
    }
    const cx = size / 2 + z[ax] * scale, cy = size / 2 - z[ay] * scale;  // where the sliders are
    ctx.strokeStyle = "#d00";
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(cx - 7, cy); ctx.lineTo(cx + 7, cy); ctx.moveTo(cx, cy - 7); ctx.lineTo(cx, cy + 7);
    ctx.stroke();
    ctx.lineWidth = 1;
  }

  function nearest(e) {
    const r = canvas.getBoundingClientRect();
    const x = ((e.clientX - r.left) / r.width) * size, y = ((e.clientY - r.top) / r.height) * size;
    let best = -1, bestD = 100;  // within 10 px
    for (let i = 0; i < count; i++) {
      if (hidden.has(labels[i])) continue;
      const [px_, py] = px(i), dist = (px_ - x) ** 2 + (py - y) ** 2;
      if (dist < bestD) { best = i; bestD = dist; }
    }
    return best;
  }

  let showing = Promise.resolve();
  function show(i) {  // the test image under the pointer, and its posterior mean decoded
    hover = i;
    canvas.dataset.hover = i;
    draw();
    paint($("hover-original"), Float32Array.from(images.subarray(i * 784, (i + 1) * 784), (v) => v / 255), 1, 1);
    $("hover-label").textContent = `${classes[labels[i]]}, test image ${i}`;
    showing = model.decode(mu.subarray(i * d, (i + 1) * d))
      .then((image) => { if (hover === i) paint($("hover-decoded"), image, 1, 1); });
    return showing;
  }
  function unshow() {  // no point marked, an empty panel
    hover = -1;
    delete canvas.dataset.hover;
    for (const c of [$("hover-original"), $("hover-decoded")]) c.getContext("2d").clearRect(0, 0, c.width, c.height);
    $("hover-label").textContent = "";
  }

  function step(key) {  // the nearest shown point in the arrow's direction (within 45° of it), or none
    const [ux, uy] = { ArrowRight: [1, 0], ArrowLeft: [-1, 0], ArrowDown: [0, 1], ArrowUp: [0, -1] }[key];
    const [x0, y0] = px(hover);
    let best = -1, bestD = Infinity;
    for (let i = 0; i < count; i++) {
      if (i === hover || hidden.has(labels[i])) continue;
      const [x, y] = px(i), along = (x - x0) * ux + (y - y0) * uy, across = (x - x0) * uy - (y - y0) * ux;
      const dist = along ** 2 + across ** 2;
      if (along > 0 && Math.abs(across) <= along && dist < bestD) { best = i; bestD = dist; }
    }
    return best;
  }

  function nearestToSliders() {  // the shown point nearest the red cross
    const cx = size / 2 + z[ax] * scale, cy = size / 2 - z[ay] * scale;
    let best = -1, bestD = Infinity;
    for (let i = 0; i < count; i++) {
      if (hidden.has(labels[i])) continue;
      const [x, y] = px(i), dist = (x - cx) ** 2 + (y - cy) ** 2;
      if (dist < bestD) { best = i; bestD = dist; }
    }
    return best;
  }

  const load = (i) => setLatent(mu.subarray(i * d, (i + 1) * d));
  canvas.addEventListener("pointermove", (e) => { const i = nearest(e); if (i >= 0 && i !== hover) show(i); });
  canvas.addEventListener("click", (e) => {
    const i = nearest(e);
    if (i >= 0) load(i);
  });
  canvas.addEventListener("keydown", (e) => {  // arrows step from point to point (the first press picks the one
    // nearest the sliders' cross), Enter or space loads it; Alt+Left and the like stay the browser's
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    if (e.key.startsWith("Arrow")) {
      const i = hover < 0 ? nearestToSliders() : step(e.key);
      if (i >= 0) show(i);
    } else if ((e.key === "Enter" || e.key === " ") && hover >= 0) {
      load(hover);
    } else {
      return;
    }
    e.preventDefault();  // the page does not scroll
  });
  canvas.dataset.points = count;
  $("scatter-card").hidden = false;
  fit();
  draw();
  return { count, draw, show, settled: () => showing, position: (i) => px(i).map((v) => v / size) };
}

// Web page of the gateway: a form, a progress bar fed by server-sent events, a result grid.
// EventSource cannot POST, so the stream is read with fetch() and parsed here (readSSE).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "ldm-api-key";
// Used until the server's limits (GET /v1/config) arrive.
const FALLBACK = {
  sizes: [256], max_steps: 100, min_guidance_scale: 0, max_guidance_scale: 20,
  max_images: 4, samplers: ["ddim", "plms", "dpmpp_2m", "ddpm"], default_steps: 10,
  default_guidance_scale: 5, default_sampler: "ddim",
};

const state = {
  key: localStorage.getItem(KEY_STORE) || "",
  controller: null,
  configLoaded: false,
  needKey: false, // /v1/config said 401: wait for a key before asking again
};

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body.error && body.error.message) return body.error.message;
    if (body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) { /* not JSON */ }
  return `${res.status} ${res.statusText}`;
}

// --- limits -> form controls ------------------------------------------------------------

function option(value, label, selected) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  o.selected = selected;
  return o;
}

function applyLimits(limits) {
  const keep = (el) => el.value;
  const sampler = keep($("sampler")) || limits.default_sampler;
  $("sampler").replaceChildren(...limits.samplers.map(
    (s) => option(s, s, s === (limits.samplers.includes(sampler) ? sampler : limits.default_sampler))));

  const n = Number(keep($("n")) || 1);
  const counts = Array.from({ length: limits.max_images }, (_, i) => i + 1);
  $("n").replaceChildren(...counts.map((i) => option(i, String(i), i === Math.min(n, limits.max_images))));

  const def = limits.sizes[0];
  const sizes = [];
  for (const h of limits.sizes) for (const w of limits.sizes) sizes.push([w, h]);
  sizes.sort((a, b) => (a[0] !== a[1]) - (b[0] !== b[1]) || a[0] * a[1] - b[0] * b[1]);
  $("size").replaceChildren(...sizes.map(([w, h]) => option(`${w}x${h}`, `${w} × ${h}`, w === def && h === def)));

  const steps = $("steps");
  steps.max = limits.max_steps;
  if (!state.configLoaded) steps.value = limits.default_steps;
  const g = $("guidance");
  g.min = limits.min_guidance_scale;
  g.max = limits.max_guidance_scale;
  if (!state.configLoaded) g.value = limits.default_guidance_scale;
  showValues();
}

function showValues() {
  $("steps-value").textContent = $("steps").value;
  $("guidance-value").textContent = Number($("guidance").value).toFixed(1);
}

// The served models (GET /v1/models) fill the picker; the first is the server's default.
async function loadModels() {
  const res = await fetch("/v1/models", { headers: headers() });
  if (!res.ok) return res;
  const ids = (await res.json()).data.map((m) => m.id);
  const keep = $("model").value;
  $("model").replaceChildren(...ids.map((id, i) => option(id, id, keep ? id === keep : i === 0)));
  return res;
}

async function loadConfig() {
  try {
    const listed = await loadModels();
    if (listed.status === 401) {
      state.needKey = true;
      openKeyDialog(await errorMessage(listed));
      return;
    }
    const model = $("model").value;
    const query = model ? `?model=${encodeURIComponent(model)}` : "";
    const res = await fetch(`/v1/config${query}`, { headers: headers() });
    if (!res.ok) return;
    applyLimits((await res.json()).limits);
    state.configLoaded = true;
  } catch (_) { /* the status pill tells */ }
}

// --- server status ----------------------------------------------------------------------

async function pollStatus() {
  let ready = false;
  let detail = "gateway unreachable";
  try {
    const res = await fetch("/readyz");
    const body = await res.json();
    ready = res.ok;
    detail = body.detail || body.status;
  } catch (_) { /* keep defaults */ }
  const el = $("status");
  el.classList.toggle("ok", ready);
  el.classList.toggle("bad", !ready);
  $("status-text").textContent = ready ? "ready" : "unavailable";
  el.title = detail;
  if (ready && !state.configLoaded && !state.needKey) loadConfig();
}

// --- server-sent events over fetch ------------------------------------------------------

async function* readSSE(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r/g, "");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let v = colon < 0 ? "" : line.slice(colon + 1);
        if (v.startsWith(" ")) v = v.slice(1);
        if (field === "event") event = v;
        else if (field === "data") data.push(v);
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

// --- generation -------------------------------------------------------------------------

function requestBody() {
  const body = {
    model: $("model").value || undefined,
    prompt: $("prompt").value.trim(),
    n: Number($("n").value || 1),
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
    sampler: $("sampler").value || undefined,
    size: $("size").value || undefined,
    preview: $("previews").checked,
    response_format: "b64_json",
  };
  const negative = $("negative").value.trim();
  if (negative) body.negative_prompt = negative;
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  return body;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("generate").textContent = busy ? "Generating…" : "Generate";
  $("cancel").hidden = !busy;
  $("progress").hidden = !busy;
  if (busy) {
    $("bar-fill").style.width = "0%";
    $("progress").dataset.steps = "";
    $("progress-text").textContent = "Waiting for the server…";
    $("progress-time").textContent = "";
    $("preview-strip").replaceChildren();
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function showProgress(p, t0) {
  const pct = Math.round((100 * p.step) / Math.max(p.total, 1));
  $("bar-fill").style.width = `${pct}%`;
  const shown = $("progress").dataset.steps;  // the steps shown so far, "1,2,3" (tests read it)
  $("progress").dataset.steps = shown ? `${shown},${p.step}` : String(p.step);
  $("progress-text").textContent = `Step ${p.step} of ${p.total}`;
  $("progress-time").textContent = `${((performance.now() - t0) / 1000).toFixed(1)} s`;
  if (p.previews && p.previews.length) {
    const strip = $("preview-strip");
    p.previews.forEach((b64, i) => {
      let img = strip.children[i];
      if (!img) {
        img = document.createElement("img");
        img.className = "preview";
        img.alt = `preview ${i + 1}`;
        strip.appendChild(img);
      }
      img.src = `data:image/png;base64,${b64}`;
    });
  }
}

async function generate(event) {
  event.preventDefault();
  const body = requestBody();
  if (!body.prompt) {
    showError("Please enter a prompt.");
    return;
  }
  showError("");
  setBusy(true);
  const controller = new AbortController();
  state.controller = controller;
  const t0 = performance.now();
  try {
    const res = await fetch("/v1/images/generations/stream", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) {
      const message = await errorMessage(res);
      if (res.status === 401) openKeyDialog(message);
      throw new Error(message);
    }
    let result = null;
    for await (const { event: kind, data } of readSSE(res.body)) {
      if (kind === "progress") showProgress(data, t0);
      else if (kind === "result") result = data;
      else if (kind === "error") throw new Error(data.error.message);
    }
    if (!result) throw new Error("The stream ended without images.");
    addResult(body, result, (performance.now() - t0) / 1000);
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

function addResult(body, result, seconds) {
  const card = document.createElement("article");
  card.className = "batch";
  const head = document.createElement("header");
  const title = document.createElement("p");
  title.className = "batch-prompt";
  title.textContent = body.prompt;
  const meta = document.createElement("p");
  meta.className = "batch-meta";
  meta.textContent = [
    body.model, `seed ${result.seed}`, `${body.steps} steps`, body.sampler, `guidance ${body.guidance_scale}`,
    result.size.replace("x", " × "), `${seconds.toFixed(1)} s`,
  ].filter(Boolean).join(" · ");
  head.append(title, meta);
  if (body.negative_prompt) {
    const neg = document.createElement("p");
    neg.className = "batch-meta";
    neg.textContent = `not: ${body.negative_prompt}`;
    head.append(neg);
  }
  for (const w of result.warnings || []) {
    const warn = document.createElement("p");
    warn.className = "warning";
    warn.textContent = w;
    head.append(warn);
  }
  const images = document.createElement("div");
  images.className = "images";
  const [w] = result.size.split("x").map(Number);
  result.data.forEach((item, i) => {
    const src = `data:image/png;base64,${item.b64_json}`;
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.className = "result";
    if (w < 128) img.classList.add("pixelated");
    img.src = src;
    img.alt = `${body.prompt} (${i + 1})`;
    const link = document.createElement("a");
    link.href = src;
    link.download = `ldm-${result.seed}-${i + 1}.png`;
    link.className = "download";
    link.textContent = "Download";
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.className = "reuse";
    reuse.textContent = "Use seed";
    reuse.addEventListener("click", () => { $("seed").value = result.seed; });
    fig.append(img, link, reuse);
    images.append(fig);
  });
  card.append(head, images);
  $("grid").prepend(card);
  $("empty").hidden = true;
  $("clear").hidden = false;
}

// --- API key dialog ---------------------------------------------------------------------

function openKeyDialog(message) {
  const dialog = $("key-dialog");
  if (dialog.open) return;
  if (message) $("key-message").textContent = message;
  $("key-input").value = state.key;
  dialog.showModal();
}

$("key-dialog").addEventListener("close", () => {
  const action = $("key-dialog").returnValue;
  if (action === "save") state.key = $("key-input").value.trim();
  if (action === "clear") state.key = "";
  if (state.key) localStorage.setItem(KEY_STORE, state.key);
  else localStorage.removeItem(KEY_STORE);
  $("key-button").classList.toggle("has-key", Boolean(state.key));
  state.needKey = false;
  loadConfig();
});

// --- wiring -----------------------------------------------------------------------------

$("form").addEventListener("submit", generate);
$("cancel").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  $("grid").replaceChildren();
  $("empty").hidden = false;
  $("clear").hidden = true;
});
$("dice").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); });
$("key-button").addEventListener("click", () => openKeyDialog());
$("key-button").classList.toggle("has-key", Boolean(state.key));
$("model").addEventListener("change", () => { state.configLoaded = false; loadConfig(); });
$("steps").addEventListener("input", showValues);
$("guidance").addEventListener("input", showValues);
document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("generate").disabled) {
    $("form").requestSubmit();
  }
});

applyLimits(FALLBACK);
pollStatus();
setInterval(pollStatus, 5000);

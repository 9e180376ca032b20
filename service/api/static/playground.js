// The playground's form, result panels and compare mode. Everything goes through client.js.

import * as adapters from "./adapters.js";
import * as api from "./client.js";
import { difference, formatPsnr, psnr } from "./compare.js";
import * as edit from "./edit.js";
import * as history from "./history.js";

const $ = (id) => document.getElementById(id);
const KNOBS = [...document.querySelectorAll("[data-knob]")];
const PRESETS = ["off", "quality", "balanced", "fast"];
const MAX_SEED = 2 ** 32 - 1;
const models = new Map();
let inFlight = [];
// The images on show; a new run frees them (the history keeps its own data: URLs).
let shownURLs = [];

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(err) {
  const box = $("error");
  box.replaceChildren();
  const where = err.status ? `${err.status}${err.code ? " " + err.code : ""}` : err.code || "error";
  box.append(el("strong", {}, where + ": "), document.createTextNode(err.message));
  if (err.fields && err.fields.length > 1) {
    const list = el("ul");
    for (const f of err.fields) list.append(el("li", {}, `${f.field}: ${f.message}`));
    box.append(list);
  }
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
}

// ---- models, presets and knobs ----------------------------------------------------------------

async function loadModels() {
  let data;
  try {
    data = await api.getJSON("/models");
  } catch (err) {
    showError(err);
    $("service-status").textContent = err.status === 401 ? "This service needs an API key." : "Models unavailable.";
    if (err.status === 401) $("access").open = true;
    return;
  }
  clearError();
  const select = $("model");
  const keep = select.value;
  select.replaceChildren();
  models.clear();
  for (const m of data.models) {
    models.set(m.name, m);
    const label = `${m.name}${m.output === "video" ? " (video)" : ""}${m.workers_alive ? "" : " (no worker)"}`;
    select.append(el("option", { value: m.name }, label));
  }
  select.value = models.has(keep) ? keep : data.default_model;
  const alive = data.models.filter((m) => m.workers_alive).length;
  $("service-status").textContent = `${data.models.length} model(s), ${alive} with a live worker; default ${data.default_model}.`;
  onModelChange();
}

function setBounds(input, placeholder, min, max) {
  input.placeholder = placeholder === undefined || placeholder === null ? "" : String(placeholder);
  if (min !== undefined && min !== null) input.min = String(min);
  if (max !== undefined && max !== null) input.max = String(max);
}

function onModelChange() {
  const m = models.get($("model").value);
  if (!m) return;
  const d = m.defaults;
  const lim = m.limits || {};
  const preset = $("preset");
  const keep = preset.value;
  preset.replaceChildren(el("option", { value: "" }, `default (${d.cache})`));
  for (const name of PRESETS) preset.append(el("option", { value: name }, name));
  preset.value = PRESETS.includes(keep) ? keep : "";
  setBounds($("steps"), d.steps, lim.min_steps, lim.max_steps);
  setBounds($("width"), d.width, lim.min_side, lim.max_side);
  setBounds($("height"), d.height, lim.min_side, lim.max_side);
  setBounds($("guidance"), d.guidance, 0, 100);
  // A model that lists the sizes it draws well admits only those; otherwise any multiple of its step.
  const size = lim.sizes ? `, sizes ${lim.sizes.join(", ")}` :
    lim.size_multiple ? `, sides multiples of ${lim.size_multiple}` : "";
  const what = m.pipeline_class && m.pipeline_class !== "auto" ? m.pipeline_class : `${m.kind} model`;
  $("model-info").textContent = `${what}: ${d.width}×${d.height}, ${d.steps} steps, guidance ${d.guidance}` +
    `${size}; ${m.workers_alive} worker(s), ${m.queue_depth} queued.`;
  edit.configure(m.edits);
  adapters.configure(m);
  const video = m.output === "video";
  $("compare").disabled = video;
  if (video) $("compare").checked = false;
  $("compare").parentElement.title = video ? "PSNR compare is for image models" : "";
  onPresetChange();
}

function onPresetChange() {
  const m = models.get($("model").value);
  if (!m) return;
  const name = $("preset").value || m.defaults.cache;
  const tuned = (m.defaults.cache_presets || {})[name] || {};
  for (const input of KNOBS) input.placeholder = input.dataset.knob in tuned ? String(tuned[input.dataset.knob]) : "preset";
  const knobs = Object.entries(tuned).map(([k, v]) => `${k} ${v}`).join(", ");
  $("preset-info").textContent = name === "off" ? "off: every step computed in full."
    : knobs ? `${name} as tuned for ${m.name}: ${knobs}.` : `${name}: the library's preset (the run reports its settings).`;
}

function cacheSettings() {
  const cache = {};
  if ($("preset").value) cache.preset = $("preset").value;
  if ($("mode").value) cache.mode = $("mode").value;
  for (const input of KNOBS) if (input.value !== "") cache[input.dataset.knob] = Number(input.value);
  return cache;
}

function baseRequest() {
  const body = { prompt: $("prompt").value, model: $("model").value };
  for (const id of ["seed", "steps", "width", "height", "guidance"]) {
    if ($(id).value !== "") body[id] = Number($(id).value);
  }
  return { ...body, ...adapters.fields(), ...edit.fields() };
}

// A request as the panel shows it: an edit's image and mask by their length, not their bytes.
function shown(body) {
  return JSON.stringify(body, (k, v) => ((k === "image" || k === "mask") && typeof v === "string"
    ? `<${k}: ${v.length} characters>` : v), 2);
}

// ---- one job in one panel ---------------------------------------------------------------------

function panel(title) {
  const root = el("article", { class: "panel" });
  const heading = el("h3", {}, title);
  const bar = el("progress", { max: "1", value: "0" });
  const status = el("p", { class: "status" }, "waiting");
  const figure = el("div", { class: "figure" });
  const stats = el("dl", { class: "stats" });
  const req = el("details", { class: "request" });
  req.append(el("summary", {}, "request"), el("pre"));
  root.append(heading, bar, status, figure, stats, req);
  $("panels").append(root);
  let events = 0;
  let steps = 0;

  const line = (text) => { status.textContent = events ? `${text} · ${events} progress event(s)` : text; };
  return {
    root,
    request(body) { req.querySelector("pre").textContent = shown(body); },
    event(ev) {
      if (ev.type === "progress") {
        events += 1;
        steps = ev.steps || steps;
        bar.max = steps || 1;
        bar.value = ev.step;
        line(`step ${ev.step} / ${steps}`);
      } else if (ev.type === "queued") line("queued");
      else if (ev.type === "started") line(ev.attempt > 1 ? `running (attempt ${ev.attempt})` : "running");
      else if (ev.type === "finished") line(`done, ${steps} steps`);
      else if (ev.type === "failed" || ev.type === "cancelled") line(ev.type + (ev.error ? `: ${ev.error}` : ""));
    },
    status: line,
    stats(record) {
      const t = record.timings || {};
      const s = record.cache_stats || {};
      const rows = [
        ["seed", record.seed],
        ["inference", t.inference_s != null ? `${t.inference_s.toFixed(3)} s` : "–"],
        ["total", t.total_s != null ? `${t.total_s.toFixed(3)} s` : "–"],
        ["cache", record.cache ? describeCache(record.cache) : "–"],
        ["adapters", record.adapters && record.adapters.length
          ? record.adapters.map((a) => `${a.name} ×${a.scale}`).join(", ") : "–"],
        ["edit", record.strength != null ? `strength ${record.strength}${record.masked ? ", masked" : ""}` : "–"],
        ["steps full / cached", s.full_steps != null ? `${s.full_steps} / ${s.cached_steps}` : "–"],
        ["FLOPs speedup", s.flops_speedup != null ? `${s.flops_speedup.toFixed(2)}×` : "–"],
      ];
      stats.replaceChildren();
      for (const [k, v] of rows) stats.append(el("dt", {}, k), el("dd", { "data-stat": k }, String(v ?? "–")));
    },
    async show(blob, format) {
      const url = URL.createObjectURL(blob);
      shownURLs.push(url);
      const video = ["mp4"].includes(format);
      const media = video ? el("video", { src: url, controls: "", loop: "", muted: "", autoplay: "" })
        : el("img", { src: url, alt: `${title} result` });
      figure.replaceChildren(media);
      if (!video && edit.available()) {
        const reuse = el("button", { type: "button", class: "link reuse" }, "edit this image");
        reuse.addEventListener("click", () => edit.useImage(blob));
        figure.append(reuse);
      }
      if (!video) await media.decode();
      return media;
    },
    figure,
  };
}

function describeCache(cache) {
  if (!cache.mode || cache.mode === "off") return "off";
  const keys = ["interval", "warmup", "order", "clusters", "gamma"].filter((k) => k in cache);
  return `${cache.mode} (${keys.map((k) => `${k} ${cache[k]}`).join(", ")})`;
}

async function runJob(body, view) {
  view.request(body);
  const job = await api.submit(body);
  view.root.classList.add("submitted");
  inFlight.push(job);
  view.status(`queued (job ${job.id.slice(0, 8)})`);
  try {
    await api.follow(job, (ev) => view.event(ev));
  } catch {
    view.status("progress stream lost; waiting for the result");
  }
  const record = await api.settled(job);
  inFlight = inFlight.filter((j) => j !== job);
  view.stats(record);
  if (record.status !== "succeeded") {
    const err = new Error(record.error || `the job was ${record.status}`);
    err.code = `job ${record.status}`;
    throw err;
  }
  const blob = await api.output(record.links.images[0]);
  const media = await view.show(blob, record.output_format);
  return { record, blob, media };
}

// ---- generate, compare, history ---------------------------------------------------------------

async function generate(event) {
  event.preventDefault();
  clearError();
  $("panels").replaceChildren();
  for (const url of shownURLs) URL.revokeObjectURL(url);
  shownURLs = [];
  $("summary").hidden = true;
  const compare = $("compare").checked;
  if (compare && $("seed").value === "") $("seed").value = String(Math.floor(Math.random() * MAX_SEED));
  const body = baseRequest();
  const cache = cacheSettings();
  setBusy(true);
  try {
    if (compare) await compareRuns(body, cache);
    else await singleRun(body, cache);
  } catch (err) {
    // A refused request never became a job: its empty panel would only look like one waiting.
    for (const node of $("panels").querySelectorAll(".panel:not(.submitted)")) node.remove();
    showError(err);
  } finally {
    setBusy(false);
    inFlight = [];
  }
}

async function singleRun(body, cache) {
  const request = Object.keys(cache).length ? { ...body, cache } : body;
  const view = panel(chosenTitle(cache));
  const run = await runJob(request, view);
  await remember(request, run, {});
}

async function compareRuns(body, cache) {
  const off = { ...body, cache: { preset: "off" } };
  const chosen = Object.keys(cache).length ? { ...body, cache } : body;
  const offView = panel("uncached");
  const onView = panel(chosenTitle(cache));
  // One after the other: two jobs on one worker at once would share its CPU and blur both timings.
  const a = await runJob(off, offView);
  const b = await runJob(chosen, onView);
  const value = psnr(a.media, b.media);
  const diffView = el("article", { class: "panel diff" });
  diffView.append(el("h3", {}, "difference ×4"), el("div", { class: "figure" }));
  if (value !== null) diffView.querySelector(".figure").append(difference(a.media, b.media));
  $("panels").append(diffView);
  const ta = a.record.timings.inference_s;
  const tb = b.record.timings.inference_s;
  const flops = b.record.cache_stats ? b.record.cache_stats.flops_speedup : null;
  const summary = $("summary");
  summary.replaceChildren();
  const rows = [
    ["wall-clock", ta && tb ? `${ta.toFixed(3)} s → ${tb.toFixed(3)} s (${ratio(ta, tb)})` : "–", "speedup"],
    ["FLOPs speedup", flops != null ? `${flops.toFixed(2)}×` : "–", "flops"],
    ["PSNR vs uncached", formatPsnr(value), "psnr"],
  ];
  for (const [k, v, id] of rows) {
    const row = el("p", {});
    row.append(el("span", {}, k), el("strong", { id: `summary-${id}` }, v));
    summary.append(row);
  }
  summary.hidden = false;
  await remember(chosen, b, { psnr: formatPsnr(value), uncached_s: ta });
}

// One run each, on a machine that may be busy: a cached run can come out slower, and says so.
function ratio(uncached, cached) {
  return uncached >= cached ? `${(uncached / cached).toFixed(2)}× faster` : `${(cached / uncached).toFixed(2)}× slower`;
}

function chosenTitle(cache) {
  if (!Object.keys(cache).length) {
    const m = models.get($("model").value);
    return m ? `${m.defaults.cache} (model default)` : "model default";
  }
  return Object.entries(cache).map(([k, v]) => (k === "preset" ? v : `${k} ${v}`)).join(", ");
}

async function remember(full, run, extra) {
  const s = run.record.cache_stats || {};
  // The tab's storage keeps settings, not an edit's input image and mask.
  const { image: _image, mask: _mask, ...request } = full;
  let image = null;
  try {
    if (run.blob.type.startsWith("image/")) image = await history.dataURL(run.blob);
  } catch {
    image = null;
  }
  history.add({
    at: Date.now(), request, image, seed: run.record.seed,
    inference_s: run.record.timings.inference_s, flops_speedup: s.flops_speedup, cache: describeCache(run.record.cache || {}),
    ...extra,
  });
  renderHistory();
}

function renderHistory() {
  const items = history.load();
  const list = $("history");
  list.replaceChildren();
  $("history-empty").hidden = items.length > 0;
  for (const item of items) {
    const li = el("li", { tabindex: "0", title: "Load these settings" });
    if (item.image) li.append(el("img", { src: item.image, alt: item.request.prompt }));
    const text = el("div");
    text.append(el("strong", {}, item.request.prompt));
    const parts = [item.request.model, `seed ${item.seed}`, item.cache];
    if (item.inference_s != null) parts.push(`${item.inference_s.toFixed(3)} s`);
    if (item.flops_speedup != null) parts.push(`FLOPs ${item.flops_speedup.toFixed(2)}×`);
    if (item.psnr) parts.push(`PSNR ${item.psnr}`);
    text.append(el("span", { class: "muted" }, parts.join(" · ")));
    li.append(text);
    const pick = () => restore(item.request);
    li.addEventListener("click", pick);
    li.addEventListener("keydown", (e) => { if (e.key === "Enter") pick(); });
    list.append(li);
  }
}

function restore(request) {
  $("prompt").value = request.prompt || "";
  if (models.has(request.model)) $("model").value = request.model;
  onModelChange();
  for (const id of ["seed", "steps", "width", "height", "guidance"]) $(id).value = request[id] ?? "";
  const cache = request.cache || {};
  $("preset").value = cache.preset || "";
  $("mode").value = cache.mode || "";
  for (const input of KNOBS) input.value = cache[input.dataset.knob] ?? "";
  onPresetChange();
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
}

async function cancelAll() {
  for (const job of inFlight) {
    try {
      await api.cancel(job);
    } catch (err) {
      showError(err);
    }
  }
}

$("form").addEventListener("submit", generate);
$("cancel").addEventListener("click", cancelAll);
$("model").addEventListener("change", onModelChange);
$("preset").addEventListener("change", onPresetChange);
$("new-seed").addEventListener("click", () => { $("seed").value = String(Math.floor(Math.random() * MAX_SEED)); });
// Every call uses the key as typed; the model list is read again once the field is left.
$("api-key").addEventListener("input", () => api.setKey($("api-key").value));
$("api-key").addEventListener("change", loadModels);
$("clear-history").addEventListener("click", () => { history.clear(); renderHistory(); });
edit.setup();
renderHistory();
loadModels();

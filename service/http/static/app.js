// MARché Serve's page: plain JavaScript, no build step, nothing loaded from elsewhere.
// It uses the public API only: GET /info, GET /classes, POST /generate/stream (server-sent
// events read with fetch, since EventSource can neither POST nor send an Authorization header).
import {HttpError, UserError, describe, onKeyNeeded, readEvents, rememberKey, request} from "./api.js";

const MODES = ["mar", "marche", "turbo"]; // the modes "Compare" runs side by side
const DISPLAY_PX = 192; // small images are shown about this big, pixelated
const SEED_LIMIT = 2 ** 31; // a random seed for compare runs: below this

const $ = (id) => document.getElementById(id);

const state = {
  info: null,
  classes: [], // [{id, name, synonyms}]
  scale: 1,
  run: null, // AbortController of the run in progress
};

function showError(err) {
  const box = $("error");
  const {text, suggestions} = describe(err);
  box.replaceChildren(document.createTextNode(text));
  if (suggestions.length) {
    const p = document.createElement("p");
    p.className = "suggest";
    p.append("Did you mean ");
    suggestions.forEach(({label, value}, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "suggestion";
      b.textContent = label;
      b.addEventListener("click", () => {
        $("class-name").value = value;
        clearError();
        $("class-name").focus();
      });
      if (i) p.append(" ");
      p.append(b);
    });
    p.append("?");
    box.append(p);
  }
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
}

function setStatus(text) {
  $("status").textContent = text;
}

// ---------------------------------------------------------------- API key prompt

let keyWaiters = []; // requests waiting for a key: [{resolve, reject}]

// Resolves once the user has entered a key (one prompt for every request waiting on it).
function waitForKey(rejected, signal) {
  const panel = $("key-panel");
  $("key-message").textContent = rejected
    ? "That API key was not accepted. Enter the right one:"
    : "This server needs an API key.";
  panel.hidden = false;
  $("api-key").focus();
  setStatus("Waiting for the API key…");
  return new Promise((resolve, reject) => {
    const waiter = {resolve, reject};
    keyWaiters.push(waiter);
    if (signal) {
      signal.addEventListener("abort", () => {
        keyWaiters = keyWaiters.filter((w) => w !== waiter);
        if (!keyWaiters.length) panel.hidden = true;
        reject(new DOMException("Stopped", "AbortError"));
      }, {once: true});
    }
  });
}

function saveKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) {
    $("key-message").textContent = "Enter the key first.";
    return;
  }
  rememberKey(key);
  $("api-key").value = "";
  $("key-panel").hidden = true;
  const waiting = keyWaiters;
  keyWaiters = [];
  waiting.forEach((w) => w.resolve(key));
}

// ---------------------------------------------------------------- the form

function numberField(id, label, {integer = false} = {}) {
  const input = $(id);
  if (input.validity.badInput) throw new UserError(`${label} must be a number.`);
  if (input.value === "") return undefined;
  const value = Number(input.value);
  if (!Number.isFinite(value)) throw new UserError(`${label} must be a number.`);
  if (integer && !Number.isInteger(value)) throw new UserError(`${label} must be a whole number.`);
  return value;
}

// {class_id} or {class_name} for the typed text
function classField() {
  const text = $("class-name").value.trim();
  if (!text) {
    const example = state.classes.length ? ` (e.g. ${state.classes[0].name})` : "";
    throw new UserError(`Type a class name${example}.`);
  }
  if (/^\d+$/.test(text)) return {class_id: Number(text)};
  return {class_name: text}; // the server resolves names (any case, any synonym) and suggests
}

function requestBody() {
  const body = classField();
  const cfg = numberField("cfg", "CFG");
  const steps = numberField("steps", "Steps", {integer: true});
  const seed = numberField("seed", "Seed", {integer: true});
  const count = numberField("count", "Images", {integer: true});
  if (cfg !== undefined) body.cfg = cfg;
  if (steps !== undefined) body.steps = steps;
  if (seed !== undefined) body.seed = seed;
  if (count !== undefined) body.num_images = count;
  return body;
}

// ---------------------------------------------------------------- result cards

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Small images scaled up by a whole factor (crisp pixels); big ones fit the card (CSS).
function sized(img, scale = state.scale) {
  img.addEventListener("load", () => {
    img.style.width = `${img.naturalWidth * scale}px`;
  });
  return img;
}

function makeCard(title, note) {
  const root = el("article", "card");
  root.dataset.state = "waiting";
  root.dataset.previews = "0";
  const head = el("header", "card-head");
  head.append(el("h2", "card-title", title));
  const badge = el("span", "badge");
  head.append(badge);
  const frame = el("div", "frame");
  const preview = sized(el("img", "preview"));
  preview.alt = `${title}: preview`;
  preview.hidden = true;
  const finals = el("div", "finals");
  frame.append(preview, finals);
  const progress = el("progress", "bar");
  progress.max = 1;
  progress.value = 0;
  const step = el("p", "step", note || "");
  const timings = el("dl", "timings");
  const message = el("p", "card-error");
  message.hidden = true;
  root.append(head, frame, progress, step, timings, message);
  return {root, badge, preview, finals, progress, step, timings, message};
}

function fmtSeconds(s) {
  if (s === undefined || s === null || Number.isNaN(s)) return "–";
  return s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(1)} s`;
}

function setTimings(card, rows) {
  card.timings.replaceChildren();
  for (const [name, value, cls] of rows) {
    const dt = el("dt", undefined, name);
    const dd = el("dd", cls, value);
    card.timings.append(dt, dd);
  }
}

function seedText(seeds) {
  if (!seeds || !seeds.length) return "–";
  return seeds.length === 1 ? String(seeds[0]) : `${seeds[0]}–${seeds[seeds.length - 1]}`;
}

// One stream into one card; resolves to {generation_s, queue_s, seeds, wall_s}.
async function runStream(card, body, signal) {
  card.root.dataset.state = "running";
  card.step.textContent = "waiting for the server…";
  const started = performance.now();
  const resp = await request("/generate/stream", {
    method: "POST",
    body,
    signal,
    accept: "text/event-stream",
  });
  const images = [];
  let done = null;
  let failure = null;
  await readEvents(resp, (name, data) => {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (name === "queued") {
      const start = msg.expected_start_s == null ? "" : ` · starts in about ${Math.ceil(msg.expected_start_s)} s`;
      card.step.textContent = msg.position === 0 ? `next in line${start}` : `queued: ${msg.position} ahead${start}`;
    } else if (name === "progress") {
      card.progress.max = msg.total;
      card.progress.value = msg.step;
      card.step.textContent = `step ${msg.step}/${msg.total} · ${msg.tokens_done}/${msg.seq_len} tokens`;
      if (msg.preview_png_b64) {
        card.preview.src = `data:image/png;base64,${msg.preview_png_b64}`;
        card.preview.hidden = false;
        card.root.dataset.previews = String(Number(card.root.dataset.previews) + 1);
      }
    } else if (name === "image") {
      images.push(msg);
    } else if (name === "done") {
      done = msg;
    } else if (name === "error") {
      failure = new HttpError(msg.status, {detail: msg.detail});
    }
  });
  if (failure) throw failure;
  if (!done) throw new Error("The stream ended before the images arrived.");
  const wall = (performance.now() - started) / 1000;
  card.preview.hidden = true;
  const scale = images.length > 1 ? Math.max(1, Math.floor(state.scale / 2)) : state.scale;
  card.finals.replaceChildren(
    ...images.map((im) => {
      const fig = el("figure", "final-fig");
      const img = sized(el("img", "final"), scale);
      img.alt = `${body.class_name ?? body.class_id}, seed ${im.seed}`;
      img.title = `seed ${im.seed}`;
      img.src = `data:image/png;base64,${im.b64}`;
      fig.append(img);
      if (images.length > 1) fig.append(el("figcaption", undefined, `seed ${im.seed}`));
      return fig;
    }),
  );
  card.progress.value = card.progress.max;
  const steps = done.steps ?? body.steps;
  card.step.textContent = [
    steps !== undefined ? `${steps} steps` : "",
    `${images.length} image${images.length === 1 ? "" : "s"}`,
  ]
    .filter(Boolean)
    .join(" · ");
  const result = {
    generation_s: done.generation_s,
    queue_s: done.queue_s,
    seeds: done.seeds || images.map((im) => im.seed),
    wall_s: wall,
    request_id: done.request_id,
  };
  const rows = [];
  if (done.class_id !== undefined) {
    // "207 · golden retriever"; digits, whose names are their ids: "3 · three"
    const known = state.classes[done.class_id];
    const words = [done.class_name, ...(known ? [known.name, ...known.synonyms] : [])];
    const word = words.find((w) => w !== undefined && w !== null && w !== String(done.class_id));
    rows.push(["class", word ? `${done.class_id} · ${word}` : String(done.class_id), "t-class"]);
  }
  if (result.queue_s !== undefined) rows.push(["queue", fmtSeconds(result.queue_s), "t-queue"]);
  rows.push(["generation", fmtSeconds(result.generation_s), "t-gen"]);
  rows.push(["total", fmtSeconds(wall), "t-total"]);
  rows.push(["seed", seedText(result.seeds), "t-seed"]);
  setTimings(card, rows);
  card.root.dataset.state = "done";
  return result;
}

function failCard(card, err) {
  card.root.dataset.state = "failed";
  card.preview.hidden = true;
  card.progress.hidden = true;
  card.step.textContent = "";
  card.message.textContent = describe(err).text;
  card.message.hidden = false;
}

function startRun() {
  if (state.run) state.run.abort();
  const run = new AbortController();
  state.run = run;
  clearError();
  $("stop").hidden = false;
  return run;
}

function endRun(run) {
  if (state.run === run) {
    state.run = null;
    $("stop").hidden = true;
  }
}

// The form's request body, or null after showing why it is not valid.
function formBody() {
  try {
    return requestBody();
  } catch (err) {
    showError(err);
    return null;
  }
}

async function generate(event) {
  event.preventDefault();
  const body = formBody();
  if (!body) return;
  body.mode = $("mode").value;
  const run = startRun();
  const result = $("result");
  result.className = "cards single";
  const card = makeCard(body.mode);
  result.replaceChildren(card.root);
  setStatus(`Generating (${body.mode})…`);
  try {
    const r = await runStream(card, body, run.signal);
    setStatus(`Done: ${fmtSeconds(r.generation_s)} of generation.`);
  } catch (err) {
    if (run.signal.aborted) return;
    if (card.root.dataset.previews === "0") result.replaceChildren(); // nothing to show
    else failCard(card, err);
    showError(err);
    setStatus("");
  } finally {
    endRun(run);
  }
}

// The same class and seed in every mode, one after another: the server's continuous batching
// would otherwise run the three in the same steps, and their times would all be equal.
async function compare() {
  const body = formBody();
  if (!body) return;
  if (body.seed === undefined) {
    body.seed = crypto.getRandomValues(new Uint32Array(1))[0] % SEED_LIMIT;
    $("seed").value = String(body.seed);
  }
  const run = startRun();
  const result = $("result");
  result.className = "cards compare";
  const cards = new Map(MODES.map((m) => [m, makeCard(m, "waiting…")]));
  result.replaceChildren(...[...cards.values()].map((c) => c.root));
  const times = {};
  try {
    for (const mode of MODES) {
      const card = cards.get(mode);
      setStatus(`Comparing: ${mode}…`);
      try {
        const r = await runStream(card, {...body, mode}, run.signal);
        times[mode] = r.generation_s;
      } catch (err) {
        if (run.signal.aborted) return;
        failCard(card, err);
        showError(err);
        if (err instanceof HttpError && err.status === 422) break; // same for every mode
        continue;
      }
      if (mode === "mar") {
        card.badge.textContent = "baseline";
      } else if (times.mar && times[mode]) {
        const speedup = times.mar / times[mode];
        card.badge.textContent = `×${speedup.toFixed(2)} vs mar`;
        card.badge.classList.add(speedup >= 1 ? "faster" : "slower");
      }
    }
    const parts = MODES.filter((m) => times[m] !== undefined).map(
      (m) => `${m} ${fmtSeconds(times[m])}`,
    );
    setStatus(parts.length ? `Compared (generation time): ${parts.join(" · ")}.` : "");
  } finally {
    endRun(run);
  }
}

function stop() {
  if (state.run) state.run.abort();
  for (const card of document.querySelectorAll(".card")) {
    if (card.dataset.state === "running" || card.dataset.state === "waiting") {
      card.dataset.state = "stopped";
    }
  }
  setStatus("Stopped.");
}

// ---------------------------------------------------------------- start-up

function fillClasses(list) {
  state.classes = list.map((c) => ({
    id: c.id,
    name: String(c.name ?? c.label ?? c.id),
    synonyms: Array.isArray(c.synonyms) ? c.synonyms.map(String) : [],
  }));
  const options = state.classes.map((c) => {
    const option = document.createElement("option");
    option.value = c.name;
    const others = c.synonyms.filter((s) => s !== c.name);
    option.label = others.length ? `${c.id}: ${others.join(", ")}` : `class ${c.id}`;
    return option;
  });
  $("class-list").replaceChildren(...options);
  if (state.classes.length) {
    const sample = state.classes.slice(0, 3).map((c) => c.name);
    $("class-name").placeholder = `type a class name, e.g. ${sample.join(", ")}`;
  }
}

function fillInfo(info) {
  state.info = info;
  const size = Number(info.image_size) || 0;
  state.scale = size > 0 ? Math.max(1, Math.floor(DISPLAY_PX / size)) : 1;
  const d = info.defaults || {};
  const modes = [...$("mode").options].map((o) => o.value);
  if (d.mode && modes.includes(d.mode)) $("mode").value = d.mode;
  if (d.cfg !== undefined) $("cfg").placeholder = String(d.cfg);
  if (d.steps !== undefined) $("steps").placeholder = String(d.steps);
  const facts = [info.model];
  if (size) facts.push(`${size}×${size} px`);
  if (info.num_classes) facts.push(`${info.num_classes} classes`);
  if (info.device) facts.push(info.device);
  $("model-line").textContent = `Model: ${facts.join(" · ")}`;
}

async function init() {
  $("controls").addEventListener("submit", generate);
  $("compare").addEventListener("click", compare);
  $("stop").addEventListener("click", stop);
  $("key-form").addEventListener("submit", saveKey);
  onKeyNeeded(waitForKey);
  try {
    const [info, classes] = await Promise.all([
      request("/info").then((r) => r.json()),
      request("/classes").then((r) => r.json()),
    ]);
    fillInfo(info);
    fillClasses(classes.classes || []);
    document.body.dataset.ready = "true";
  } catch (err) {
    $("model-line").textContent = "Model facts unavailable.";
    showError(err);
  }
}

init();

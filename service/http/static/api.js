// The service's HTTP API as the page uses it: error answers in words, the API key, and
// server-sent events (read with fetch: EventSource can neither POST nor send a key).

const KEY_STORE = "marche-api-key";

// ---------------------------------------------------------------- errors

export class HttpError extends Error {
  constructor(status, body, headers) {
    super(`HTTP ${status}`);
    this.status = status;
    this.body = body; // parsed JSON, or text
    this.headers = headers || new Headers();
  }
}

export class UserError extends Error {
  constructor(message, suggestions = []) {
    super(message);
    this.suggestions = suggestions;
  }
}

function field(loc) {
  const parts = (loc || []).filter((p, i) => !(i === 0 && ["body", "query", "header"].includes(p)));
  return parts.join(".");
}

// Names to offer on buttons, [{label, value}]: the server's `suggestions` for an unknown
// name, or its `candidates` for a name several classes share (offered by id: the name alone
// would be ambiguous again).
function collectSuggestions(body) {
  const out = [];
  const add = (list, byId) => {
    for (const s of Array.isArray(list) ? list : []) {
      if (!s || typeof s !== "object" || s.name === undefined) continue;
      const option = byId ? {label: `${s.name} (${s.id})`, value: String(s.id)} : {label: s.name, value: s.name};
      if (!out.some((o) => o.value === option.value)) out.push(option);
    }
  };
  if (body && typeof body === "object" && Array.isArray(body.detail)) {
    for (const item of body.detail) {
      if (item && typeof item === "object") {
        add(item.suggestions, false);
        add(item.candidates, true);
      }
    }
  }
  return out;
}

function detailText(body) {
  if (body === null || body === undefined || body === "") return "";
  if (typeof body === "string") return body;
  if (body.error && body.error.message) return body.error.message;
  const detail = body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((d) => {
        if (!d || typeof d !== "object") return String(d);
        const where = field(d.loc);
        return where ? `${where}: ${d.msg}` : String(d.msg);
      })
      .join("; ");
  }
  return JSON.stringify(body);
}

// {text, suggestions} for anything thrown by a run
export function describe(err) {
  if (err instanceof UserError) return {text: err.message, suggestions: err.suggestions};
  if (err instanceof HttpError) {
    let detail = detailText(err.body);
    const suggestions = collectSuggestions(err.body);
    // the names go on buttons below: drop the server's own list from the text
    if (suggestions.length) {
      detail = detail.replace(/;?\s*did you mean [^?]*\?/i, "").replace(/;\s*use a more specific.*$/i, "");
    }
    switch (err.status) {
      case 429:
      case 503: {
        const retry = err.headers.get("Retry-After");
        const when = retry ? `retry in ${retry} s` : "retry shortly";
        const who = err.status === 429 ? "Too many of your requests are waiting" : "Server busy";
        return {text: `${who}, ${when}.` + (detail ? ` (${detail})` : ""), suggestions};
      }
      case 422:
        return {text: `Invalid request: ${detail || "check the fields"}`, suggestions};
      case 401:
        return {text: `API key needed: ${detail || "not authorised"}`, suggestions};
      case 504:
        return {text: `Too slow: ${detail || "the request's deadline passed"}`, suggestions};
      default:
        return {text: `Error ${err.status}: ${detail || "request failed"}`, suggestions};
    }
  }
  if (err && err.name === "AbortError") return {text: "Stopped.", suggestions: []};
  if (err instanceof TypeError) {
    return {text: `Cannot reach the server (${err.message}).`, suggestions: []};
  }
  return {text: String((err && err.message) || err), suggestions: []};
}

// ---------------------------------------------------------------- API key

let memoryKey = ""; // the key when sessionStorage is unavailable

function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORE) || "";
  } catch {
    return "";
  }
}

let askForKey = null; // (rejected, signal) -> Promise of a key: the page's prompt

// `prompt(rejected, signal)` is asked for a key when the server answers 401.
export function onKeyNeeded(prompt) {
  askForKey = prompt;
}

export function currentKey() {
  return storedKey() || memoryKey;
}

// Keeps the key for this tab (sessionStorage; memory when storage is off), never in a URL.
export function rememberKey(key) {
  try {
    sessionStorage.setItem(KEY_STORE, key);
  } catch {
    // storage off: memoryKey keeps it for this page
  }
  memoryKey = key;
}

// fetch with the key; on 401, ask for a key once and retry. Non-2xx answers throw HttpError.
export async function request(path, {method = "GET", body, signal, accept = "application/json"} = {}) {
  for (;;) {
    const key = currentKey();
    const headers = {Accept: accept};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (key) headers.Authorization = `Bearer ${key}`;
    const resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
    if (resp.status === 401) {
      await resp.text().catch(() => "");
      if (currentKey() !== key) continue; // a key arrived meanwhile: try it
      if (!askForKey) throw new HttpError(401, "an API key is needed", resp.headers);
      await askForKey(Boolean(key), signal);
      continue;
    }
    if (!resp.ok) {
      const text = await resp.text().catch(() => "");
      let parsed = text;
      try {
        parsed = JSON.parse(text);
      } catch {
        // not JSON: keep the text
      }
      throw new HttpError(resp.status, parsed, resp.headers);
    }
    return resp;
  }
}

// ---------------------------------------------------------------- server-sent events

// Reads a text/event-stream answer; calls onEvent(name, data) per event (data: joined lines).
export async function readEvents(resp, onEvent) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let name = "message";
  let data = [];
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop(); // an unfinished line waits for the next chunk
    for (const line of lines) {
      if (line === "") {
        if (data.length) onEvent(name, data.join("\n"));
        name = "message";
        data = [];
      } else if (!line.startsWith(":")) {
        const i = line.indexOf(":");
        const key = i < 0 ? line : line.slice(0, i);
        let val = i < 0 ? "" : line.slice(i + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (key === "event") name = val;
        else if (key === "data") data.push(val);
      }
    }
  }
  if (data.length) onEvent(name, data.join("\n"));
}

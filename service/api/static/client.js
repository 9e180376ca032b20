// The page's only way to the service: the public API, same origin, with the bearer key when one is set.

let apiKey = "";

export function setKey(key) {
  apiKey = key.trim();
}

function headers(extra = {}) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : { ...extra };
}

export class RequestError extends Error {
  constructor(status, error) {
    super(error && error.message ? error.message : `HTTP ${status}`);
    this.status = status;
    this.code = error ? error.code : undefined;
    this.param = error ? error.param : undefined;
    this.fields = error ? error.fields : undefined;
  }
}

async function failure(resp) {
  let body = null;
  try {
    body = await resp.json();
  } catch {
    // Not the API's error shape (a proxy in between, say): the status alone has to do.
  }
  return new RequestError(resp.status, body && body.error);
}

export async function getJSON(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

export async function submit(request) {
  const resp = await fetch("/generate", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ ...request, async: true }),
  });
  if (resp.status !== 202 && resp.status !== 200) throw await failure(resp);
  return resp.json();
}

export async function cancel(job) {
  const resp = await fetch(job.links.cancel, { method: "POST", headers: headers() });
  if (!resp.ok && resp.status !== 409) throw await failure(resp);
}

const FINAL = new Set(["finished", "failed", "cancelled"]);

function parseEvent(block) {
  let type = "message";
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  try {
    return { ...JSON.parse(data.join("\n")), type };
  } catch {
    return { type };
  }
}

// EventSource cannot send an Authorization header, so the stream is read through fetch.
// Resolves with the final event, or null when the stream ended without one.
export async function follow(job, onEvent) {
  const resp = await fetch(job.links.events, { headers: headers({ Accept: "text/event-stream" }) });
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return null;
    buffer += decoder.decode(value, { stream: true });
    let match;
    while ((match = /\r?\n\r?\n/.exec(buffer))) {
      const event = parseEvent(buffer.slice(0, match.index));
      buffer = buffer.slice(match.index + match[0].length);
      if (!event) continue;
      onEvent(event);
      if (FINAL.has(event.type)) {
        reader.cancel().catch(() => {});
        return event;
      }
    }
  }
}

const DONE = new Set(["succeeded", "failed", "cancelled"]);

// The job's record once it has ended (its result may land a moment after the final event).
export async function settled(job, timeoutMs = 600000) {
  const deadline = Date.now() + timeoutMs;
  for (let wait = 50; ; wait = Math.min(wait * 2, 1000)) {
    const record = await getJSON(job.links.self);
    if (DONE.has(record.status) || Date.now() > deadline) return record;
    await new Promise((resolve) => setTimeout(resolve, wait));
  }
}

export async function output(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await failure(resp);
  return resp.blob();
}

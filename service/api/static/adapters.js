// The LoRA adapter picker: the chosen model's adapters (GET /models), each with a box and a scale.
//
// Only adapters that load can be picked; one that does not says why in its tooltip. At most the
// model's max_adapters are checked at once (the API refuses more with a 422 anyway).

const $ = (id) => document.getElementById(id);
let limit = 0;

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function boxes() {
  return [...$("adapter-list").querySelectorAll("input[type=checkbox]")];
}

function enforceLimit() {
  const checked = boxes().filter((b) => b.checked).length;
  for (const b of boxes()) b.disabled = b.dataset.loads !== "true" || (!b.checked && checked >= limit);
}

// Show the adapters of model `m` (its GET /models entry); picks of the same names are kept.
export function configure(m) {
  const keep = new Map(fields().adapters?.map((a) => [a.name, a.scale]) || []);
  const list = $("adapter-list");
  list.replaceChildren();
  const adapters = m.adapters || [];
  limit = m.max_adapters || 0;
  // Nothing to pick: no picker (a model without adapters, or one that serves none).
  $("adapters").hidden = limit === 0 || adapters.length === 0;
  $("adapter-info").textContent = `Up to ${limit} per request; scale 1 applies an adapter as trained.`;
  for (const a of adapters) {
    const box = el("input", { type: "checkbox", "data-name": a.name, "data-loads": String(a.loads) });
    box.checked = a.loads && keep.has(a.name);
    box.addEventListener("change", enforceLimit);
    const scale = el("input", { type: "number", step: "0.1", min: "-4", max: "4", value: String(keep.get(a.name) ?? 1),
                                "data-scale": a.name, "aria-label": `${a.name} scale` });
    const what = a.loads ? `rank ${a.rank}` : `cannot be used: ${a.problem}`;
    const label = el("label", { title: what }, "");
    label.append(box, document.createTextNode(` ${a.name} `), scale);
    list.append(label);
  }
  enforceLimit();
}

// What the picks add to a request: {adapters: [{name, scale}]}, or nothing.
export function fields() {
  const list = $("adapter-list");
  if (!list) return {};
  const picked = boxes().filter((b) => b.checked).map((b) => {
    const scale = list.querySelector(`input[data-scale="${CSS.escape(b.dataset.name)}"]`);
    return { name: b.dataset.name, scale: scale && scale.value !== "" ? Number(scale.value) : 1 };
  });
  return picked.length ? { adapters: picked } : {};
}

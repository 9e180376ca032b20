// The image to edit and the mask painted over it: what an edit adds to its request.
//
// The file goes as it was chosen (a data: URL, which the API accepts); the mask is the painted
// pixels in white on black (white = repaint), at the image's own size. No paint: no mask, and the
// whole image is redrawn from `strength`.

const $ = (id) => document.getElementById(id);
let imageURL = null;
let painted = false;
// What the chosen model edits (GET /models): none, image (no mask) or inpaint.
let edits = "none";

function canvases() {
  return { image: $("edit-image"), mask: $("edit-mask") };
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function load(file) {
  const url = await readFile(file);
  const img = new Image();
  img.src = url;
  await img.decode();
  const { image, mask } = canvases();
  for (const c of [image, mask]) {
    c.width = img.naturalWidth;
    c.height = img.naturalHeight;
  }
  image.getContext("2d").drawImage(img, 0, 0);
  $("edit-canvas").style.aspectRatio = `${img.naturalWidth} / ${img.naturalHeight}`;
  imageURL = url;
  painted = false;
  $("edit-area").hidden = false;
  describe();
}

function describe() {
  const { image } = canvases();
  const how = edits === "inpaint" ? "paint over it to inpaint, or leave it to redraw the whole image"
    : "this model redraws the whole image (it does not inpaint)";
  $("edit-info").textContent = imageURL === null ? "No image: the prompt alone is drawn."
    : `${image.width}×${image.height}; ${painted ? "the painted pixels are redrawn, every other pixel is kept" : how}.`;
}

function paintAt(event) {
  if (edits !== "inpaint") return;
  const { mask } = canvases();
  const box = mask.getBoundingClientRect();
  const x = ((event.clientX - box.left) / box.width) * mask.width;
  const y = ((event.clientY - box.top) / box.height) * mask.height;
  const r = Math.max(1, Math.round(Math.min(mask.width, mask.height) / 12));
  const ctx = mask.getContext("2d");
  ctx.fillStyle = "rgb(255, 40, 40)";
  ctx.beginPath();
  ctx.arc(x, y, r, 0, 2 * Math.PI);
  ctx.fill();
  if (!painted) {
    painted = true;
    describe();
  }
}

function clearMask() {
  const { mask } = canvases();
  mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
  painted = false;
  describe();
}

function remove() {
  imageURL = null;
  painted = false;
  $("edit-file").value = "";
  $("edit-area").hidden = true;
  describe();
}

function maskURL() {
  const { mask } = canvases();
  const paint = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height);
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  const ctx = out.getContext("2d");
  const bw = ctx.createImageData(mask.width, mask.height);
  for (let i = 0; i < paint.data.length; i += 4) {
    const v = paint.data[i + 3] > 0 ? 255 : 0;
    bw.data[i] = bw.data[i + 1] = bw.data[i + 2] = v;
    bw.data[i + 3] = 255;
  }
  ctx.putImageData(bw, 0, 0);
  return out.toDataURL("image/png");
}

// A result of this page becomes the image to edit ("edit this image" under it).
export async function useImage(blob) {
  $("edit-file").value = "";
  await load(blob);
  $("edit").open = true;
}

// Whether the chosen model edits, so that results offer to be edited.
export function available() {
  return edits !== "none";
}

// Show the section only for a model that edits; painting only for one that inpaints.
export function configure(modelEdits) {
  edits = modelEdits || "none";
  $("edit").hidden = edits === "none";
  $("edit-mask").classList.toggle("off", edits !== "inpaint");
  if (edits !== "inpaint") clearMask();
  describe();
}

// The request fields of the edit on show: {} without an image, or for a model that does not edit.
export function fields() {
  if (imageURL === null || edits === "none") return {};
  const out = { image: imageURL };
  if ($("strength").value !== "") out.strength = Number($("strength").value);
  if (painted) out.mask = maskURL();
  return out;
}

export function setup() {
  $("edit-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return remove();
    try {
      await load(file);
    } catch {
      remove();
      $("edit-info").textContent = "That file could not be read as an image.";
    }
  });
  const { mask } = canvases();
  let down = false;
  mask.addEventListener("pointerdown", (e) => { down = true; mask.setPointerCapture(e.pointerId); paintAt(e); });
  mask.addEventListener("pointermove", (e) => { if (down) paintAt(e); });
  mask.addEventListener("pointerup", () => { down = false; });
  mask.addEventListener("pointercancel", () => { down = false; });
  $("clear-mask").addEventListener("click", clearMask);
  $("remove-image").addEventListener("click", remove);
  describe();
}

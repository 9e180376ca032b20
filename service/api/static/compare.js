// PSNR between two decoded images, and a picture of where they differ, computed in the page.

function pixels(img) {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, canvas.width, canvas.height);
}

// dB over the RGB channels scaled to [0, 1], as clusca.quality.psnr computes it
// (alpha is left out: the service's images are opaque). Identical images give Infinity.
export function psnr(a, b) {
  if (a.naturalWidth !== b.naturalWidth || a.naturalHeight !== b.naturalHeight) return null;
  const pa = pixels(a).data;
  const pb = pixels(b).data;
  let sum = 0;
  for (let i = 0; i < pa.length; i += 4) {
    for (let c = 0; c < 3; c++) {
      const d = (pa[i + c] - pb[i + c]) / 255;
      sum += d * d;
    }
  }
  const mse = sum / ((pa.length / 4) * 3);
  return mse === 0 ? Infinity : 10 * Math.log10(1 / mse);
}

// |a - b| per pixel, brightened so small cache errors are visible.
export function difference(a, b, gain = 4) {
  const da = pixels(a);
  const pb = pixels(b).data;
  const out = new ImageData(da.width, da.height);
  for (let i = 0; i < da.data.length; i += 4) {
    let d = 0;
    for (let c = 0; c < 3; c++) d = Math.max(d, Math.abs(da.data[i + c] - pb[i + c]));
    const v = Math.min(255, d * gain);
    out.data[i] = v;
    out.data[i + 1] = v;
    out.data[i + 2] = v;
    out.data[i + 3] = 255;
  }
  const canvas = document.createElement("canvas");
  canvas.width = da.width;
  canvas.height = da.height;
  canvas.getContext("2d").putImageData(out, 0, 0);
  return canvas;
}

export function formatPsnr(value) {
  if (value === null) return "n/a (sizes differ)";
  return Number.isFinite(value) ? `${value.toFixed(2)} dB` : "∞ dB (identical)";
}

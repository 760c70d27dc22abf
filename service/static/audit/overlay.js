// Masks over the image, in the browser: the same geometry and colours as the server's overlays
// (service/overlay.py). A mask covers the record's input_box (original pixels, scaled to the picture drawn),
// or the whole image without one; it is resized bilinearly, coloured through a 256-entry table and blended
// with the picture at the chosen opacity. Outside the box the picture is left alone.

let tables = null;

// {default, colormaps: {name: [[r, g, b] × 256]}} from the server, fetched once.
export async function loadColormaps() {
  if (!tables) {
    const response = await fetch(new URL('colormaps.json', document.baseURI), { credentials: 'omit' });
    if (!response.ok) throw new Error(`colour tables: HTTP ${response.status}`);
    tables = await response.json();
  }
  return tables;
}

// base64 PNG (8-bit greyscale) → {width, height, values: Uint8ClampedArray}, decoded without any URL.
export async function decodeMask(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const bitmap = await createImageBitmap(new Blob([bytes], { type: 'image/png' }));
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = canvas.getContext('2d');
  ctx.drawImage(bitmap, 0, 0);
  const rgba = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
  const values = new Uint8ClampedArray(bitmap.width * bitmap.height);
  for (let i = 0; i < values.length; i += 1) values[i] = rgba[4 * i];
  bitmap.close();
  return { width: canvas.width, height: canvas.height, values };
}

export function maskStats(values) {
  let low = 255;
  let high = 0;
  let sum = 0;
  for (const v of values) {
    if (v < low) low = v;
    if (v > high) high = v;
    sum += v;
  }
  return { min: low, max: high, mean: values.length ? sum / values.length : 0 };
}

// The mask's min..max spread over 0..255; a constant mask is left as it is.
export function stretchContrast(values) {
  const { min, max } = maskStats(values);
  if (max === min) return values;
  const scale = 255 / (max - min);
  return values.map((v) => Math.round((v - min) * scale));
}

// input_box [x0, y0, x1, y1] in original pixels → integer box in a picture of pictureSize ([w, h]).
export function boxInPicture(inputBox, originalSize, pictureSize) {
  const [w, h] = pictureSize;
  if (!inputBox || inputBox.length !== 4) return [0, 0, w, h];
  const [ow, oh] = originalSize && originalSize[0] > 0 && originalSize[1] > 0 ? originalSize : pictureSize;
  const sx = w / ow;
  const sy = h / oh;
  const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
  const x0 = clamp(Math.round(inputBox[0] * sx), 0, w - 1);
  const y0 = clamp(Math.round(inputBox[1] * sy), 0, h - 1);
  const x1 = clamp(Math.round(inputBox[2] * sx), x0 + 1, w);
  const y1 = clamp(Math.round(inputBox[3] * sy), y0 + 1, h);
  return [x0, y0, x1, y1];
}

// The mask resized to width × height (bilinear) and coloured through `table`: a canvas to draw with.
export function colouredMask(mask, table, width, height, stretch) {
  const values = stretch ? stretchContrast(mask.values) : mask.values;
  const grey = new OffscreenCanvas(mask.width, mask.height);
  const pixels = new ImageData(mask.width, mask.height);
  for (let i = 0; i < values.length; i += 1) {
    pixels.data.fill(values[i], 4 * i, 4 * i + 3);
    pixels.data[4 * i + 3] = 255;
  }
  grey.getContext('2d').putImageData(pixels, 0, 0);
  const out = new OffscreenCanvas(width, height);
  const ctx = out.getContext('2d', { willReadFrequently: true });
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(grey, 0, 0, width, height);
  const scaled = ctx.getImageData(0, 0, width, height);
  const d = scaled.data;
  for (let i = 0; i < d.length; i += 4) {
    const [r, g, b] = table[d[i]];
    d[i] = r;
    d[i + 1] = g;
    d[i + 2] = b;
    d[i + 3] = 255;
  }
  ctx.putImageData(scaled, 0, 0);
  return out;
}

// The size a picture of originalSize gets when its longest side is `side`.
export function fitted(originalSize, side) {
  const [w, h] = originalSize;
  const scale = side / Math.max(w, h, 1);
  return [Math.max(1, Math.round(w * scale)), Math.max(1, Math.round(h * scale))];
}

// Draw `picture` (an ImageBitmap, or null: a neutral grey) with `mask` over its box onto `canvas`.
export function drawOverlay(canvas, { picture, originalSize, inputBox, mask, table, alpha, stretch, side }) {
  const size = picture ? [picture.width, picture.height] : originalSize;
  const [w, h] = fitted(size, side);
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext('2d');
  if (picture) {
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = 'high';
    ctx.drawImage(picture, 0, 0, w, h);
  } else {
    ctx.fillStyle = '#808080';
    ctx.fillRect(0, 0, w, h);
  }
  if (!mask) return;
  const [x0, y0, x1, y1] = boxInPicture(inputBox, originalSize, [w, h]);
  ctx.globalAlpha = alpha;
  ctx.drawImage(colouredMask(mask, table, x1 - x0, y1 - y0, stretch), x0, y0);
  ctx.globalAlpha = 1;
}

export function drawLegend(canvas, table) {
  const ctx = canvas.getContext('2d');
  for (let i = 0; i < 256; i += 1) {
    const [r, g, b] = table[i];
    ctx.fillStyle = `rgb(${r} ${g} ${b})`;
    ctx.fillRect(i, 0, 1, canvas.height);
  }
}

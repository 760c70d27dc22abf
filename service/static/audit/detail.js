// The detail view of one prediction: the kept input, top-k bars, every attention module's mask over the
// input (module picker in network order, opacity, colour map, contrast stretch), the raw record and a download.

import { api, ApiError } from './api.js';
import { decodeMask, drawLegend, drawOverlay, loadColormaps, maskStats } from './overlay.js';

const MAIN_SIDE = 384;
const STRIP_SIDE = 112;
const $ = (id) => document.getElementById(id);

// What the view shows, for the current record and image.
const view = { record: null, images: [], image: 0, picture: null, masks: [], module: 0, objectUrls: [] };

// The audit record's images (or, for a fresh upload whose record is not readable, the predict response's).
function imagesOf(record) {
  const list = record.images || record.predictions || [];
  return list.map((img) => ({
    topK: img.top_k || [],
    attention: img.attention || [],
    originalSize: img.width && img.height ? [img.width, img.height] : null,
    inputBox: img.input_box || record.input_box || null,
  }));
}

export function formatTime(value) {
  if (value === undefined || value === null || value === '') return '';
  const date = typeof value === 'number' ? new Date(value * 1000) : new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  const pad = (n) => String(n).padStart(2, '0');
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} `
    + `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function element(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function renderMeta(record) {
  const model = record.model || {};
  const rows = [['Model', model.name], ['Version', model.version], ['Precision', model.precision],
    ['Time', formatTime(record.created_at)], ['Route', record.route],
    ['Latency', record.latency_ms === undefined ? undefined : `${record.latency_ms} ms`],
    ['Images', String(view.images.length)]];
  $('detail-meta').replaceChildren(...rows.filter(([, v]) => v !== undefined && v !== null && v !== '')
    .flatMap(([k, v]) => [element('dt', { textContent: k }), element('dd', { textContent: v })]));
}

function renderTopK(topK) {
  $('topk').replaceChildren(...topK.map(({ label, score }) => {
    const bar = element('span', { className: 'score-bar' });
    bar.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`;
    return element('li', {},
      element('span', { className: 'label', textContent: label }),
      element('span', { className: 'bar-track', ariaHidden: 'true' }, bar),
      element('span', { className: 'score', textContent: score.toFixed(3) }));
  }));
}

function saveBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = element('a', { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function renderRecordJson(record) {
  const text = JSON.stringify(record, null, 2);
  $('raw-json').textContent = text;
  $('download').onclick = () => saveBlob(new Blob([text], { type: 'application/json' }), `prediction-${record.id}.json`);
}

// The server's rendering of the overlay on screen (GET /v1/predictions/{id}/overlay.png), for reports and tickets.
async function downloadOverlay() {
  const current = view.masks[view.module];
  if (!current) return;
  const opts = options();
  const query = new URLSearchParams({ image: String(view.image), module: current.module, alpha: String(opts.alpha),
    colormap: opts.colormap, stretch: String(opts.stretch) });
  const id = view.record.id;
  const blob = await api(`v1/predictions/${encodeURIComponent(id)}/overlay.png?${query}`, { as: 'blob' });
  saveBlob(blob, `prediction-${id}-${view.image}-${current.module}.png`);
}

// The kept input of image n as an ImageBitmap; null when the service kept none (MACULA_AUDIT_INPUTS=none).
async function loadPicture(id, n, upload) {
  try {
    const blob = await api(`v1/predictions/${encodeURIComponent(id)}/images/${n}`, { as: 'blob' });
    return { bitmap: await createImageBitmap(blob), note: '' };
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 404) throw error;
  }
  if (upload && upload.file && n === 0) {
    return { bitmap: await createImageBitmap(upload.file), note: 'The service kept no copy of this input; '
      + 'showing the file uploaded from this tab.' };
  }
  return { bitmap: null, note: 'The service kept no copy of this input (MACULA_AUDIT_INPUTS=none): the masks '
    + 'are drawn over grey, in the input\'s proportions.' };
}

function options() {
  return { alpha: Number($('opacity').value) / 100, stretch: $('stretch').checked, colormap: $('colormap').value };
}

function describe(module, opts) {
  return `Attention mask of module ${module} over input image ${view.image + 1}, colour map ${opts.colormap}, `
    + `opacity ${Math.round(opts.alpha * 100)} %${opts.stretch ? ', contrast stretched' : ''}`;
}

async function draw() {
  const { colormaps } = await loadColormaps();
  const opts = options();
  const table = colormaps[opts.colormap];
  const image = view.images[view.image];
  const size = image.originalSize || (view.picture ? [view.picture.width, view.picture.height] : [1, 1]);
  const common = { picture: view.picture, originalSize: size, inputBox: image.inputBox, table, ...opts };
  const current = view.masks[view.module];
  drawOverlay($('overlay-canvas'), { ...common, mask: current && current.mask, side: MAIN_SIDE });
  $('overlay-canvas').setAttribute('aria-label', current ? describe(current.module, opts) : 'Input image');
  $('overlay-caption').textContent = current ? `Module ${current.module}` : 'No attention masks kept';
  if (current) {
    const { min, max, mean } = maskStats(current.mask.values);
    $('mask-stats').textContent = `Mask values: mean ${(mean / 255).toFixed(3)}, min ${(min / 255).toFixed(3)}, `
      + `max ${(max / 255).toFixed(3)}`;
    $('legend-low').textContent = opts.stretch ? (min / 255).toFixed(2) : '0';
    $('legend-high').textContent = opts.stretch ? (max / 255).toFixed(2) : '1';
  }
  drawLegend($('legend'), table);
  $('module-strip').querySelectorAll('li').forEach((item, i) => {
    const canvas = item.querySelector('canvas');
    drawOverlay(canvas, { ...common, mask: view.masks[i].mask, side: STRIP_SIDE });
    canvas.setAttribute('aria-label', describe(view.masks[i].module, opts));
    item.querySelector('button').setAttribute('aria-pressed', String(i === view.module));
  });
}

function selectModule(i, focus = false) {
  if (i < 0 || i >= view.masks.length) return;
  view.module = i;
  $('module-picker').value = String(i);
  draw();
  if (focus) $('module-strip').querySelectorAll('button')[i].focus();
}

function renderModules() {
  const names = view.masks.map((m) => m.module);
  $('module-picker').replaceChildren(...names.map((name, i) => element('option', { value: String(i), textContent: name })));
  $('module-picker').disabled = names.length === 0;
  $('no-masks').hidden = names.length > 0;
  $('module-strip').replaceChildren(...names.map((name, i) => {
    const canvas = element('canvas', { className: 'strip-canvas' });
    canvas.setAttribute('role', 'img');
    const button = element('button', { type: 'button', className: 'strip-button' }, canvas,
      element('span', { textContent: name }));
    button.addEventListener('click', () => selectModule(i));
    button.addEventListener('keydown', (event) => {
      const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
      if (step) {
        event.preventDefault();
        selectModule(Math.min(Math.max(i + step, 0), names.length - 1), true);
      }
    });
    return element('li', {}, button);
  }));
}

async function showImage(n, upload) {
  view.image = n;
  const image = view.images[n];
  const [picture, masks] = await Promise.all([
    loadPicture(view.record.id, n, upload),
    Promise.all(image.attention.map(async (entry) => ({ module: entry.module, mask: await decodeMask(entry.png) }))),
  ]);
  if (view.picture) view.picture.close();
  view.picture = picture.bitmap;
  view.masks = masks;
  view.module = Math.min(view.module, Math.max(masks.length - 1, 0));
  $('input-note').textContent = picture.note;
  $('input-note').hidden = !picture.note;
  renderTopK(image.topK);
  renderModules();
  $('module-picker').value = String(view.module);
  await draw();
}

let wired = false;
let onError = (error) => { throw error; };

function wireControls() {
  if (wired) return;
  wired = true;
  $('module-picker').addEventListener('change', (e) => selectModule(Number(e.target.value)));
  $('opacity').addEventListener('input', (e) => {
    $('opacity-value').textContent = `${e.target.value} %`;
    draw();
  });
  $('colormap').addEventListener('change', draw);
  $('stretch').addEventListener('change', draw);
  $('image-picker').addEventListener('change', (e) => showImage(Number(e.target.value)).catch(onError));
  $('overlay-controls').addEventListener('submit', (e) => e.preventDefault());
  $('download-overlay').addEventListener('click', () => downloadOverlay().catch(onError));
}

async function fillColormaps() {
  const { default: initial, colormaps } = await loadColormaps();
  if ($('colormap').options.length) return;
  $('colormap').replaceChildren(...Object.keys(colormaps).map((name) => element('option', { value: name, textContent: name })));
  $('colormap').value = initial;
}

// Show prediction `id`; `upload` = {response, file} when it was classified from this tab.
export async function showDetail(id, upload, reportError) {
  onError = reportError;
  wireControls();
  await fillColormaps();
  let record;
  try {
    record = await api(`v1/predictions/${encodeURIComponent(id)}`);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404 && upload)) throw error;
    record = upload.response; // auditing disabled: the predict response is all there is
  }
  view.record = record;
  view.images = imagesOf(record);
  view.module = 0;
  $('detail-heading').textContent = `Prediction ${record.id}`;
  renderMeta(record);
  renderRecordJson(record);
  $('image-picker').replaceChildren(...view.images.map((_, i) => element('option', { value: String(i), textContent: `${i + 1}` })));
  $('image-picker-label').hidden = view.images.length < 2;
  $('download-overlay').hidden = !view.images.some((image) => image.attention.length);
  if (view.images.length) await showImage(0, upload);
}

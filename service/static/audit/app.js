// The auditor's page: a list of predictions (GET /v1/predictions, one page at a time, filters in the address's
// hash so a view can be bookmarked), a detail view per prediction (#/p/{id}, detail.js) and an upload box.
// Thumbnails are fetched with the API key header (never in a URL) when their row scrolls into view.

import { api, storedKey, storeKey, whenKeyNeeded } from './api.js';
import { formatTime, showDetail } from './detail.js';

const PAGE_SIZE = 50;
const FILTERS = ['model', 'label', 'min_score', 'max_score', 'familiar', 'since', 'until'];
const $ = (id) => document.getElementById(id);
const uploads = new Map(); // id → {response, file} for predictions made from this tab
let thumbnailUrls = [];
let firstListRender = true;

function say(message, isError = false) {
  $('status').textContent = message;
  $('status').classList.toggle('error', isError);
}

function fail(error) {
  say(error.code && error.code !== 'http_error' ? `${error.message} (${error.code})` : String(error.message), true);
}

// ---------------------------------------------------------------- API key

function askForKey(message) {
  const dialog = $('key-dialog');
  dialog.querySelector('p').textContent = `${message} It is kept in this tab only (session storage) and sent as `
    + 'the X-API-Key header, never in a URL.';
  $('key-input').value = '';
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => {
      const key = $('key-input').value.trim();
      const save = dialog.returnValue === 'save' && key !== '';
      if (save) storeKey(key);
      resolve(save);
    }, { once: true });
  });
}

// ---------------------------------------------------------------- list

// One summary of GET /v1/predictions: {id, created_at, model: {name, version}, route, image_count, masks_kept,
// images: [{n, label, score, input_kept, familiar (models with a detector)}]}; the row shows its first image.
function summaryOf(item) {
  const model = item.model || {};
  const first = (item.images && item.images[0]) || {};
  return {
    id: item.id,
    model: model.name || '',
    version: model.version || '',
    label: first.label ?? '',
    score: first.score,
    images: item.image_count ?? (item.images || []).length,
    created: item.created_at,
    inputKept: first.input_kept !== false,
    masksKept: item.masks_kept !== false,
  };
}

const thumbnails = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    thumbnails.unobserve(entry.target);
    loadThumbnail(entry.target);
  }
}, { rootMargin: '200px' });

async function loadThumbnail(img) {
  try {
    const blob = await api(img.dataset.src, { as: 'blob' });
    const url = URL.createObjectURL(blob);
    thumbnailUrls.push(url);
    img.src = url;
  } catch {
    img.replaceWith(Object.assign(document.createElement('span'), { className: 'no-thumb', textContent: 'none kept' }));
  }
}

function cell(text, className) {
  const td = document.createElement('td');
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function row(summary) {
  const tr = document.createElement('tr');
  const thumb = document.createElement('td');
  if (summary.inputKept) {
    const img = Object.assign(document.createElement('img'), {
      className: 'thumb', width: 48, height: 48, alt: `Input of prediction ${summary.id}`, decoding: 'async',
    });
    img.dataset.src = `v1/predictions/${encodeURIComponent(summary.id)}/images/0`;
    thumbnails.observe(img);
    thumb.append(img);
  } else {
    thumb.append(Object.assign(document.createElement('span'), { className: 'no-thumb', textContent: 'none kept' }));
  }
  const link = Object.assign(document.createElement('a'), {
    href: `#/p/${encodeURIComponent(summary.id)}`, textContent: summary.id.slice(0, 12), className: 'row-link',
  });
  link.setAttribute('aria-label', `Open prediction ${summary.id}`);
  const open = cell('');
  open.append(link);
  if (summary.images > 1) open.append(` (+${summary.images - 1} images)`);
  if (!summary.masksKept) open.append(Object.assign(document.createElement('span'), { className: 'no-thumb', textContent: ' no masks' }));
  const score = typeof summary.score === 'number' ? summary.score.toFixed(3) : '';
  tr.append(thumb, open, cell(summary.label, 'label'), cell(score, 'num'), cell(summary.model),
    cell(summary.version, 'mono'), cell(formatTime(summary.created)));
  tr.addEventListener('click', (event) => { if (event.target.tagName !== 'A') link.click(); });
  return tr;
}

// datetime-local (the user's local time) → epoch seconds for the API; and back.
const toEpoch = (local) => String(Math.floor(new Date(local).getTime() / 1000));
function toLocal(epoch) {
  const date = new Date(Number(epoch) * 1000);
  return new Date(date.getTime() - date.getTimezoneOffset() * 60000).toISOString().slice(0, 19);
}

function fillFilterForm(params) {
  const form = $('filters');
  for (const name of FILTERS) {
    const value = params.get(name) || '';
    form.elements[name].value = (name === 'since' || name === 'until') && value ? toLocal(value) : value;
  }
}

async function showList(params) {
  fillFilterForm(params);
  const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
  for (const [name, value] of params) if (value !== '') query.set(name, value);
  const page = await api(`v1/predictions?${query}`);
  thumbnails.disconnect();
  thumbnailUrls.forEach((url) => URL.revokeObjectURL(url));
  thumbnailUrls = [];
  const rows = document.createDocumentFragment();
  for (const item of page.items) rows.append(row(summaryOf(item)));
  $('list').tBodies[0].replaceChildren(rows);
  $('list-empty').hidden = page.items.length > 0;
  $('next-page').disabled = !page.next_cursor;
  $('next-page').dataset.cursor = page.next_cursor || '';
  $('first-page').disabled = !params.get('cursor');
  if (firstListRender) {
    firstListRender = false;
    performance.mark('audit:list-rendered');
  }
}

function filtersFromForm() {
  const form = $('filters');
  const params = new URLSearchParams();
  for (const name of FILTERS) {
    const value = form.elements[name].value.trim();
    if (value) params.set(name, name === 'since' || name === 'until' ? toEpoch(value) : value);
  }
  return params;
}

function hashParams() {
  const queryAt = location.hash.indexOf('?');
  return new URLSearchParams(queryAt < 0 ? '' : location.hash.slice(queryAt + 1));
}

function listHash(params) {
  const text = params.toString();
  return text ? `#/?${text}` : '#/';
}

function onListKey(event) {
  const links = [...$('list').tBodies[0].querySelectorAll('a.row-link')];
  const at = links.indexOf(document.activeElement);
  const step = { ArrowDown: 1, ArrowUp: -1 }[event.key];
  if (!step || at < 0) return;
  event.preventDefault();
  links[Math.min(Math.max(at + step, 0), links.length - 1)].focus();
}

async function loadModels() {
  try {
    const { models } = await api('v1/models');
    const select = $('filters').elements.model;
    for (const model of models) select.append(new Option(model.name, model.name));
    select.value = hashParams().get('model') || '';
    const labels = new Set(models.flatMap((m) => m.classes || []));
    $('labels').replaceChildren(...[...labels].slice(0, 2000).map((label) => new Option('', label)));
  } catch {
    // the list still works without the model picker's names
  }
}

// ---------------------------------------------------------------- upload

async function upload(event) {
  event.preventDefault();
  const file = $('upload-file').files[0];
  if (!file) return;
  const body = new FormData();
  body.append('file', file);
  say(`Classifying ${file.name}…`);
  try {
    const response = await api('v1/predict?attention=true', { method: 'POST', body });
    uploads.set(response.id, { response, file });
    say(`Classified ${file.name}.`);
    location.hash = `#/p/${encodeURIComponent(response.id)}`;
  } catch (error) {
    fail(error);
  }
}

// ---------------------------------------------------------------- routing

async function route() {
  const hash = location.hash || '#/';
  const detail = hash.match(/^#\/p\/([^?]+)/);
  $('list-view').hidden = Boolean(detail);
  $('detail-view').hidden = !detail;
  try {
    if (detail) {
      const id = decodeURIComponent(detail[1]);
      await showDetail(id, uploads.get(id), fail);
      $('detail-heading').focus();
    } else {
      await showList(hashParams());
    }
    if (!$('status').classList.contains('error') && !$('status').textContent.startsWith('Classified')) say('');
  } catch (error) {
    fail(error);
  }
}

function start() {
  whenKeyNeeded(askForKey);
  $('key-button').addEventListener('click', async () => {
    if (await askForKey(storedKey() ? 'Replace the API key.' : 'Enter the API key.')) route();
  });
  $('filters').addEventListener('submit', (event) => {
    event.preventDefault();
    location.hash = listHash(filtersFromForm());
  });
  $('clear-filters').addEventListener('click', () => { location.hash = '#/'; });
  $('next-page').addEventListener('click', () => {
    const params = hashParams();
    params.set('cursor', $('next-page').dataset.cursor);
    location.hash = listHash(params);
  });
  $('first-page').addEventListener('click', () => {
    const params = hashParams();
    params.delete('cursor');
    location.hash = listHash(params);
  });
  $('list').addEventListener('keydown', onListKey);
  $('upload-form').addEventListener('submit', upload);
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && !$('detail-view').hidden && !$('key-dialog').open) location.hash = '#/';
  });
  window.addEventListener('hashchange', route);
  route();
  loadModels();
}

start();

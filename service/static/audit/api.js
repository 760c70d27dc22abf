// Calls to the Macula API from the auditor's page. Every call sends the API key (if one was given) as the
// X-API-Key header, never in a URL; a 401 asks for the key once (one prompt for all calls waiting) and retries.
// Paths are relative to the app's root, found from the page's own address (/audit/ → /), so the page also
// works behind a path prefix.

const KEY_STORAGE = 'macula.apiKey';
const appRoot = new URL('../', document.baseURI);

export class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.code = code || 'http_error';
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE) || '';
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

let askForKey = async () => false;
let pendingPrompt = null;

// fn(message) → Promise<boolean>: true when a new key was stored and the call should be retried.
export function whenKeyNeeded(fn) {
  askForKey = fn;
}

function promptOnce(message) {
  if (!pendingPrompt) pendingPrompt = askForKey(message).finally(() => { pendingPrompt = null; });
  return pendingPrompt;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return new ApiError(response.status, body.code, body.detail);
  } catch {
    return new ApiError(response.status, 'http_error', `${response.status} ${response.statusText}`);
  }
}

// GET (or POST with `body`) `path` relative to the app's root; JSON by default, a Blob with as: 'blob'.
export async function api(path, { method = 'GET', body, as = 'json', signal } = {}) {
  for (let attempt = 0; ; attempt += 1) {
    const key = storedKey();
    const sent = key;
    const headers = key ? { 'X-API-Key': key } : {};
    const response = await fetch(new URL(path, appRoot), { method, body, headers, signal, credentials: 'omit' });
    if (response.status === 401 && attempt < 2) {
      if (storedKey() !== sent) continue; // another call already got a new key
      const message = attempt === 0 ? 'This service needs an API key.' : 'That key was refused; try again.';
      if (await promptOnce(message)) continue;
    }
    if (!response.ok) throw await errorOf(response);
    return as === 'blob' ? response.blob() : response.json();
  }
}

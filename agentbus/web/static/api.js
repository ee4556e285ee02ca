// Talking to this server: JSON reads, JSON writes carrying the CSRF token, and live streams.

export const me = { user: null, role: null, csrf: "", sessions: [], lists_sessions: false };
let serverSkew = 0; // server clock minus ours, in seconds

export function now() {
  return Date.now() / 1000 + serverSkew;
}

export function serverNow(ts) {
  if (ts) serverSkew = ts - Date.now() / 1000;
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function answer(res) {
  let body = {};
  try {
    body = await res.json();
  } catch (_) {
    body = { error: `HTTP ${res.status}` };
  }
  if (!res.ok) {
    if (res.status === 401 && typeof window.onLoggedOut === "function") window.onLoggedOut();
    throw new ApiError(res.status, body.error || `HTTP ${res.status}`);
  }
  return body;
}

export async function get(path) {
  return answer(await fetch(path, { credentials: "same-origin", headers: { accept: "application/json" } }));
}

export async function post(path, data) {
  const res = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json", "x-csrf-token": me.csrf },
    body: JSON.stringify(data || {}),
  });
  return answer(res);
}

const conn = () => document.getElementById("conn");

// A server-sent event stream that reconnects by itself. The browser resends the last `id:` it saw
// (Last-Event-ID) when it reconnects; if it gives up (an HTTP error), we reopen with ?after=<last id>.
export class Live {
  constructor(url, handlers, { resumable = false } = {}) {
    this.url = url;
    this.handlers = handlers;
    this.resumable = resumable;
    this.lastId = null;
    this.closed = false;
    this.es = null;
    this.timer = null;
    this.open();
  }

  open() {
    if (this.closed) return;
    let url = this.url;
    if (this.resumable && this.lastId !== null) url += (url.includes("?") ? "&" : "?") + "after=" + this.lastId;
    const es = (this.es = new EventSource(url));
    this.status("connecting");
    es.onopen = () => this.status("live");
    es.onerror = () => {
      if (this.closed) return;
      this.status("reconnecting");
      if (es.readyState === EventSource.CLOSED) {
        clearTimeout(this.timer);
        this.timer = setTimeout(() => this.open(), 1500);
      }
    };
    for (const [name, fn] of Object.entries(this.handlers)) {
      es.addEventListener(name, (e) => {
        if (e.lastEventId) this.lastId = Number(e.lastEventId);
        const data = JSON.parse(e.data);
        if (data && data.now) serverNow(data.now);
        fn(data, e);
      });
    }
    for (const name of ["failed", "gone"]) {
      if (name in this.handlers) continue;
      es.addEventListener(name, (e) => {
        this.close();
        this.status("failed");
        const data = JSON.parse(e.data);
        if (this.handlers.error) this.handlers.error(data);
      });
    }
  }

  status(state) {
    const el = conn();
    if (!el) return;
    el.dataset.state = state;
    el.textContent = { live: "● live", connecting: "○ connecting", reconnecting: "○ reconnecting…", failed: "✕ stream failed", idle: "" }[state] || state;
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.es) this.es.close();
  }
}

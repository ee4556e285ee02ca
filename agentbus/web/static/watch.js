// Every session this user may see, kept live from /api/watch; the inbox and sessions pages subscribe.

import { Live } from "./api.js";

class Watch {
  constructor() {
    this.states = new Map();
    this.listeners = new Set();
    this.live = null;
    this.ready = false;
    this.error = "";
  }

  start() {
    if (this.live) return;
    this.live = new Live("/api/watch", {
      reset: (d) => {
        this.states.clear();
        for (const st of d.states) this.states.set(st.id, st);
        this.ready = true;
        this.emit(null);
      },
      states: (d) => {
        for (const st of d.states) this.states.set(st.id, st);
        this.emit(d.states.map((st) => st.id));
      },
      error: (d) => {
        this.error = d.error;
        this.emit(null);
      },
    });
  }

  stop() {
    if (this.live) this.live.close();
    this.live = null;
    this.states.clear();
    this.ready = false;
  }

  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  emit(changed) {
    const count = [...this.states.values()].filter((s) => s.needs_person).length;
    const el = document.getElementById("inbox-count");
    if (el) el.textContent = count ? String(count) : "";
    for (const fn of this.listeners) fn(changed);
  }
}

export const watch = new Watch();

// Sessions: every session this user may see, live, with filters and a search over prompt text.

import { h, clear, age, usd, num, link, badge } from "./dom.js";
import { now } from "./api.js";
import { watch } from "./watch.js";

const STATUSES = ["pending", "queued", "running", "waiting", "awaiting_approval", "evaluating", "paused", "completed", "failed", "cancelled"];

export function sessionsPage(root) {
  const status = h("select", { id: "f-status" }, h("option", { value: "" }, "any status"), STATUSES.map((s) => h("option", { value: s }, s)));
  const pool = h("select", { id: "f-pool" }, h("option", { value: "" }, "any pool"));
  const search = h("input", { type: "search", id: "f-search", placeholder: "search prompts and ids" });
  const body = h("tbody", {});
  const count = h("span", { class: "muted", id: "sessions-count" });
  clear(root).append(
    h("h1", {}, "Sessions"),
    h("div", { class: "filters row" }, status, pool, search, count),
    h("table", { class: "sessions" },
      h("thead", {}, h("tr", {}, ["session", "status", "pool", "age", "steps", "tokens", "cost", "prompt"].map((c) => h("th", {}, c)))),
      body));
  let pending = false;

  function render() {
    pending = false;
    const pools = new Set([...watch.states.values()].map((s) => s.pool).filter(Boolean));
    const known = new Set([...pool.options].map((o) => o.value));
    for (const p of [...pools].sort()) if (!known.has(p)) pool.append(h("option", { value: p }, p));
    const q = search.value.trim().toLowerCase();
    const rows = [...watch.states.values()]
      .filter((s) => (!status.value || s.status === status.value) && (!pool.value || s.pool === pool.value))
      .filter((s) => !q || s.prompt.toLowerCase().includes(q) || s.id.toLowerCase().includes(q))
      .sort((a, b) => (a.id < b.id ? 1 : -1));
    body.replaceChildren(...rows.map((s) => h("tr", { dataset: { session: s.id } },
      h("td", {}, link(s.id)), h("td", {}, badge(s.status)), h("td", {}, s.pool || "-"),
      h("td", { class: "num" }, s.created_ts ? age(now() - s.created_ts) : "?"),
      h("td", { class: "num" }, num(s.steps)), h("td", { class: "num" }, num(s.tokens)),
      h("td", { class: "num" }, usd(s.cost_usd)), h("td", { class: "prompt" }, s.prompt))));
    count.textContent = watch.ready ? `${rows.length} of ${watch.states.size}` : "loading…";
  }

  const later = () => { if (!pending) { pending = true; requestAnimationFrame(render); } };
  for (const el of [status, pool]) el.addEventListener("change", render);
  search.addEventListener("input", render);
  const unsubscribe = watch.subscribe(later);
  const timer = setInterval(later, 10000);
  render();
  return { stop() { unsubscribe(); clearInterval(timer); } };
}

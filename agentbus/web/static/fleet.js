// The fleet: pools (who serves them, backlog), live workers, spend against ceilings, holds.

import { h, clear, age, usd } from "./dom.js";
import { get, now } from "./api.js";

function table(headers, rows) {
  return h("table", {}, h("thead", {}, h("tr", {}, headers.map((c) => h("th", {}, c)))), h("tbody", {}, rows));
}

function part(title, data, draw) {
  return h("section", { class: "card", id: "fleet-" + title.toLowerCase() }, h("h2", {}, title), data.error ? h("p", { class: "error" }, data.error) : draw(data.ok));
}

function bar(used, limit) {
  if (!limit) return h("span", { class: "muted" }, "no ceiling known");
  const pct = Math.min((used / limit) * 100, 100);
  const fill = h("span", { class: pct >= 100 ? "fill over" : pct >= 80 ? "fill warn" : "fill" });
  fill.style.width = pct.toFixed(1) + "%";
  return h("span", { class: "gauge-row" }, h("span", { class: "bar" }, fill), ` ${usd(used)} of ${usd(limit)}`);
}

export function fleetPage(root) {
  const body = h("div", { id: "fleet" }, h("p", { class: "muted" }, "loading…"));
  clear(root).append(h("h1", {}, "Fleet"), body);
  let stopped = false;

  async function load() {
    let f;
    try {
      f = await get("/api/fleet");
    } catch (err) {
      body.replaceChildren(h("p", { class: "error" }, err.message));
      return;
    }
    const ceilings = f.ceilings || {};
    const poolCeil = ceilings.pools || {};
    const spend = f.spend.ok || { totals: {}, holds: {} };
    const total = Object.values(spend.totals).reduce((a, t) => a + (t.usd || 0), 0);
    body.replaceChildren(
      part("Pools", f.pools, (pools) => pools.length ? table(
        ["pool", "agents", "free slots", "waiting", "running", "oldest waiting", "served by"],
        pools.map((p) => h("tr", { dataset: { pool: p.name } }, h("td", {}, p.name), h("td", { class: "num" }, p.workers.length),
          h("td", { class: "num" }, p.free_slots), h("td", { class: "num" }, p.waiting), h("td", { class: "num" }, p.in_flight),
          h("td", { class: "num" }, p.oldest_waiting_s == null ? "-" : age(p.oldest_waiting_s)),
          h("td", { class: p.served ? "" : "error" }, p.served ? [...p.supervisors.map((s) => "supervisor " + s), p.workers.length ? `${p.workers.length} agent(s)` : ""].filter(Boolean).join(", ") : "nothing serves it")))) : h("p", { class: "muted" }, "no pools yet")),
      part("Workers", f.workers, (ws) => ws.length ? table(["pool", "worker", "where", "model", "heartbeat", "sessions"],
        ws.map((w) => h("tr", {}, h("td", {}, w.pool), h("td", {}, w.worker_id), h("td", {}, w.container || `${w.host}:${w.pid}`),
          h("td", {}, w.model || ""), h("td", { class: "num" }, age(now() - (w.heartbeat_ts || 0)) + " ago"),
          h("td", {}, (w.sessions || []).join(", ") || "-")))) : h("p", { class: "muted" }, "no live workers")),
      part("Spend", f.spend, (sp) => h("div", {},
        h("p", {}, "Fleet: ", bar(total, ceilings.fleet)),
        table(["pool", "spent", "calls", "since", "ceiling", "hold"],
          Object.keys({ ...sp.totals, ...sp.holds, ...poolCeil }).sort().map((name) => {
            const t = sp.totals[name] || { usd: 0, calls: 0 };
            const hold = sp.holds[name];
            return h("tr", { dataset: { pool: name } }, h("td", {}, name), h("td", { class: "num" }, usd(t.usd)), h("td", { class: "num" }, t.calls || 0),
              h("td", { class: "num" }, t.since_ts ? age(now() - t.since_ts) : "-"), h("td", {}, bar(t.usd || 0, poolCeil[name])),
              h("td", { class: hold ? "error" : "" }, hold ? `${hold.limit}: ${hold.detail}` : "-"));
          })),
        Object.keys(ceilings).length ? null : h("p", { class: "muted" }, "Ceilings live in the supervisor's pools file: start the view with --pools FILE to see them here."))));
  }

  load();
  const timer = setInterval(() => { if (!stopped) load(); }, 3000);
  return { stop() { stopped = true; clearInterval(timer); } };
}

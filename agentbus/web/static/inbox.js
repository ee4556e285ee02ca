// The inbox (landing page): only the sessions that need a person, each with why, for how long,
// what it cost so far, and the action right there.

import { h, clear, age, usd, link, badge } from "./dom.js";
import { now } from "./api.js";
import { watch } from "./watch.js";
import { act, approvalsBox, resumeBox } from "./actions.js";

function actionArea(st) {
  const note = h("span", { class: "note" });
  const can = st.can || {};
  if (!can.steer && !can.resume) return h("div", { class: "actions muted" }, "your role may only watch");
  const parts = [];
  if (st.status === "awaiting_approval" && can.steer) parts.push(approvalsBox(st.id, note));
  if (st.status === "waiting" && can.steer) {
    const answer = h("input", { type: "text", class: "answer", placeholder: "your answer" });
    parts.push(h("div", { class: "row" }, answer,
      h("button", { type: "button", class: "primary", "data-action": "answer",
        on: { click: () => answer.value.trim() && act(st.id, "say", { text: answer.value }, note) } }, "Answer")));
  }
  if (st.status === "paused") {
    if (can.steer && st.reason.startsWith("interrupted")) {
      const text = h("input", { type: "text", class: "answer", placeholder: "what next" });
      parts.push(h("div", { class: "row" }, text,
        h("button", { type: "button", "data-action": "say",
          on: { click: () => text.value.trim() && act(st.id, "say", { text: text.value }, note) } }, "Say")));
    }
    if (can.resume) parts.push(resumeBox(st.id, st.reason, note));
  }
  if (can.steer) {
    parts.push(h("div", { class: "row" }, h("button", { type: "button", class: "quiet", "data-action": "dismiss",
      on: { click: () => act(st.id, "dismiss", { note: "dismissed from the web view" }, note) } }, "Dismiss")));
  }
  return h("div", { class: "actions" }, parts, note);
}

// What a person typed survives a card being redrawn (its session changed while they typed).
function keepTyped(from, to) {
  for (const old of from.querySelectorAll("input, textarea")) {
    if (!old.value) continue;
    const key = old.name ? `[name="${old.name}"]` : old.className ? "." + old.className.split(" ")[0] : null;
    const twin = key && to.querySelector(`${old.tagName.toLowerCase()}${key}`);
    if (twin && !twin.value) twin.value = old.value;
  }
}

export function inboxPage(root) {
  const list = h("div", { id: "inbox", class: "inbox" });
  const empty = h("p", { class: "muted", id: "inbox-empty" }, "Nothing needs a person.");
  clear(root).append(h("h1", {}, "Inbox"), h("p", { class: "muted" }, "Sessions waiting for an answer or an approval, paused, or failed."), empty, list);
  const cards = new Map(); // id -> { el, key, fields }

  function card(st) {
    const waited = h("span", { class: "waited" });
    const el = h("article", { class: "card item", dataset: { session: st.id, status: st.status } },
      h("header", {}, badge(st.status), " ", link(st.id), " ", h("span", { class: "pool" }, st.pool || ""),
        h("span", { class: "spacer" }), waited, " · ", h("span", { class: "cost" }, usd(st.cost_usd))),
      h("p", { class: "why" }, st.why),
      h("p", { class: "prompt muted" }, st.prompt),
      actionArea(st));
    return { el, waited, key: `${st.status}|${st.why}|${st.tool_use_id}` };
  }

  function render() {
    const items = [...watch.states.values()].filter((s) => s.needs_person).sort((a, b) => a.since_ts - b.since_ts || (a.id < b.id ? -1 : 1));
    const keep = new Set(items.map((s) => s.id));
    for (const [id, c] of cards) if (!keep.has(id)) { c.el.remove(); cards.delete(id); }
    for (const st of items) {
      let c = cards.get(st.id);
      const key = `${st.status}|${st.why}|${st.tool_use_id}`;
      if (!c || c.key !== key) {
        const fresh = card(st);
        if (c) {
          keepTyped(c.el, fresh.el);
          c.el.replaceWith(fresh.el);
        }
        c = fresh;
        cards.set(st.id, c);
      } else {
        c.el.querySelector(".cost").textContent = usd(st.cost_usd);
      }
      c.since = st.since_ts;
      // in order, moving a card only when it is out of place: a moved node loses focus, and a
      // person typing into it (an answer, a raised limit) must not lose what they type
      const at = items.indexOf(st);
      if (list.children[at] !== c.el) list.insertBefore(c.el, list.children[at] || null);
    }
    empty.hidden = items.length > 0 || !watch.ready;
    tick();
  }

  function tick() {
    for (const c of cards.values()) c.waited.textContent = c.since ? `waiting ${age(now() - c.since)}` : "";
  }

  const unsubscribe = watch.subscribe(render);
  const timer = setInterval(tick, 5000);
  render();
  return { stop() { unsubscribe(); clearInterval(timer); } };
}

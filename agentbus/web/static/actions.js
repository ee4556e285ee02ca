// The controls a person uses on a session, shared by the inbox and the session page. Each one is a
// POST that the server turns into one event in the session's log, written as this person.

import { h, json } from "./dom.js";
import { post, get } from "./api.js";

export const LIMITS = [
  ["max_steps", "max_steps", "steps"],
  ["max_tool_calls", "max_tool_calls", "tool calls"],
  ["max_tokens", "max_tokens", "tokens"],
  ["max_usd", "max_usd", "USD"],
  ["max_wall", "max_wall_s", "seconds"],
];

export async function act(sessionId, verb, data, note) {
  note.textContent = "…";
  note.className = "note";
  try {
    const res = await post(`/api/sessions/${encodeURIComponent(sessionId)}/${verb}`, data);
    note.textContent = `done (#${res.seq})`;
    note.className = "note ok";
    return true;
  } catch (err) {
    note.textContent = err.message;
    note.className = "note error";
    return false;
  }
}

// Approve or deny each call that waits, with its whole input shown.
export function approvalsBox(sessionId, note) {
  const box = h("div", { class: "approvals" }, h("p", { class: "muted" }, "loading the calls that wait…"));
  get(`/api/sessions/${encodeURIComponent(sessionId)}/approvals`).then(({ approvals }) => {
    box.replaceChildren();
    if (!approvals.length) box.append(h("p", { class: "muted" }, "no call waits for a decision"));
    for (const a of approvals) {
      const reason = h("input", { type: "text", placeholder: "reason (the model reads it if you deny)", class: "reason" });
      box.append(h("div", { class: "approval", dataset: { call: a.tool_use_id } },
        h("div", {}, h("strong", {}, a.name), " ", h("span", { class: "muted" }, `call ${a.tool_use_id}, step ${a.step}`)),
        h("pre", { class: "tool-input" }, json(a.input)),
        h("div", { class: "row" },
          h("button", { type: "button", class: "primary", "data-action": "approve",
            on: { click: () => act(sessionId, "approve", { call_id: a.tool_use_id }, note) } }, "Approve"),
          h("button", { type: "button", class: "danger", "data-action": "deny",
            on: { click: () => act(sessionId, "approve", { call_id: a.tool_use_id, deny: true, reason: reason.value }, note) } }, "Deny"),
          reason)));
    }
  }, (err) => { box.replaceChildren(h("p", { class: "error" }, err.message)); });
  return box;
}

// Resume a paused session, raising the limits typed in (the one that stopped it first).
export function resumeBox(sessionId, reason, note) {
  const stopped = (reason || "").split(":")[0];
  const inputs = {};
  const fields = LIMITS.map(([name, field, unit]) => {
    const input = h("input", { type: "number", min: "0", step: "any", name: field, placeholder: unit, class: "limit" });
    inputs[field] = input;
    return h("label", { class: name === stopped ? "limit stopped" : "limit" }, name + " ", input);
  });
  const ordered = fields.sort((a, b) => (b.classList.contains("stopped") ? 1 : 0) - (a.classList.contains("stopped") ? 1 : 0));
  const go = () => {
    const budget = {};
    for (const [field, input] of Object.entries(inputs)) if (input.value !== "") budget[field] = Number(input.value);
    act(sessionId, "resume", { budget }, note);
  };
  return h("div", { class: "resume" }, h("div", { class: "limits" }, ordered),
    h("button", { type: "button", class: "primary", "data-action": "resume", on: { click: go } }, "Resume"));
}

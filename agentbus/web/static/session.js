// One session as it happens: the conversation (live, gapless across reconnects, paged back on
// demand), the controls this user's role allows, budget gauges, the delegation tree and the chart.

import { h, clear, age, usd, num, clock, json, link, badge } from "./dom.js";
import { get, now, Live } from "./api.js";
import { act, approvalsBox, resumeBox } from "./actions.js";
import { chart } from "./chart.js";

const PAGE = 200;

function textBlocks(content) {
  return content.filter((b) => b.type === "text").map((b) => b.text).join("\n");
}

function fold(summary, body, open) {
  return h("details", open ? { open: true } : {}, h("summary", {}, summary), body);
}

function pre(text, cls) {
  return h("pre", { class: cls || "" }, text);
}

// What one record looks like; every string from the log goes in as text.
function body(rec) {
  const e = rec.event;
  const who = (author) => h("span", { class: "author", title: "authenticated sender" }, author || rec.sender || "someone");
  switch (e.type) {
    case "session_created": {
      const t = e.task;
      return [h("div", { class: "label" }, "task by ", who(t.submitter), t.pool ? ` on ${t.pool}` : "", t.parent_session ? [" · child of ", link(t.parent_session)] : ""),
        pre(t.prompt, "prompt"),
        (t.criteria || []).length ? h("ul", { class: "criteria" }, t.criteria.map((c) => h("li", {}, "criterion: ", c))) : null,
        (t.checks || []).length ? h("ul", { class: "criteria" }, t.checks.map((c) => h("li", {}, "check: ", h("code", {}, c)))) : null];
    }
    case "routed": return [h("div", { class: "label" }, `routed to pool ${e.pool} (rule ${e.rule || "explicit"})`)];
    case "human_message": return [h("div", { class: "label" }, who(e.author), e.mode === "queue" ? " (follow-up)" : " (steer)"), pre(e.text, "human")];
    case "interrupt_requested": return [h("div", { class: "label" }, who(e.author), " interrupted"), e.text ? pre(e.text, "human") : null];
    case "message_delivered": return [h("div", { class: "label muted" }, `message #${e.message_seq} delivered with step ${e.step}`)];
    case "approval_requested": return [h("div", { class: "label" }, `approval requested for ${e.name} (call ${e.tool_use_id})`), fold("input", pre(json(e.input), "tool-input"), true)];
    case "approval_decided": return [h("div", { class: "label" }, e.approved ? "approved" : "denied", " by ", who(e.author), ` (call ${e.tool_use_id})`, e.reason ? `: ${e.reason}` : "")];
    case "tool_call_parked": return [h("div", { class: "label muted" }, `${e.name} waits for ${e.waiting_for}${e.detail ? " " + e.detail : ""}`)];
    case "session_paused": return [h("div", { class: "label" }, `paused: ${e.reason}${e.detail ? " (" + e.detail + ")" : ""}`)];
    case "inbox_dismissed": return [h("div", { class: "label muted" }, "dismissed by ", who(e.author), e.note ? `: ${e.note}` : "")];
    case "cancel_requested": return [h("div", { class: "label" }, "cancel requested by ", who(e.author), e.reason ? `: ${e.reason}` : "")];
    case "resume_requested": return [h("div", { class: "label" }, "resumed by ", who(e.author), " ", h("code", {}, JSON.stringify(e.budget || {})))];
    case "status_changed": return [h("div", { class: "label muted" }, `${e.status}${e.reason ? " (" + e.reason + ")" : ""}`)];
    case "session_claimed": return [h("div", { class: "label muted" }, `claimed by ${e.worker}${e.attempt > 1 ? ", attempt " + e.attempt : ""}, round ${e.round || 1}`)];
    case "model_responded": {
      const u = e.usage || {};
      const tokens = (u.input_tokens || 0) + (u.output_tokens || 0) + (u.cache_creation_input_tokens || 0) + (u.cache_read_input_tokens || 0);
      return [h("div", { class: "label" }, `step ${e.step} · ${e.model} · ${e.stop_reason || ""} · ${num(tokens)} tokens · ${usd(e.cost_usd)}`),
        e.content.map((b) => b.type === "text" ? pre(b.text, "model-text")
          : b.type === "tool_use" ? fold(`calls ${b.name}`, pre(json(b.input), "tool-input"), false)
          : fold(b.type, pre(json(b), "tool-input"), false))];
    }
    case "model_call_failed": return [h("div", { class: "label error" }, `step ${e.step}, attempt ${e.attempt}: ${e.error}`)];
    case "tool_call_started": return [fold(`${e.name} started${e.rerun ? " [re-run after crash]" : ""}`, pre(json(e.input), "tool-input"), false)];
    case "tool_call_completed": {
      const lines = e.output.split("\n").length;
      return [fold(`${e.name} ${e.is_error ? "failed" : "returned"} (${num(e.output.length)} chars)`, pre(e.output, e.is_error ? "tool-output error" : "tool-output"), lines <= 12 && e.output.length < 1500)];
    }
    case "question_asked": return [h("div", { class: "label" }, "asks a person"), pre(e.text, "question")];
    case "delegation_requested": return [h("div", { class: "label" }, "delegated to ", link(e.child_session), ` on ${e.pool || "the router's choice"}`), pre(e.prompt, "prompt")];
    case "delegation_completed": return [h("div", { class: "label" }, "child ", link(e.child_session), ` ${e.status}`), e.result ? pre(e.result, "model-text") : null];
    case "opinions_aggregated": return [h("div", { class: "label" }, "opinions"), h("ul", {}, e.results.map((r) => h("li", {}, link(r.session_id), ` on ${r.pool}: ${r.status}`, r.result ? pre(r.result, "model-text") : null)))];
    case "verdict_recorded": return [h("div", { class: "label" }, `round ${e.round}: `, h("strong", { class: "verdict v-" + e.verdict }, e.verdict), e.grader_model ? ` · graded by ${e.grader_model} · ${usd(e.cost_usd)}` : ""),
      (e.criteria || []).length || (e.checks || []).length ? h("table", { class: "verdict" },
        h("tbody", {}, (e.criteria || []).map((c) => h("tr", { class: c.passed ? "pass" : "fail" }, h("td", {}, c.passed ? "✓" : "✗"), h("td", {}, c.criterion), h("td", { class: "num" }, c.score == null ? "" : String(c.score)), h("td", {}, c.critique || ""))),
          (e.checks || []).map((c) => h("tr", { class: c.passed ? "pass" : "fail" }, h("td", {}, c.passed ? "✓" : "✗"), h("td", {}, h("code", {}, c.command)), h("td", { class: "num" }, c.exit_code == null ? "" : `exit ${c.exit_code}`), h("td", {}, c.output ? fold("output", pre(c.output, "tool-output"), false) : ""))))) : null,
      e.critique ? fold("critique", pre(e.critique), false) : null];
    case "revision_requested": return [h("div", { class: "label" }, `revision for round ${e.round}${e.fresh_start ? " (fresh start)" : ""}`), fold("critique", pre(e.critique), true)];
    case "budget_exceeded": return [h("div", { class: "label warn" }, `paused: ${e.limit} ${e.detail || ""}`)];
    case "session_ended": return [h("div", { class: "label" }, "ended ", badge(e.status), e.reason ? ` (${e.reason})` : ""), e.result ? pre(e.result, "model-text") : null];
    case "input_rejected": return [h("div", { class: "label error" }, `input rejected: ${e.reason}`)];
    case "invalid": return [h("div", { class: "label error" }, `invalid: ${e.reason}`), e.raw ? pre(e.raw) : null];
    default: return [h("div", { class: "label muted" }, `${e.type} (from a newer agentbus)`), fold("data", pre(json(e)), false)];
  }
}

function recordEl(rec, sessionId) {
  const el = h("article", { class: `rec t-${rec.event.type} ch-${rec.channel}`, dataset: { seq: rec.seq, type: rec.event.type } },
    h("div", { class: "meta" }, h("span", { class: "seq" }, `#${rec.seq}`), " ", clock(rec.event.ts), " ", h("span", { class: "type" }, rec.event.type.replaceAll("_", " "))),
    h("div", { class: "body" }, body(rec)));
  if (rec.clipped) {
    const more = h("button", { type: "button", class: "quiet show-all" }, "show all");
    more.addEventListener("click", async () => {
      more.disabled = true;
      try {
        const full = await get(`/api/sessions/${encodeURIComponent(sessionId)}/records/${rec.seq}`);
        const fresh = recordEl(full, sessionId);
        for (const d of fresh.querySelectorAll("details")) d.open = true;
        el.replaceWith(fresh);
      } catch (err) {
        more.textContent = err.message;
      }
    });
    el.append(h("div", { class: "clipped" }, "long output clipped ", more));
  }
  return el;
}

function gaugesEl(gauges) {
  return h("div", { class: "gauges" }, gauges.map((g) => {
    const pct = g.limit ? Math.min((g.used / g.limit) * 100, 100) : 0;
    const fill = h("span", { class: pct >= 100 ? "fill over" : pct >= 80 ? "fill warn" : "fill" });
    fill.style.width = pct.toFixed(1) + "%";
    const used = g.name === "max_usd" ? usd(g.used) : g.name === "max_wall" ? age(g.used) : num(g.used);
    const limit = g.limit == null ? "no limit set" : g.name === "max_usd" ? usd(g.limit) : g.name === "max_wall" ? age(g.limit) : num(g.limit);
    return h("div", { class: "gauge", dataset: { limit: g.name } }, h("span", { class: "gname" }, g.name),
      h("span", { class: "bar" }, fill), h("span", { class: "gval" }, `${used} / ${limit}`));
  }));
}

function treeEl(node, current) {
  const label = node.visible
    ? [node.id === current ? h("strong", {}, node.id) : link(node.id), " ", badge(node.status), " ", h("span", { class: "muted" }, `${usd(node.cost_usd)} ${node.prompt}`)]
    : [h("span", { class: "muted" }, `${node.id} (not visible to you)`)];
  return h("li", { dataset: { session: node.id } }, label,
    node.children.length ? h("ul", {}, node.children.map((c) => treeEl(c, current))) : null,
    node.more ? h("span", { class: "muted" }, " …") : null);
}

export function sessionPage(root, sessionId, onLoaded = () => {}) {
  const title = h("div", { class: "title" });
  const controls = h("section", { class: "controls card", id: "controls", hidden: true });
  const records = h("div", { id: "records", class: "records" });
  const earlier = h("button", { type: "button", id: "earlier", class: "quiet", hidden: true }, "load earlier");
  const gauges = h("div", { id: "gauges" });
  const treeBox = h("div", { id: "tree" });
  const chartBox = h("div", { id: "chart" });
  const error = h("p", { class: "error", id: "session-error" });
  clear(root).append(h("div", { class: "session" },
    h("div", { class: "main-col" }, title, controls, error, earlier, records),
    h("aside", { class: "side-col" },
      h("section", { class: "card" }, h("h2", {}, "Budget"), gauges),
      h("section", { class: "card" }, h("h2", {}, "Cost and time per step"), chartBox),
      h("section", { class: "card" }, h("h2", {}, "Delegation"), treeBox))));

  let state = null, points = [], lastGauges = [], firstSeq = null, lastSeq = 0, pending = null;
  const note = h("span", { class: "note", id: "action-note" });
  const say = h("textarea", { id: "say-text", rows: 3, placeholder: "a message for the model: steer now, or queue a follow-up for the end of its turn" });
  const dyn = h("div", { class: "dyn" });
  let dynKey = "";

  function renderTitle() {
    const st = state;
    title.replaceChildren(...[h("h1", {}, h("span", { class: "sid" }, st.id), " ", badge(st.status)),
      h("p", { class: "facts" }, `pool ${st.pool || "-"} · by ${st.submitter || "?"} · round ${st.round} · ${num(st.steps)} steps · ${num(st.tool_calls)} tool calls · ${num(st.tokens)} tokens · ${usd(st.cost_usd)} · ${st.created_ts ? age(now() - st.created_ts) + " old" : ""}`),
      st.reason ? h("p", { class: "reason" }, st.reason) : null,
      st.result ? fold("result", pre(st.result, "model-text"), st.terminal) : null].filter(Boolean));
  }

  function renderControls() {
    const st = state, can = st.can || {};
    controls.hidden = !(can.steer || can.resume);
    if (controls.hidden) return;
    if (!controls.firstChild) {
      const send = (verb, data) => act(sessionId, verb, data, note).then((ok) => { if (ok && data.text) say.value = ""; });
      controls.append(h("h2", {}, "Steer"), h("div", { id: "steer-box" }, say, h("div", { class: "row" },
        h("button", { type: "button", class: "primary", "data-action": "steer", on: { click: () => say.value.trim() && send("say", { text: say.value }) } }, "Steer"),
        h("button", { type: "button", "data-action": "queue", on: { click: () => say.value.trim() && send("say", { text: say.value, queue: true }) } }, "Queue follow-up"),
        h("button", { type: "button", "data-action": "interrupt", on: { click: () => send("interrupt", { text: say.value }) } }, "Interrupt"),
        h("button", { type: "button", class: "danger", "data-action": "cancel", on: { click: () => confirm("Cancel this session?") && send("cancel", {}) } }, "Cancel session"))),
        dyn, note);
    }
    document.getElementById("steer-box").hidden = !can.steer;
    const key = `${st.status}|${st.tool_use_id}|${st.reason}|${can.steer}|${can.resume}`;
    if (key === dynKey) return;
    dynKey = key;
    const parts = [];
    if (st.status === "awaiting_approval" && can.steer) parts.push(h("h2", {}, "Approve or deny"), approvalsBox(sessionId, note));
    if (st.status === "paused" && can.resume) parts.push(h("h2", {}, "Resume"), resumeBox(sessionId, st.reason, note));
    if (st.needs_person && can.steer) parts.push(h("div", { class: "row" }, h("button", { type: "button", class: "quiet", "data-action": "dismiss", on: { click: () => act(sessionId, "dismiss", {}, note) } }, "Dismiss from the inbox")));
    dyn.replaceChildren(...parts);
    for (const b of controls.querySelectorAll("[data-action=steer],[data-action=interrupt],[data-action=cancel]")) b.disabled = st.terminal;
  }

  function renderSide() {
    gauges.replaceChildren(gaugesEl(lastGauges));
    chartBox.replaceChildren(chart(points));
  }

  function showTree(t) {
    treeBox.replaceChildren(h("ul", { class: "tree" }, treeEl(t.root, t.current)));
  }

  function add(rec, where) {
    if (rec.seq <= lastSeq && where !== "before") return; // already shown
    const el = recordEl(rec, sessionId);
    if (where === "before") records.prepend(el);
    else if (pending) pending.append(el);
    else records.append(el);
    if (where !== "before") lastSeq = rec.seq;
  }

  function showEarlier(count) {
    earlier.hidden = !count;
    earlier.textContent = `load earlier (${num(count)} more)`;
  }

  earlier.addEventListener("click", async () => {
    earlier.disabled = true;
    try {
      const page = await get(`/api/sessions/${encodeURIComponent(sessionId)}/records?before=${firstSeq}&limit=${PAGE}`);
      const frag = document.createDocumentFragment();
      for (const rec of page.records) frag.append(recordEl(rec, sessionId));
      records.prepend(frag);
      if (page.records.length) firstSeq = page.records[0].seq;
      showEarlier(page.earlier);
    } catch (err) {
      error.textContent = err.message;
    } finally {
      earlier.disabled = false;
    }
  });

  const live = new Live(`/api/sessions/${encodeURIComponent(sessionId)}/stream?tail=${PAGE}`, {
    history: (d) => {
      if (d.resumed_after === null && lastSeq === 0) {
        firstSeq = d.first_seq;
        showEarlier(d.earlier);
      }
      pending = document.createDocumentFragment();
    },
    record: (rec) => add(rec),
    summary: (d) => {
      if (pending) records.append(pending);
      pending = null;
      records.dataset.loaded = "true";
      state = d.state;
      points = d.points;
      lastGauges = d.gauges;
      renderTitle();
      renderControls();
      renderSide();
      if (!performance.getEntriesByName("agentbus:conversation-shown").length) performance.mark("agentbus:conversation-shown");
      onLoaded();
    },
    tree: showTree,
    state: (d) => {
      state = d.state;
      lastGauges = d.gauges;
      if (d.point) points.push(d.point);
      renderTitle();
      renderControls();
      renderSide();
    },
    error: (d) => { error.textContent = d.error; },
  }, { resumable: true });
  const timer = setInterval(() => { if (state && !state.terminal) { renderTitle(); } }, 10000);
  return { stop() { live.close(); clearInterval(timer); document.getElementById("conn").dataset.state = "idle"; document.getElementById("conn").textContent = ""; } };
}

// Building the document: text only ever goes in as text (textContent / text nodes), never as markup.

const SVG = "http://www.w3.org/2000/svg";

function fill(el, props, children) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.setAttribute("class", value);
    else if (key === "text") el.textContent = String(value);
    else if (key === "on") for (const [ev, fn] of Object.entries(value)) el.addEventListener(ev, fn);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "value") el.value = value;
    else if (key === "checked" || key === "open" || key === "hidden" || key === "disabled") el[key] = true;
    else el.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function h(tag, props, ...children) {
  return fill(document.createElement(tag), props, children);
}

export function s(tag, props, ...children) {
  return fill(document.createElementNS(SVG, tag), props, children);
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function age(seconds) {
  seconds = Math.max(seconds, 0);
  if (seconds < 120) return `${Math.round(seconds)}s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)}m`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)}h`;
  return `${Math.round(seconds / 86400)}d`;
}

export function usd(x) {
  return "$" + Number(x || 0).toFixed(4);
}

export function num(x) {
  return Number(x || 0).toLocaleString("en");
}

export function clock(ts) {
  if (!ts) return "";
  return new Date(ts * 1000).toLocaleTimeString("en-GB", { hour12: false });
}

export function json(value) {
  return JSON.stringify(value, null, 2);
}

export function link(sessionId, text) {
  return h("a", { href: "/s/" + encodeURIComponent(sessionId), "data-nav": "", class: "sid" }, text || sessionId);
}

export function badge(status) {
  return h("span", { class: "badge st-" + status, "data-status": status }, status.replace("_", " "));
}

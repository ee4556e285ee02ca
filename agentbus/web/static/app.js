// The web view: a login, then four pages (inbox, sessions, one session, fleet), routed by path.

import { h, clear } from "./dom.js";
import { me, get, post, ApiError } from "./api.js";
import { watch } from "./watch.js";
import { inboxPage } from "./inbox.js";
import { sessionsPage } from "./sessions.js";
import { sessionPage } from "./session.js";
import { fleetPage } from "./fleet.js";

const main = () => document.getElementById("main");
let current = null; // the page on screen: { stop() }

function route(path) {
  if (path === "/" || path === "") return ["inbox", () => (watch.start(), inboxPage(main()))];
  if (path === "/sessions") return ["sessions", () => (watch.start(), sessionsPage(main()))];
  if (path === "/fleet") return ["fleet", () => (watch.start(), fleetPage(main()))];
  const m = path.match(/^\/s\/([A-Za-z0-9_-]{1,64})$/);
  // a long session loads first; the list behind the inbox count waits for it
  if (m) return ["session", () => sessionPage(main(), m[1], () => watch.start())];
  return ["missing", () => { clear(main()).append(h("p", { class: "muted" }, "No such page.")); return { stop() {} }; }];
}

export function go(path, push = true) {
  if (push && path !== location.pathname) history.pushState({}, "", path);
  show();
}

function show() {
  if (current) current.stop();
  current = null;
  if (!me.user) {
    loginPage();
    return;
  }
  const [name, start] = route(location.pathname);
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("here", a.dataset.page === name);
  document.body.dataset.page = name;
  current = start();
}

function loginPage() {
  document.body.dataset.page = "login";
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  const area = h("textarea", { id: "creds", rows: 9, placeholder: "# agentbus credentials: user …\nuser = \"…\"\nseed = \"SU…\"", spellcheck: "false", autocomplete: "off" });
  const file = h("input", { type: "file", id: "creds-file" });
  const error = h("p", { class: "error", id: "login-error" });
  const submit = async () => {
    error.textContent = "";
    try {
      const who = await post("/api/login", { credentials: area.value });
      area.value = "";
      Object.assign(me, who);
      signedIn();
    } catch (err) {
      error.textContent = err.message;
    }
  };
  file.addEventListener("change", () => {
    const f = file.files[0];
    if (!f) return;
    f.text().then((text) => { area.value = text; file.value = ""; submit(); });
  });
  clear(main()).append(
    h("section", { class: "login card" },
      h("h1", {}, "Log in"),
      h("p", {}, "With your agentbus credentials file (", h("code", {}, "agentbus auth add NAME --role ROLE"),
        " makes one; ", h("code", {}, "agentbus up"), " prints the admin's). It is sent once, to this server, which connects to NATS as you and keeps the connection, not the file; your browser keeps only a session cookie. What you may see and do is what your role lets that connection do."),
      h("label", {}, "Choose the file ", file),
      h("p", { class: "muted" }, "or paste it:"),
      area,
      h("div", { class: "row" }, h("button", { type: "button", id: "login", class: "primary", on: { click: submit } }, "Log in")),
      error));
}

function signedIn() {
  document.getElementById("nav").hidden = false;
  document.getElementById("logout").hidden = false;
  document.getElementById("who").textContent = `${me.user} · ${me.role || "nats user"}`;
  show();
}

window.onLoggedOut = () => {
  if (!me.user) return;
  me.user = null;
  watch.stop();
  show();
};

document.addEventListener("click", (e) => {
  const a = e.target.closest("a[data-nav]");
  if (!a || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
  e.preventDefault();
  go(a.getAttribute("href"));
});
window.addEventListener("popstate", () => show());

document.getElementById("logout").addEventListener("click", async () => {
  try {
    await post("/api/logout", {});
  } finally {
    me.user = null;
    watch.stop();
    show();
  }
});

(async () => {
  try {
    Object.assign(me, await get("/api/me"));
    signedIn();
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    me.user = null;
    show();
  }
})();

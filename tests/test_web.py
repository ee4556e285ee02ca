"""The web view's server without a browser: login and cookies, CSRF on every POST, hosts, headers,
gapless resumption of a session stream, paging, and what the page is told a role may do.

Real nats-server with authorization on; requests are raw HTTP/1.1, as any script could send them.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from starlette.routing import Route

import agentbus
from agentbus.config import Settings
from agentbus.roles import Identity
from agentbus.subjects import Namespace
from agentbus.web.logins import COOKIE
from agentbus.web.reads import read_ceilings
from agentbus.web.views import capabilities, clip
from tests.conftest import AsUser
from tests.webtools import Served, http, serve, sse_events

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def web(settings: Settings) -> AsyncIterator[Served]:
    async with serve(settings, tail=3) as served:
        yield served


async def log_in(web: Served, creds: Settings) -> tuple[str, str]:
    """(cookie header value, CSRF token) of a fresh login with the credentials of `creds`."""
    text = Path(creds.creds).read_text()  # noqa: ASYNC240 - a small file
    reply = await http(web.url, "POST", "/api/login", body={"credentials": text}, headers={"Origin": web.url})
    assert reply.status == 200, reply.body
    cookie = reply.headers["set-cookie"].split(";")[0]
    return cookie, reply.json()["csrf"]


async def test_login_sets_an_httponly_samesite_strict_cookie_and_keeps_no_credentials_on_disk(
    web: Served, as_user: AsUser, settings: Settings
) -> None:
    operator = as_user("olga", "operator")
    text = Path(operator.creds).read_text()  # noqa: ASYNC240 - a small file
    reply = await http(web.url, "POST", "/api/login", body={"credentials": text}, headers={"Origin": web.url})
    assert reply.status == 200
    flags = [f.strip().lower() for f in reply.headers["set-cookie"].split(";")]
    assert flags[0].startswith(f"{COOKIE}=") and "httponly" in flags and "samesite=strict" in flags
    assert "seed" not in reply.body.decode() and "SU" not in reply.json()["csrf"][:2]
    assert reply.json()["user"] == f"olga-{settings.prefix}" and reply.json()["role"] == "operator"
    assert not list(Path(tempfile.gettempdir()).glob("agentbus-web-*/login.creds"))  # noqa: ASYNC240 - gone
    me = await http(web.url, path="/api/me", headers={"Cookie": reply.headers["set-cookie"].split(";")[0]})
    assert me.status == 200 and me.json()["user"] == f"olga-{settings.prefix}"
    assert (await http(web.url, path="/api/me")).status == 401


async def test_credentials_the_server_does_not_know_are_refused(web: Served, tmp_path: Path) -> None:
    from agentbus.auth import Credentials, new_seed, render_creds

    stranger = render_creds(Credentials(identity=Identity(user="nobody", role="admin"), seed=new_seed()))
    reply = await http(web.url, "POST", "/api/login", body={"credentials": stranger}, headers={"Origin": web.url})
    assert reply.status == 401 and "refused the credentials" in reply.json()["error"]
    garbage = await http(web.url, "POST", "/api/login", body={"credentials": "hello"}, headers={"Origin": web.url})
    assert garbage.status == 401 and "set-cookie" not in garbage.headers


async def test_every_post_route_refuses_another_origin_and_a_missing_csrf_token(
    web: Served, as_user: AsUser, client: agentbus.Client
) -> None:
    sid = await client.submit("x", pool="nobody")
    cookie, csrf = await log_in(web, as_user("olga", "operator"))
    posts = [r.path for r in web.app.routes if isinstance(r, Route) and "POST" in (r.methods or ())]
    assert {"/api/login", "/api/logout", "/api/sessions/{session_id}/{verb}"} <= set(posts)
    for path in posts:
        path = path.replace("{session_id}", sid).replace("{verb}", "say")
        good = {"Cookie": cookie, "X-CSRF-Token": csrf}
        for headers in (
            {**good, "Origin": "http://evil.example"},
            {**good, "Referer": "http://evil.example/page"},
            good,  # neither Origin nor Referer
        ):
            reply = await http(web.url, "POST", path, body={"text": "x"}, headers=headers)
            assert reply.status == 403 and "origin" in reply.json()["error"], (path, headers)
        if path != "/api/login":
            reply = await http(web.url, "POST", path, body={"text": "x"}, headers={"Cookie": cookie, "Origin": web.url})
            assert reply.status == 403 and "CSRF" in reply.json()["error"], path  # logout and verbs need the token
    assert (await http(web.url, path="/api/me", headers={"Cookie": cookie})).status == 200  # still logged in
    said = await http(web.url, "POST", f"/api/sessions/{sid}/say", body={"text": "from the page"},
                      headers={"Cookie": cookie, "X-CSRF-Token": csrf, "Origin": web.url})  # fmt: skip
    assert said.status == 200
    assert [r.seq for r in await client.show(sid)][-1] == said.json()["seq"]


async def test_an_unknown_host_is_refused_and_responses_carry_the_security_headers(web: Served) -> None:
    page = await http(web.url, path="/")
    assert page.status == 200 and b'<script type="module" src="/static/app.js">' in page.body
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    rebound = await http(web.url, path="/", headers={"Host": "evil.example"})  # DNS rebinding
    assert rebound.status == 400


async def test_a_stream_resumed_with_last_event_id_sends_exactly_the_records_after_it(
    web: Served, as_user: AsUser, client: agentbus.Client
) -> None:
    sid = await client.submit("x", pool="nobody")
    for i in range(6):
        await client.say(sid, f"message {i}")
    logged = [r.seq for r in await client.show(sid)]
    cookie, _ = await log_in(web, as_user("olga", "operator"))
    path = f"/api/sessions/{sid}/stream"

    fresh = await sse_events(web.url, path, cookie=cookie)
    ids = [int(i) for i, kind, _ in fresh if kind == "record" and i is not None]
    assert ids == logged[-3:]  # the last `tail` records
    history = next(d for _, kind, d in fresh if kind == "history")
    assert history["first_seq"] == logged[-3] and history["earlier"] == len(logged) - 3

    resumed = await sse_events(web.url, path, cookie=cookie, last_event_id=logged[2])
    assert [int(i) for i, kind, _ in resumed if kind == "record"] == logged[3:]
    summary = resumed[-1][2]
    assert summary["state"]["last_seq"] == logged[-1] and summary["state"]["events"] == len(logged)

    page = await http(web.url, path=f"/api/sessions/{sid}/records?before={logged[-3]}&limit=2",
                      headers={"Cookie": cookie})  # fmt: skip
    assert [r["seq"] for r in page.json()["records"]] == logged[-5:-3] and page.json()["earlier"] == len(logged) - 5


async def test_long_strings_are_clipped_for_the_page_and_whole_on_show_all(
    web: Served, as_user: AsUser, client: agentbus.Client
) -> None:
    sid = await client.submit("x", pool="nobody")
    seq = await client.say(sid, "y" * 10_000)
    cookie, _ = await log_in(web, as_user("olga", "operator"))
    events = await sse_events(web.url, f"/api/sessions/{sid}/stream", cookie=cookie)
    (shown,) = [d for i, kind, d in events if kind == "record" and i == str(seq)]
    assert shown["clipped"] and len(shown["event"]["text"]) == 4000
    whole = await http(web.url, path=f"/api/sessions/{sid}/records/{seq}", headers={"Cookie": cookie})
    assert whole.json()["event"]["text"] == "y" * 10_000 and "clipped" not in whole.json()
    assert clip({"a": ["z" * 5]}, 3) == ({"a": ["zzz"]}, True)


def test_the_page_is_told_only_what_a_roles_permissions_allow() -> None:
    ns = Namespace("agentbus")

    def can(role: str, sessions: tuple[str, ...] = ()) -> dict[str, bool]:
        return capabilities(Identity(user="u", role=role, sessions=sessions), ns, "s1", "general")  # type: ignore[arg-type]

    assert can("admin") == can("operator") == {"steer": True, "resume": True}
    assert can("codriver", ("s1",)) == {"steer": True, "resume": False}
    assert can("codriver", ("s2",)) == {"steer": False, "resume": False}
    assert can("observer", ("s1",)) == can("observer") == {"steer": False, "resume": False}


def test_ceilings_come_from_the_pools_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_TEST_CEILING", "12.5")
    pools = tmp_path / "pools.toml"
    pools.write_text('ceiling_usd = 100\n[pools.a]\nceiling_usd = "${WEB_TEST_CEILING}"\n[pools.b]\nmin = 1\n')
    assert read_ceilings(str(pools)) == {"fleet": 100.0, "pools": {"a": 12.5, "b": None}}
    assert read_ceilings(None) == {}


@pytest.mark.timeout(120)
def test_agentbus_up_starts_the_web_view_and_prints_its_url(tmp_path: Path) -> None:
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "agentbus.cli", "up", "--port", "0", "--store-dir", str(tmp_path / "store")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = ""
        for line in proc.stdout:
            found = re.search(r"web view: (http://127\.0\.0\.1:\d+/) \(log in with the credentials file (\S+)\)", line)
            url = found.group(1) if found else url
            if "Ctrl-C stops" in line:
                break
        assert url, "up printed no web view URL"
        for line in proc.stdout:  # the web view says when it listens
            if "web view on" in line:
                break
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200 and b"/static/app.js" in page.read()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_compose_runs_the_web_view_on_the_hosts_loopback_without_credentials() -> None:
    import yaml

    compose = Path(__file__).resolve().parents[1] / "compose"
    web = yaml.safe_load((compose / "compose.yaml").read_text())["services"]["web"]
    assert web["command"][0] == "web" and web["ports"] == ["127.0.0.1:${WEB_PORT:-8765}:8765"]
    assert web["environment"]["AGENTBUS_CREDS"] == "" and not any("creds" in v for v in web["volumes"])
    host = yaml.safe_load((compose / "host-network.yaml").read_text())["services"]["web"]
    assert host["network_mode"] == "host" and host["command"][1:3] == ["--host", "127.0.0.1"]
    assert "ports" not in host and not any("creds" in v for v in host["volumes"])


async def test_a_session_the_user_may_not_read_ends_its_stream_with_the_refusal(
    web: Served, as_user: AsUser, client: agentbus.Client
) -> None:
    granted = await client.submit("yours", pool="nobody")
    other = await client.submit("not yours", pool="nobody")
    cookie, _ = await log_in(web, as_user("obi", "observer", sessions=[granted]))
    (event,) = await sse_events(web.url, f"/api/sessions/{other}/stream", cookie=cookie, until="failed")
    assert event[1] == "failed" and "not permitted" in event[2]["error"]
    (gone,) = await sse_events(web.url, "/api/sessions/nosuchsession/stream", cookie=cookie, until="failed")
    assert "not permitted" in gone[2]["error"]  # not granted either: no hint whether it exists

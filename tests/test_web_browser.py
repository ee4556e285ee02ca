"""The web view in a real browser: headless Chromium (Debian's) driven by Playwright, against the real
web server, a real nats-server with authorization on, and agents on the real anthropic SDK talking
to the fake Messages API. One browser for the module, a fresh context (cookies, storage) per test.
Screenshots of every page go to test-artifacts/web/.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import agentbus
from agentbus.config import Settings
from agentbus.messages import (
    ApprovalDecided,
    HumanMessage,
    ModelResponded,
    ResumeRequested,
    SessionCreated,
    Task,
    ToolCallCompleted,
    ToolCallStarted,
)
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response
from tests.conftest import AsUser
from tests.helpers import POOL, Gate, agent, until
from tests.webtools import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, Served, browser_missing, serve

pytestmark = pytest.mark.timeout(90)
Request = dict[str, Any]
WAIT_MS = 15_000  # every wait in the page has this deadline; no test asserts how fast anything was

if not browser_missing():
    from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

    expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    missing = browser_missing()
    if missing and os.environ.get("AGENTBUS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"AGENTBUS_REQUIRE_BROWSER=1 but {missing}")
    if missing:
        pytest.skip(missing)
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context(viewport={"width": 1400, "height": 900})
    ctx.set_default_timeout(WAIT_MS)
    try:
        yield ctx
    finally:
        await ctx.close()


@pytest.fixture
async def web(settings: Settings) -> AsyncIterator[Served]:
    async with serve(settings) as served:
        yield served


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def log_in(context: BrowserContext, web: Served, settings: Settings, path: str = "/", *, shoot: str = "") -> Page:
    """Open `path`, get the login form, and log in with the credentials file of `settings`."""
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    # a 401 before logging in is the page asking who you are; any other console error is a bug
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "status of 401" not in m.text else None)
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(web.url + path)
    await page.locator("#creds").wait_for()
    if shoot:
        await shot(page, shoot)
    await page.locator("#creds").fill(Path(settings.creds).read_text())  # noqa: ASYNC240 - a small file
    await page.locator("#login").click()
    await expect(page.locator("#nav")).to_be_visible()
    return page


def page_errors(page: Page) -> list[str]:
    return list(page.errors)  # type: ignore[attr-defined]


async def shown_seqs(page: Page) -> list[int]:
    return [
        int(s) for s in await page.locator("#records [data-seq]").evaluate_all("els => els.map(e => e.dataset.seq)")
    ]


def turns(request: Request) -> int:
    return sum(1 for m in request["messages"] if m["role"] == "assistant")


def texts(message: dict[str, Any]) -> list[str]:
    return [b.get("text", "") for b in message["content"] if b.get("type") == "text"]


async def status_is(client: agentbus.Client, sid: str, *statuses: str) -> bool:
    return (await client.state(sid)).status in statuses


def _write_then_done(request: Request) -> Request:
    if turns(request) == 0:
        return tool_use_response("write_file", {"path": "out.txt", "content": "hello from the page"}, id="tu_w")
    return text_response("written")


# --- the tests -----------------------------------------------------------------------------------------


async def test_the_inbox_shows_a_session_awaiting_approval_and_approving_it_from_the_page_runs_the_tool(
    client: agentbus.Client, settings: Settings, as_user: AsUser, web: Served, context: BrowserContext, tmp_path: Path
) -> None:
    operator = as_user("olga", "operator")
    with FakeMessagesAPI(responder=_write_then_done) as api:
        async with agent(settings, api, tmp_path, approve=("write_file",)):
            sid = await client.submit("write the greeting", pool=POOL)
            await until(lambda: status_is(client, sid, "awaiting_approval"), "the approval request")
            page = await log_in(context, web, operator, shoot="login")
            item = page.locator(f".item[data-session='{sid}']")
            await expect(item.locator(".tool-input")).to_contain_text('"path": "out.txt"')
            await expect(item.locator(".why")).to_contain_text("approve or deny: write_file")
            await shot(page, "inbox")
            assert not (tmp_path / sid / "out.txt").exists()
            await item.locator("[data-action=approve]").click()
            state = await client.wait(sid, timeout=20)
            await expect(item).to_have_count(0)  # it left the inbox
    assert state.status == "completed"
    assert (tmp_path / sid / "out.txt").read_text() == "hello from the page"
    decided = [(r.sender, r.event.approved) for r in await client.show(sid) if isinstance(r.event, ApprovalDecided)]
    assert decided == [(f"olga-{settings.prefix}", True)]
    assert page_errors(page) == []


async def test_from_the_inbox_a_question_is_answered_and_a_paused_session_resumed_with_a_raised_limit(
    client: agentbus.Client, settings: Settings, as_user: AsUser, web: Served, context: BrowserContext, tmp_path: Path
) -> None:
    def responder(request: Request) -> Request:
        prompt = json.dumps(request["messages"][0])
        if "ask" in prompt and turns(request) == 0:
            return tool_use_response("ask_human", {"question": "which colour?"}, id="tu_q")
        if "ask" in prompt:
            answer = request["messages"][-1]["content"][0]["content"]
            return text_response(f"painted {answer}")
        if turns(request) == 0:
            return tool_use_response("read_file", {"path": "a.txt"}, id="tu_r")
        return text_response("finished after the raise")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, tools=("read_file", "ask_human")):
            asks = await client.submit("ask me", pool=POOL)
            pauses = await client.submit("two steps", pool=POOL, budget=agentbus.messages.Budget(max_steps=1))
            await until(lambda: status_is(client, asks, "waiting"), "the question")
            await until(lambda: status_is(client, pauses, "paused"), "the budget pause")
            page = await log_in(context, web, as_user("olga", "operator"))
            question = page.locator(f".item[data-session='{asks}']")
            await expect(question.locator(".why")).to_contain_text("asks: which colour?")
            paused = page.locator(f".item[data-session='{pauses}']")
            await expect(paused.locator(".why")).to_contain_text("paused: max_steps")
            await shot(page, "inbox-question-and-pause")
            await question.locator("input.answer").fill("blue")
            await question.locator("[data-action=answer]").click()
            await paused.locator("input[name=max_steps]").fill("5")
            await expect(paused.locator("input[name=max_steps]")).to_have_value("5")
            await paused.locator("[data-action=resume]").click()
            await until(lambda: status_is(client, asks, "completed"), "the answered session to finish", timeout=20)
            await until(lambda: status_is(client, pauses, "completed"), "the resumed session to finish", timeout=20)
            await expect(page.locator(".item")).to_have_count(0)
    assert (await client.state(asks)).result.startswith("painted") and "blue" in (await client.state(asks)).result
    assert (await client.state(pauses)).result == "finished after the raise"
    raised = [r.event.budget.max_steps for r in await client.show(pauses) if isinstance(r.event, ResumeRequested)]
    assert raised == [5]
    assert page_errors(page) == []


async def test_a_live_session_page_shows_a_new_event_soon_after_it_is_written(
    client: agentbus.Client, settings: Settings, as_user: AsUser, web: Served, context: BrowserContext
) -> None:
    sid = await client.submit("wait here", pool="nobody")  # no agent: only the test writes
    page = await log_in(context, web, as_user("olga", "operator"), f"/s/{sid}")
    await expect(page.locator("#records")).to_have_attribute("data-loaded", "true")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    written = time.monotonic()
    seq = await client.say(sid, "a new event, live")
    await expect(page.locator(f"#records [data-seq='{seq}']")).to_contain_text("a new event, live")
    print(f"web: event #{seq} shown {time.monotonic() - written:.3f}s after it was written")  # a figure, not a check
    await shot(page, "session-live")
    assert page_errors(page) == []


async def test_steering_from_the_page_reaches_the_models_next_request(
    client: agentbus.Client, settings: Settings, as_user: AsUser, web: Served, context: BrowserContext, tmp_path: Path
) -> None:
    gate = Gate()

    def responder(request: Request) -> Request:
        if turns(request) == 0:
            gate.hold()
            return tool_use_response("read_file", {"path": "notes.txt"}, id="tu_1")
        return text_response("done as steered")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, gates=(gate,)):
            sid = await client.submit("summarise the notes", pool=POOL)
            await gate.wait_reached()
            codriver = as_user("cora", "codriver", sessions=[sid])
            page = await log_in(context, web, codriver, f"/s/{sid}")
            await expect(page.locator("#records")).to_have_attribute("data-loaded", "true")
            await page.locator("#say-text").fill("only the first paragraph, please")
            await page.locator("[data-action=steer]").click()
            await expect(page.locator("#action-note")).to_contain_text("done (#")
            await expect(page.locator("#records .t-human_message")).to_contain_text("only the first paragraph")
            await shot(page, "session-steer")
            gate.open()
            state = await client.wait(sid, timeout=20)
            await expect(page.locator("#records .t-session_ended")).to_have_count(1)
            await shot(page, "session")
        requests = [body for body, _ in api.requests]
    assert state.status == "completed" and state.result == "done as steered"
    assert f"[message from cora-{settings.prefix}] only the first paragraph, please" in texts(
        requests[1]["messages"][-1]
    )
    assert page_errors(page) == []


async def test_after_the_stream_is_dropped_and_restored_the_page_shows_every_event_exactly_once(
    client: agentbus.Client, settings: Settings, as_user: AsUser, web: Served, context: BrowserContext
) -> None:
    sid = await client.submit("wait here", pool="nobody")
    page = await log_in(context, web, as_user("olga", "operator"), f"/s/{sid}")
    first = await client.say(sid, "before the drop")
    await expect(page.locator(f"#records [data-seq='{first}']")).to_have_count(1)
    await context.set_offline(True)  # the browser cannot come back until we say so
    web.web.logins.drop_streams()  # the server ends every stream (as a proxy or a restart would)
    await expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting")
    during = [await client.say(sid, f"while disconnected {i}") for i in range(3)]
    await context.set_offline(False)
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=30_000)
    after = await client.say(sid, "after the reconnect")
    await expect(page.locator(f"#records [data-seq='{after}']")).to_have_count(1)
    logged = [r.seq for r in await client.show(sid)]
    seqs = await shown_seqs(page)
    await shot(page, "session-reconnected")
    assert seqs == logged, "every record once, in order"
    assert set(during) < set(seqs)
    for text in ("before the drop", "while disconnected 0", "while disconnected 2", "after the reconnect"):
        assert await page.locator("#records .t-human_message", has_text=text).count() == 1


async def test_an_observers_page_has_no_controls_and_a_forged_post_is_refused_by_nats(
    client: agentbus.Client, settings: Settings, as_user: AsUser, web: Served, context: BrowserContext
) -> None:
    sid = await client.submit("watch only", pool="nobody")
    await client.say(sid, "something to read")
    observer = as_user("obi", "observer", sessions=[sid])
    page = await log_in(context, web, observer, f"/s/{sid}")
    await expect(page.locator("#records")).to_have_attribute("data-loaded", "true")
    await expect(page.locator("#records .t-human_message")).to_contain_text("something to read")
    await expect(page.locator("#controls")).to_be_hidden()
    assert await page.locator("[data-action]").count() == 0
    assert await page.locator("textarea, input").count() == 0
    await shot(page, "session-observer")
    before = [r.seq for r in await client.show(sid)]

    me = await (await context.request.get(web.url + "/api/me")).json()
    headers = {"origin": web.url, "x-csrf-token": me["csrf"], "content-type": "application/json"}
    forged = await context.request.post(f"{web.url}/api/sessions/{sid}/say", headers=headers,
                                        data=json.dumps({"text": "forged steer"}))  # fmt: skip
    assert forged.status == 403
    assert "not permitted" in (await forged.json())["error"]  # NATS said no, not the page
    cancel = await context.request.post(f"{web.url}/api/sessions/{sid}/cancel", headers=headers, data="{}")
    assert cancel.status == 403
    no_token = await context.request.post(f"{web.url}/api/sessions/{sid}/say", data=json.dumps({"text": "x"}),
                                          headers={"origin": web.url, "content-type": "application/json"})  # fmt: skip
    assert no_token.status == 403 and "CSRF" in (await no_token.json())["error"]
    cross = await context.request.post(f"{web.url}/api/sessions/{sid}/say", data=json.dumps({"text": "x"}),
                                       headers={**headers, "origin": "http://evil.example"})  # fmt: skip
    assert cross.status == 403 and "origin" in (await cross.json())["error"]
    assert [r.seq for r in await client.show(sid)] == before  # nothing was written
    assert page_errors(page) == []


async def test_a_model_output_holding_a_script_tag_is_shown_as_text(
    client: agentbus.Client, settings: Settings, as_user: AsUser, web: Served, context: BrowserContext, tmp_path: Path
) -> None:
    evil = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"><b>bold?</b>'
    with FakeMessagesAPI() as api:
        api.script([text_response(evil)])
        async with agent(settings, api, tmp_path):
            sid = await client.submit(f"say this: {evil}", pool=POOL)
            await client.wait(sid, timeout=20)
    page = await log_in(context, web, as_user("olga", "operator"), f"/s/{sid}")
    reply = page.locator("#records .t-model_responded .model-text")
    await expect(reply).to_have_text(evil)
    await shot(page, "session-escaped")
    assert await page.evaluate("window.pwned") is None
    assert await page.locator("#records script, #records img, #records b, #main script").count() == 0
    assert await page.locator(".title .model-text").inner_text() == evil  # the result, in the header


async def test_the_session_page_shows_the_delegation_tree_the_chart_and_budget_and_other_pages_list_them(
    client: agentbus.Client, settings: Settings, as_user: AsUser, web: Served, context: BrowserContext, tmp_path: Path
) -> None:
    def responder(request: Request) -> Request:
        prompt = json.dumps(request["messages"][0])
        if "the child part" in prompt:
            return text_response("child done")
        if turns(request) == 0:
            return tool_use_response("delegate", {"prompt": "the child part"}, id="tu_d")
        if turns(request) == 1:
            return tool_use_response("read_file", {"path": "x.txt"}, id="tu_r")
        return text_response("parent done")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, concurrency=2):
            parent = await client.submit(
                "a delegating parent", pool=POOL, budget=agentbus.messages.Budget(max_steps=10)
            )
            assert (await client.wait(parent, timeout=30)).status == "completed"
    (child,) = (await client.state(parent)).children
    page = await log_in(context, web, as_user("olga", "operator"), f"/s/{parent}")
    await expect(page.locator("#tree li[data-session]")).to_have_count(2)
    await expect(page.locator(f"#tree a[href='/s/{child}']")).to_be_visible()
    await expect(page.locator("#chart svg circle")).to_have_count(3)
    await expect(page.locator("#gauges [data-limit=max_steps]")).to_contain_text("3 / 10")
    await shot(page, "session-delegation")
    await page.locator(f"#tree a[href='/s/{child}']").click()
    await expect(page.locator(".title .sid")).to_have_text(child)
    await expect(page.locator(f"#tree a[href='/s/{parent}']")).to_be_visible()

    await page.locator("#nav a[data-page=sessions]").click()
    await expect(page.locator(f"table.sessions tr[data-session='{parent}']")).to_be_visible()
    await page.locator("#f-search").fill("delegating")
    await expect(page.locator("table.sessions tbody tr")).to_have_count(1)
    await page.locator("#f-search").fill("")
    await page.locator("#f-status").select_option("completed")
    await expect(page.locator("table.sessions tbody tr")).to_have_count(2)
    await shot(page, "sessions")
    await page.locator("#nav a[data-page=fleet]").click()
    await expect(page.locator("#fleet")).to_contain_text("Spend")
    await expect(page.locator(f"#fleet-pools tr[data-pool='{POOL}']")).to_be_visible()  # an operator reads backlogs
    await expect(page.locator(f"#fleet-spend tr[data-pool='{POOL}']")).to_contain_text("$0.0004")
    await shot(page, "fleet")
    assert page_errors(page) == []


async def test_a_session_of_10000_events_opens_on_its_last_page_and_pages_back(
    client: agentbus.Client, settings: Settings, as_user: AsUser, web: Served, context: BrowserContext
) -> None:
    sid = agentbus.client.new_session_id()
    await client.log.append(sid, SessionCreated(id="created", task=Task(session_id=sid, prompt="a long one")),
                            channel="control")  # fmt: skip
    events: list[Any] = []
    for step in range(1, 3334):
        events += [
            ModelResponded(id=f"step-{step}", step=step, model="m", content=({"type": "text", "text": f"step {step}"},
                           {"type": "tool_use", "id": f"t{step}", "name": "bash", "input": {"command": "ls"}})),
            ToolCallStarted(id=f"go-{step}", step=step, tool_use_id=f"t{step}", name="bash", input={"command": "ls"}),
            ToolCallCompleted(id=f"done-{step}", step=step, tool_use_id=f"t{step}", name="bash", output="x\n" * 100),
        ]  # fmt: skip
    for i in range(0, len(events), 500):
        await client.log.append_many(sid, events[i : i + 500])
    assert len(await client.show(sid)) == 10_000
    page = await log_in(context, web, as_user("olga", "operator"), "/sessions")
    figures = []
    for _ in range(3):
        await page.goto(f"{web.url}/s/{sid}")
        await expect(page.locator("#records")).to_have_attribute("data-loaded", "true", timeout=30_000)
        # from the start of the navigation to the conversation on screen, as the page measured it
        shown = "performance.getEntriesByName('agentbus:conversation-shown')[0].startTime"
        figures.append(await page.evaluate(shown) / 1000)
    print(f"web: a 10,000-event session page loaded in {', '.join(f'{f:.2f}s' for f in figures)}")  # not a check
    await expect(page.locator("#records [data-seq]")).to_have_count(200)
    await expect(page.locator("#earlier")).to_contain_text("9,800 more")
    await page.locator("#earlier").click()
    await expect(page.locator("#records [data-seq]")).to_have_count(400)
    seqs = await shown_seqs(page)
    assert seqs == sorted(seqs) and len(set(seqs)) == 400
    assert seqs[-1] == (await client.state(sid)).last_seq
    await shot(page, "session-10000")
    human = await client.say(sid, "still live at 10,001")
    await expect(page.locator(f"#records [data-seq='{human}']")).to_have_count(1)
    assert isinstance((await client.show(sid))[-1].event, HumanMessage)

"""Authentication and scoped reads on a real server: an observer granted one session follows it live
and nothing else, a revoked user is cut off, refusals are one line with exit code 6, TLS works."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import agentbus
from agentbus.auth import AuthStore, find_context, read_creds, write_context
from agentbus.config import Settings
from agentbus.errors import NatsUnreachable, NotAuthenticated, NotPermitted
from agentbus.messages import HumanMessage, SessionEnded, StatusChanged
from agentbus.roles import Identity
from agentbus.server import NatsServer, find_binary
from tests.conftest import AsUser
from tests.helpers import POOL, free_port, raw_connect


async def test_an_observer_granted_one_session_follows_it_live_from_the_start_and_reads_nothing_else(
    client: agentbus.Client, as_user: AsUser
) -> None:
    mine = await client.submit("watch me", pool=POOL)
    theirs = await client.submit("not yours", pool=POOL)
    await client.say(mine, "before the tap")
    observer = as_user("olga", "observer", sessions=[mine])
    async with agentbus.connect(settings=observer) as seen:
        tap = seen.tap(mine, start="start")
        first = [await anext(tap) for _ in range(3)]  # history: created, routed, the message
        with pytest.raises(NotPermitted, match="say, cancel"):
            await seen.cancel(mine)  # while it runs: an ended one is refused before anything is sent
        for i in range(3):  # live, while the tap is open
            await client.log.append(mine, StatusChanged(id=f"live-{i}", status="running", reason=f"step {i}"))
        await client.log.append(mine, SessionEnded(id="ended", status="completed", result="done"))
        live = [rec async for rec in _until_ended(tap)]
        listed = await seen.sessions()
        with pytest.raises(NotPermitted, match="observer"):
            await seen.show(theirs)
        with pytest.raises(NotPermitted, match="read every session"):
            await anext(seen.tap(None, start="start"))
    seqs = [r.seq for r in first + live]
    assert seqs == [r.seq for r in await client.show(mine)]  # every record, in order, none twice
    assert [type(r.event).__name__ for r in live] == ["StatusChanged"] * 3 + ["SessionEnded"]
    assert isinstance(first[2].event, HumanMessage) and first[2].sender == client.bus.user
    assert [s.session_id for s in listed] == [mine]


async def _until_ended(tap):  # type: ignore[no-untyped-def]
    async for rec in tap:
        yield rec
        if isinstance(rec.event, SessionEnded):
            return


async def test_the_cli_refuses_an_observer_in_one_line_naming_the_action_and_role(
    client: agentbus.Client, as_user: AsUser, nats_server: NatsServer
) -> None:
    sid = await client.submit("someone's work", pool=POOL)
    observer = as_user("olga", "observer", sessions=[sid])
    env = {**os.environ, "AGENTBUS_CREDS": observer.creds}
    base = [sys.executable, "-m", "agentbus.cli"]
    where = ["--nats", nats_server.url, "--prefix", observer.prefix]
    cancel = await asyncio.to_thread(
        subprocess.run, [*base, "cancel", sid, *where], capture_output=True, text=True, env=env, timeout=60
    )
    show = await asyncio.to_thread(
        subprocess.run, [*base, "show", sid, *where], capture_output=True, text=True, env=env, timeout=60
    )
    assert cancel.returncode == 6, cancel.stderr
    assert cancel.stderr.count("\n") == 1
    assert "not permitted: say, cancel, interrupt, approve or dismiss" in cancel.stderr and "observer" in cancel.stderr
    assert show.returncode == 0, show.stderr  # reading the granted session is fine


async def test_a_revoked_user_is_cut_off_and_refused_from_then_on(
    client: agentbus.Client, as_user: AsUser, nats_server: NatsServer
) -> None:
    sid = await client.submit("watched", pool=POOL)
    observer = as_user("olga", "observer", sessions=[sid])
    user = read_creds(observer.creds).identity.user
    bus = await agentbus.bus.Bus.connect(observer)
    try:
        await agentbus.Client(bus).show(sid)  # works before
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "agentbus.cli", "auth", "revoke", user, "--store-dir", str(nats_server.store_dir)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0 and f"revoked {user}" in out.stdout and "1 server(s) reloaded" in out.stdout
        await asyncio.wait_for(bus._link.closed.wait(), 10)  # the server dropped its connection for good
    finally:
        await bus.close()
    with pytest.raises(NotAuthenticated, match="unknown there or revoked"):
        await agentbus.bus.Bus.connect(observer)


def test_auth_add_writes_private_credentials_and_list_shows_roles_and_grants(tmp_path: Path) -> None:
    store = tmp_path / "store"
    base = [sys.executable, "-m", "agentbus.cli", "auth"]
    env = {**os.environ, "AGENTBUS_STORE_DIR": str(store)}
    init = subprocess.run([*base, "init", "--admin", "root"], capture_output=True, text=True, env=env, check=True)
    added = subprocess.run(
        [*base, "add", "olga", "--role", "observer", "--session", "s1", "--out", str(tmp_path / "o.creds")],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    listed = subprocess.run([*base, "list"], capture_output=True, text=True, env=env, check=True)
    bad = subprocess.run(
        [*base, "add", "x", "--role", "agent", "--session", "s1"], capture_output=True, text=True, env=env, check=False
    )
    creds = read_creds(added.stdout.strip())
    assert "root.creds" in init.stdout
    assert creds.identity == Identity(user="olga", role="observer", sessions=("s1",))
    assert (tmp_path / "o.creds").stat().st_mode & 0o777 == 0o600
    assert creds.seed not in (store / "auth" / "users.json").read_text()  # the server keeps public keys only
    assert creds.seed not in (store / "auth" / "authorization.conf").read_text()
    assert any(line.split()[:2] == ["olga", "observer"] and "s1" in line for line in listed.stdout.splitlines())
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--session grants apply to" in bad.stderr


async def test_a_local_context_lets_the_person_who_started_the_server_connect_without_options(
    nats_server: NatsServer, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTBUS_CONTEXT_DIR", str(tmp_path))  # this test's alone
    assert nats_server.admin_creds is not None
    write_context(nats_server.url, nats_server.admin_creds)
    assert find_context(nats_server.url.replace("127.0.0.1", "localhost")) is not None
    async with agentbus.connect(settings=Settings(nats_url=nats_server.url, prefix=prefix)) as client:
        assert client.bus.identity.role == "admin"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, check=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command makes the test's certificate")
async def test_tls_with_a_self_signed_certificate_works_and_an_unknown_one_is_refused(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    with NatsServer(store_dir=tmp_path / "nats", admin="admin", tls_cert=cert, tls_key=key) as server:
        assert server.url.startswith("tls://")
        settings = Settings(nats_url=server.url, prefix="tls", creds=str(server.admin_creds), tls_ca=str(cert))
        async with agentbus.connect(settings=settings) as client:
            sid = await client.submit("over TLS", pool=POOL)
            shown = await client.show(sid)
        with pytest.raises(NatsUnreachable, match="TLS"):
            await agentbus.bus.Bus.connect(settings.with_(tls_ca=""))  # the system's CAs never signed it
    assert len(shown) == 2


def test_the_server_keeps_its_users_across_restarts(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path, admin="admin") as first:
        creds = first.admin_creds
        assert creds is not None
        seed = read_creds(creds).seed
        store = AuthStore(tmp_path / "auth")
        assert [u.identity.user for u in store.users()] == ["admin"]
    with NatsServer(store_dir=tmp_path, admin="someone-else") as again:
        assert again.admin_creds == creds and read_creds(creds).seed == seed


async def test_a_tap_whose_consumer_vanishes_goes_on_from_the_next_sequence_with_no_gap_or_duplicate(
    client: agentbus.Client, settings: Settings
) -> None:
    sid = await client.submit("follow me", pool=POOL)
    tap = client.tap(sid, start="start")
    before = [await anext(tap) for _ in range(2)]
    # what a failover does to a reader's memory consumer: it is gone, and its heartbeats with it
    nc = await raw_connect(settings)
    try:
        stream = client.bus.ns.sessions_stream
        taps = [c.name for c in await nc.jetstream().consumers_info(stream) if c.name.startswith("tap")]
        assert len(taps) == 1
        await nc.jetstream().delete_consumer(stream, taps[0])
    finally:
        await nc.close()
    for i in range(3):
        await client.log.append(sid, StatusChanged(id=f"after-{i}", status="running", reason=str(i)))
    after = [await asyncio.wait_for(anext(tap), 30) for _ in range(3)]
    await tap.aclose()
    assert [r.seq for r in before + after] == [r.seq for r in await client.show(sid)]


def test_auth_init_then_a_server_with_a_pid_file_in_the_store_as_compose_starts_it(tmp_path: Path) -> None:
    """compose's nats entrypoint: `auth init --store-dir /`, then `nats-server --pid /auth/pids/<host>.pid`
    with the generated block included; a later revoke reloads that server."""
    store = tmp_path / "store"
    base = [sys.executable, "-m", "agentbus.cli", "auth"]
    env = {**os.environ, "AGENTBUS_STORE_DIR": str(store)}
    subprocess.run([*base, "init", "--admin", "root"], capture_output=True, text=True, env=env, check=True)
    conf = store / "nats.conf"
    conf.write_text('include "auth/authorization.conf"\n')  # include paths are relative to the file
    pid_file = store / "auth" / "pids" / "nats-1.pid"
    server = subprocess.Popen(
        [find_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(free_port()), "--pid", str(pid_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(200):  # a started server writes its pid; a refused one exits
            if pid_file.exists() or server.poll() is not None:
                break
            time.sleep(0.05)
        assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
        subprocess.run([*base, "add", "olga", "--role", "observer"], capture_output=True, env=env, check=True)
        out = subprocess.run([*base, "revoke", "olga"], capture_output=True, text=True, env=env, check=True)
        assert "1 server(s) reloaded" in out.stdout
        assert "not reloaded" not in out.stderr
        # compose/cluster.yaml: three nodes in three containers, each pid 1 in its own, write their pid
        # files into the one shared store; from one container all three name its own server
        for node in ("nats-2", "nats-3"):
            (pid_file.parent / f"{node}.pid").write_text(pid_file.read_text())
        subprocess.run([*base, "add", "pia", "--role", "observer"], capture_output=True, env=env, check=True)
        out = subprocess.run([*base, "revoke", "pia"], capture_output=True, text=True, env=env, check=True)
        assert "1 server(s) reloaded" in out.stdout  # it said 3: one process signalled three times
        assert "2 more server(s) of this store in other containers (pid files nats-2, nats-3)" in out.stderr
    finally:
        server.terminate()
        server.wait(10)
        if server.stderr:
            server.stderr.close()

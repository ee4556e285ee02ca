"""A real Docker engine for the docker-spawner and compose tests, or a clear skip.

The image is built from this checkout (layers cached, so a second build is quick) on a base
image given by AGENTBUS_BASE_IMAGE, or the locally built `agentbus-base:bookworm`
(compose/base-image.sh), or `python:3.11-slim` when that is present. With
AGENTBUS_REQUIRE_DOCKER=1 (set by .ci/run) a missing engine fails instead of skipping,
so CI cannot pass by skipping these tests.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import docker

ROOT = Path(__file__).parents[1]
TEST_IMAGE = "agentbus:test"
BASES = ("agentbus-base:bookworm", "python:3.11-slim")


def unavailable(reason: str) -> None:
    """Skip with `reason`, or fail when AGENTBUS_REQUIRE_DOCKER=1 (CI) says these tests must run."""
    if os.environ.get("AGENTBUS_REQUIRE_DOCKER") == "1":
        pytest.fail(f"AGENTBUS_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(reason)


def engine_unreachable() -> str | None:
    """Why the engine DOCKER_HOST names (else the local socket) cannot be reached, or None.

    docker-py leaks the socket of a connect that fails (docker/transport/unixconn.py never closes
    it), a ResourceWarning that `filterwarnings = ["error"]` turns into a failed run on a machine
    without Docker; so look with a socket of our own, closed on every path, before asking it.
    """
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    url = urllib.parse.urlparse(host)
    try:
        if url.scheme in ("unix", "http+unix"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(url.path)
        elif url.scheme in ("tcp", "http", "https") and url.hostname:
            with socket.create_connection((url.hostname, url.port or 2375), timeout=10):
                pass
    except OSError as err:
        return f"{host}: {err.strerror or err}"
    return None  # reachable, or a scheme (ssh) docker-py must try itself


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    import docker
    import docker.errors

    why = engine_unreachable()
    client = None
    if why is None:
        try:
            client = docker.from_env(timeout=120)
            client.ping()
        except docker.errors.DockerException as err:
            why = str(err)
            if client is not None:
                client.close()
    if why is not None or client is None:
        unavailable(
            f"no Docker engine reachable ({why}); start one with `dockerd --bridge=none --iptables=false` "
            "(.ci/run does)"
        )
    assert client is not None
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def agentbus_image(docker_client: docker.DockerClient) -> str:
    """`agentbus:test`, built from this checkout by compose/Dockerfile."""
    import docker.errors

    base = os.environ.get("AGENTBUS_BASE_IMAGE")
    if base is None:
        for candidate in BASES:
            try:
                docker_client.images.get(candidate)
            except docker.errors.ImageNotFound:
                continue
            base = candidate
            break
    if base is None:
        unavailable(f"no base image ({' or '.join(BASES)}); build one with compose/base-image.sh")
    assert base is not None
    # the offline path when a wheelhouse is filled (CI), the registry otherwise
    offline = "1" if any((ROOT / "compose" / "wheelhouse").glob("*.whl")) else "0"
    try:
        docker_client.images.build(
            path=str(ROOT),
            dockerfile="compose/Dockerfile",
            tag=TEST_IMAGE,
            buildargs={"BASE_IMAGE": base, "OFFLINE": offline},
            network_mode="host",
            rm=True,
        )
    except docker.errors.BuildError as err:
        lines = "".join(str(chunk.get("stream", "")) for chunk in err.build_log)
        pytest.fail(f"building {TEST_IMAGE} on {base} failed: {err}\n{lines[-3000:]}")
    return TEST_IMAGE

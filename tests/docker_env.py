"""A real Docker engine for the docker-spawner and compose tests, or a clear skip.

The image is built from this checkout (layers cached, so a second build is quick) on a base
image given by AGENTBUS_BASE_IMAGE, or the locally built `agentbus-base:bookworm`
(compose/base-image.sh), or `python:3.11-slim` when that is present. With
AGENTBUS_REQUIRE_DOCKER=1 (set by .ci/run) a missing engine fails instead of skipping,
so CI cannot pass by skipping these tests.
"""

from __future__ import annotations

import gc
import os
import warnings
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


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client, reason = _engine()
    if client is None:
        unavailable(
            f"no Docker engine reachable ({reason}); start one with `dockerd --bridge=none --iptables=false` "
            "(.ci/run does)"
        )
    assert client is not None
    yield client
    client.close()


def _engine() -> tuple[docker.DockerClient | None, str]:
    """A client of a live engine, or why not. docker-py leaves the socket of a failed connect
    unclosed (a ResourceWarning, an error under filterwarnings = error, and only on machines
    without an engine): that socket is collected here, quietly, before it can surface later."""
    import docker
    import docker.errors
    import requests.exceptions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=120)
            client.ping()
            return client, ""
        except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
            reason = str(err)
        gc.collect()
    return None, reason


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

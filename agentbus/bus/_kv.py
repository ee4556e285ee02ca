"""Key-value buckets: get, compare-and-set, put, delete and one-request listings."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

import nats.js.errors

from agentbus.bus._provision import Provisioning
from agentbus.subjects import BucketSpec

T = TypeVar("T")


class KeyValue(Provisioning):
    async def kv_get(self, bucket: str, key: str) -> tuple[bytes, int] | None:
        kv = await self._bucket(bucket)
        try:
            entry = await self._through_failover(f"{bucket} {key}", lambda: kv.get(key), refusal=f"$KV.{bucket}.{key}")
        except nats.js.errors.KeyNotFoundError:
            return None
        return (entry.value or b"", int(entry.revision or 0))

    async def kv_put_if(self, bucket: str, key: str, value: bytes, revision: int | None) -> bool:
        """Compare-and-set: write only if the key is still at `revision` (None: only if absent)."""
        kv = await self._bucket(bucket)
        # A retry after a lost reply finds its own write and reports a conflict: callers re-read
        # and decide again, which is right for a cache and, for a counter, errs on counting twice.
        try:
            if revision is None:
                await self._through_failover(
                    f"{bucket} {key}", lambda: _leaderless(kv.create(key, value)), refusal=f"$KV.{bucket}.{key}"
                )
            else:
                await self._through_failover(
                    f"{bucket} {key}",
                    lambda: _leaderless(kv.update(key, value, last=revision)),
                    refusal=f"$KV.{bucket}.{key}",
                )
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError):
            return False
        return True

    async def kv_put(self, bucket: str, key: str, value: bytes) -> None:
        kv = await self._bucket(bucket)
        await self._through_failover(
            f"{bucket} {key}", lambda: _leaderless(kv.put(key, value)), refusal=f"$KV.{bucket}.{key}"
        )

    async def kv_delete(self, bucket: str, key: str) -> None:
        kv = await self._bucket(bucket)
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await self._through_failover(
                f"{bucket} {key}", lambda: _leaderless(kv.purge(key)), refusal=f"$KV.{bucket}.{key}"
            )

    async def kv_values(self, bucket: str) -> dict[str, bytes]:
        """Every live key's value (expired and deleted keys left out)."""
        out: dict[str, bytes] = {}
        for key in await self.kv_keys(bucket):
            got = await self.kv_get(bucket, key)
            if got is not None and got[0]:
                out[key] = got[0]
        return out

    async def kv_keys(self, bucket: str) -> list[str]:
        """Keys with a stored entry (a deleted key may be listed until its marker ages out;
        `kv_get` reads it as absent). One stream-info request: nats-py's `keys()` runs a
        watcher with no timeout, which a supervisor ticking twice a second cannot afford."""
        await self._bucket(bucket)
        prefix = f"$KV.{bucket}."
        info = await self._through_failover(
            f"keys of {bucket}",
            lambda: self._js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>"),
            refusal=f"$JS.API.STREAM.INFO.KV_{bucket}",
        )
        return sorted(subject.removeprefix(prefix) for subject in (info.state.subjects or {}))

    async def _bucket(self, name: str) -> Any:
        if name not in self._kv:
            await self.ensure_bucket(BucketSpec(name=name))
        return self._kv[name]


async def _leaderless(write: Awaitable[T]) -> T:
    """A write to a bucket nobody answered: its stream has no leader for a moment (a failover; the
    buckets are made at start), so it is tried again like a timeout, not raised as nats-py's error."""
    try:
        return await write
    except nats.js.errors.NoStreamResponseError as err:
        raise TimeoutError("no leader for the bucket's stream") from err

"""Provisioning: create (and for services, update) the namespace's streams, consumers and buckets."""

from __future__ import annotations

from typing import Any

import nats.js.errors
from nats.js import api

from agentbus.bus._core import BusCore, logger
from agentbus.bus._errors import ErrorCode
from agentbus.errors import BusError, NatsUnreachable
from agentbus.subjects import BucketSpec, ConsumerSpec, StreamSpec


class Provisioning(BusCore):
    async def provision(self, *, update: bool = True) -> None:
        """Create (and, with `update`, reconfigure) every stream and bucket of the namespace.

        Services update, so a new version's limits take effect; clients only create.
        """
        try:
            await self._through_failover("JetStream", self._js.account_info)
        except BusError as err:
            raise NatsUnreachable(
                self.settings.nats_url,
                f"JetStream did not answer for {self.settings.failover_s:.0f}s: the server runs without"
                " JetStream (start it with -js), or its cluster has not elected a leader yet",
            ) from err
        for spec in self.ns.streams():
            try:
                await self.ensure_stream(spec, update=update)
            except BusError as err:
                if not spec.optional:
                    raise
                logger.warning("going on without stream %s: %s", spec.name, err)
        self._updating = update
        for bucket in self.ns.buckets():
            await self.ensure_bucket(bucket)

    async def ensure_stream(self, spec: StreamSpec, *, update: bool = True) -> None:
        config = api.StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            retention=api.RetentionPolicy(spec.retention),
            storage=api.StorageType(self.settings.storage),
            num_replicas=self.settings.replicas,
            duplicate_window=spec.duplicate_window_s,
            max_age=spec.max_age_s,
            max_bytes=spec.max_bytes,
            max_msg_size=spec.max_msg_size,
            discard=api.DiscardPolicy(spec.discard),
            allow_direct=spec.allow_direct,
        )
        # An existing stream is never re-created (with other replicas, a server without a
        # cluster would refuse even to look); only a missing one is made with the settings.
        if not await self.stream_exists(spec.name):
            try:
                await self._js.add_stream(config)
                return
            except nats.js.errors.APIError as err:
                if err.err_code != ErrorCode.STREAM_NAME_IN_USE:  # in use: another process made it just now
                    raise BusError(f"cannot create stream {spec.name}: {err.description}") from err
        if update:
            await self._keep_replicas(spec.name, config)
            try:
                await self._js.update_stream(config)
            except nats.js.errors.APIError as err:
                raise BusError(f"cannot update stream {spec.name}: {err.description}") from err

    async def stream_exists(self, stream: str) -> bool:
        try:
            await self._through_failover(f"state of {stream}", lambda: self._js.stream_info(stream))
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def stream_replicas(self, stream: str) -> int:
        info = await self._through_failover(f"state of {stream}", lambda: self._js.stream_info(stream))
        return int(info.config.num_replicas or 1)

    async def _keep_replicas(self, stream: str, config: api.StreamConfig | None = None) -> None:
        """Replication is the operator's call: an existing stream keeps its replica count (an
        update with another count moves data and can leave the stream leaderless for a while).
        A count that differs from AGENTBUS_REPLICAS is reported, with the command that changes it."""
        have = await self.stream_replicas(stream)
        if have != self.settings.replicas:
            logger.warning(
                "stream %s has %d replica(s), AGENTBUS_REPLICAS is %d; keeping %d (change it with "
                "`nats stream edit %s --replicas %d` when the cluster is quiet)",
                stream, have, self.settings.replicas, have, stream, self.settings.replicas,
            )  # fmt: skip
        if config is not None:
            config.num_replicas = have

    async def ensure_consumer(self, spec: ConsumerSpec) -> None:
        config = api.ConsumerConfig(
            durable_name=spec.durable,
            filter_subject=spec.filter_subject,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait_s,
            max_deliver=spec.max_deliver,
            max_ack_pending=spec.max_ack_pending,
            deliver_policy=api.DeliverPolicy.NEW if spec.deliver == "new" else api.DeliverPolicy.ALL,
        )

        async def create() -> Any:
            try:
                return await self._js.add_consumer(spec.stream, config)
            except nats.js.errors.APIError as err:
                if err.err_code == ErrorCode.INSUFFICIENT_RESOURCES:
                    # the stream's peers are still being placed (just created, or just raised
                    # to more replicas): a moment later the consumer fits
                    raise TimeoutError(err.description) from err
                raise

        try:
            await self._through_failover(f"consumer {spec.durable}", create)
        except nats.js.errors.APIError as err:
            if err.err_code != ErrorCode.CONSUMER_ALREADY_EXISTS:
                raise BusError(f"cannot create consumer {spec.durable}: {err.description}") from err
            # The first creator's limits stand: agents of one pool must agree on ack wait and
            # max deliver, and the last one to start must not silently change them for all.
            logger.info("consumer %s exists with other limits; keeping them", spec.durable)

    async def ensure_bucket(self, spec: BucketSpec) -> None:
        if spec.name in self._kv:
            return
        try:
            kv = await self._through_failover(f"bucket {spec.name}", lambda: self._js.key_value(spec.name))
            if self._updating:
                await self._keep_replicas(f"KV_{spec.name}")
        except nats.js.errors.BucketNotFoundError:
            kv = await self._js.create_key_value(
                api.KeyValueConfig(
                    bucket=spec.name,
                    history=spec.history,
                    ttl=spec.ttl_s or None,
                    storage=api.StorageType(self.settings.storage),
                    replicas=self.settings.replicas,
                )
            )
        self._kv[spec.name] = kv

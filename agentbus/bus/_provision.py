"""Provisioning: create (and for services, update) the namespace's streams, consumers and buckets."""

from __future__ import annotations

from typing import Any

import nats.js.errors
from nats.js import api
from nats.js.kv import KeyValue

from agentbus.bus._core import BusCore, logger
from agentbus.bus._errors import ErrorCode
from agentbus.errors import BusError, NatsUnreachable
from agentbus.subjects import BucketSpec, ConsumerSpec, StreamSpec


class Provisioning(BusCore):
    async def provision(self, *, update: bool = True) -> None:
        """Create (and, with `update`, reconfigure) every stream and bucket of the namespace.

        Services update, so a new version's limits take effect; clients only create.
        Roles that may not manage streams (agents, operators, co-drivers, observers) only check
        that JetStream answers: what they use must already exist, made by a service or an admin.
        """
        try:
            await self._through_failover("JetStream", self._js.account_info, refusal="$JS.API.INFO")
        except BusError as err:
            raise NatsUnreachable(
                self.settings.nats_url,
                f"JetStream did not answer for {self.settings.failover_s:.0f}s: the server runs without"
                " JetStream (start it with -js), or its cluster has not elected a leader yet",
            ) from err
        if not self.identity.manages_streams:
            return
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
        if update and self.identity.role in (None, "admin"):
            await self._retire_consumers()

    async def _retire_consumers(self) -> None:
        for stream, durable in self.ns.retired_consumers():
            try:
                await self.delete_consumer(stream, durable)
            except nats.js.errors.NotFoundError:
                continue
            except Exception as err:  # a courtesy: never a reason not to start
                logger.info("could not delete consumer %s of %s, which this version no longer reads: %s",
                            durable, stream, err)  # fmt: skip
                continue
            logger.info("deleted consumer %s of %s, which this version no longer reads", durable, stream)

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
                await self._refusable(f"$JS.API.STREAM.CREATE.{spec.name}", lambda: self._js.add_stream(config))
                return
            except nats.js.errors.APIError as err:
                if err.err_code != ErrorCode.STREAM_NAME_IN_USE:  # in use: another process made it just now
                    raise BusError(f"cannot create stream {spec.name}: {err.description}") from err
        if update:
            await self._keep_replicas(spec.name, config)
            try:
                await self._refusable(f"$JS.API.STREAM.UPDATE.{spec.name}", lambda: self._js.update_stream(config))
            except nats.js.errors.APIError as err:
                raise BusError(f"cannot update stream {spec.name}: {err.description}") from err

    async def stream_exists(self, stream: str) -> bool:
        try:
            await self._through_failover(
                f"state of {stream}", lambda: self._js.stream_info(stream), refusal=f"$JS.API.STREAM.INFO.{stream}"
            )
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def delete_stream(self, stream: str) -> None:
        """Delete a stream and everything in it (admins only; anyone else gets `NotPermitted`)."""
        await self._refusable(f"$JS.API.STREAM.DELETE.{stream}", lambda: self._js.delete_stream(stream))

    async def delete_consumer(self, stream: str, consumer: str) -> None:
        """Delete a consumer (admins only; anyone else gets `NotPermitted`)."""
        await self._refusable(
            f"$JS.API.CONSUMER.DELETE.{stream}.{consumer}", lambda: self._js.delete_consumer(stream, consumer)
        )

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
            # named as well as durable: nats-py then creates it on the filter-scoped API subject
            # ($JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>), which a role can be granted alone
            name=spec.durable,
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
            await self._through_failover(
                f"consumer {spec.durable}", create, refusal=f"$JS.API.CONSUMER.CREATE.{spec.stream}.{spec.durable}"
            )
        except nats.js.errors.APIError as err:
            if err.err_code != ErrorCode.CONSUMER_ALREADY_EXISTS:
                raise BusError(f"cannot create consumer {spec.durable}: {err.description}") from err
            # The first creator's limits stand: agents of one pool must agree on ack wait and
            # max deliver, and the last one to start must not silently change them for all.
            logger.info("consumer %s exists with other limits; keeping them", spec.durable)

    async def _allow_direct(self, bucket: str, kv: Any) -> Any:
        """A bucket made before reads by key were scoped gets direct gets turned on (a safe change)."""
        info = await self._js.stream_info(f"KV_{bucket}")
        if info.config.allow_direct:
            return kv
        info.config.allow_direct = True
        await self._js.update_stream(info.config)
        logger.info("bucket %s: direct gets on (per-key read permissions need them)", bucket)
        return await self._js.key_value(bucket)

    async def ensure_bucket(self, spec: BucketSpec) -> None:
        if spec.name in self._kv:
            return
        if self.identity.role in ("codriver", "observer"):
            # no stream info for people who only read sessions (it lists every key): bind blind,
            # reading entries by key with direct gets, as a bound bucket with allow_direct does
            self._kv[spec.name] = KeyValue(
                name=spec.name, stream=f"KV_{spec.name}", pre=f"$KV.{spec.name}.", js=self._js, direct=True
            )
            return
        try:
            kv = await self._through_failover(
                f"bucket {spec.name}",
                lambda: self._js.key_value(spec.name),
                refusal=f"$JS.API.STREAM.INFO.KV_{spec.name}",
            )
            if self._updating:
                await self._keep_replicas(f"KV_{spec.name}")
                kv = await self._allow_direct(spec.name, kv)
        except nats.js.errors.BucketNotFoundError:
            if not self.identity.manages_streams:
                raise BusError(
                    f"bucket {spec.name} does not exist yet, and a {self.identity.role} may not make it:"
                    " start a service (or connect once as an admin) first"
                ) from None
            kv = await self._js.create_key_value(
                api.KeyValueConfig(
                    bucket=spec.name,
                    history=spec.history,
                    ttl=spec.ttl_s or None,
                    storage=api.StorageType(self.settings.storage),
                    replicas=self.settings.replicas,
                    # reads by key name the key in the API subject, so a role may be granted one key
                    direct=True,
                )
            )
        self._kv[spec.name] = kv

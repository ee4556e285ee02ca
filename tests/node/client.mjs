// A foreign agentbus client, written only against subjects.md and schemas/, on the official NATS
// JavaScript client. It taps a session from the start, submits a task to a pool and steers it
// while it runs (say), waits for the result, and lists sessions. Every payload it writes or reads
// is checked against schemas/. One JSON object per line on stdout: progress, then a summary.
//
// Environment: AGENTBUS_NATS_URL, AGENTBUS_CREDS (an agentbus credentials file), AGENTBUS_POOL,
// AGENTBUS_PROMPT, AGENTBUS_SAY (what to say once an agent has claimed the session),
// AGENTBUS_TAP (an existing session to tap from its start before submitting).

import { readFileSync, readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { randomInt } from "node:crypto";

import { connect, nkeyAuthenticator } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import Ajv2020 from "ajv/dist/2020.js";

const here = dirname(fileURLToPath(import.meta.url));
const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

// --- the contract: schemas/ (JSON Schema 2020-12), each found by its $id ---------------------------
const ajv = new Ajv2020({ strict: false, allErrors: true });
for (const file of readdirSync(join(here, "..", "..", "schemas"))) {
  ajv.addSchema(JSON.parse(readFileSync(join(here, "..", "..", "schemas", file), "utf8")));
}
const schema = (family) => ajv.getSchema(`urn:agentbus:schema:${family}`);
function valid(family, payload) {
  const check = schema(family);
  if (check(payload)) return true;
  out({ invalid: family, payload, errors: check.errors });
  return false;
}

// --- connecting (subjects.md, From another language) ------------------------------------------------
// An agentbus credentials file is TOML whose values are JSON literals: user, role, prefix, seed, ...
function readCreds(path) {
  const creds = {};
  for (const line of readFileSync(path, "utf8").split("\n")) {
    const m = line.match(/^(\w+)\s*=\s*(.+)$/);
    if (m) creds[m[1]] = JSON.parse(m[2]);
  }
  return creds;
}

// Session ids: 10 Crockford base32 characters of milliseconds, then 6 random ones (sorts oldest first).
const B32 = "0123456789abcdefghjkmnpqrstvwxyz";
function newSessionId() {
  let ms = BigInt(Date.now());
  let head = "";
  for (let i = 0; i < 10; i++) {
    head = B32[Number(ms & 31n)] + head;
    ms >>= 5n;
  }
  let tail = "";
  for (let i = 0; i < 6; i++) tail += B32[randomInt(32)];
  return head + tail;
}
const seconds = () => Date.now() / 1000; // ts is seconds since the epoch, a float: never Date.now()

const creds = readCreds(env("AGENTBUS_CREDS"));
const prefix = creds.prefix;
const user = creds.user;
const stream = `${prefix.toUpperCase()}_SESSIONS`;
const nc = await connect({
  servers: env("AGENTBUS_NATS_URL"),
  authenticator: nkeyAuthenticator(new TextEncoder().encode(creds.seed)),
  inboxPrefix: `_INBOX_${user}`, // replies and deliveries arrive only under the user's own inbox
  name: "agentbus-node-client",
});
const js = jetstream(nc);
const jsm = await jetstreamManager(nc);
const encode = (obj) => new TextEncoder().encode(JSON.stringify(obj));

async function publish(family, subject, payload, msgID) {
  if (!valid(family, payload)) throw new Error(`refusing to publish an invalid ${family} payload`);
  return js.publish(subject, encode(payload), { msgID }); // acked by JetStream; a retry is stored once
}

// --- tap: one ordered push consumer on the session's filter, created on the filter-scoped subject --
async function* tap(sid) {
  const consumer = await js.consumers.getPushConsumer(stream, {
    filter_subjects: `${prefix}.session.${sid}.>`,
    deliver_prefix: `_INBOX_${user}.tap`,
  });
  const messages = await consumer.consume();
  try {
    for await (const m of messages) {
      const [, , session, channel, sender] = m.subject.split(".");
      const event = JSON.parse(new TextDecoder().decode(m.data));
      yield { seq: m.seq, session, channel, sender: sender ?? "", event, valid: valid("events", event) };
    }
  } finally {
    await messages.close();
  }
}

// 1. Tap a session someone else wrote, from its start, until it ends.
const summary = { user, tapped: [], invalid: 0 };
const existing = process.env.AGENTBUS_TAP;
if (existing) {
  for await (const record of tap(existing)) {
    summary.tapped.push(record.event.type);
    if (!record.valid) summary.invalid += 1;
    if (record.event.type === "session_ended") {
      summary.tapped_result = record.event.result;
      break;
    }
  }
}

// 2. Submit (subjects.md, Submitting): session_created, routed, the work item; each with its message id.
const sid = newSessionId();
const pool = env("AGENTBUS_POOL");
const control = `${prefix}.session.${sid}.control.${user}`;
await publish("events", control, {
  type: "session_created", id: "created", ts: seconds(), v: 1,
  task: { session_id: sid, prompt: env("AGENTBUS_PROMPT"), pool, v: 1 },
}, `${sid}:created`);
await publish("events", control, { type: "routed", id: "routed", ts: seconds(), v: 1, pool, rule: "explicit" },
  `${sid}:routed`);
await publish("work", `${prefix}.work.${pool}`, { session_id: sid, v: 1 }, `${sid}:new:1`);
out({ submitted: sid });

// 3. Tap it from the start and live; steer it once an agent has it; wait for the receipt and the end.
let said = 0;
let delivered = null;
for await (const record of tap(sid)) {
  const ev = record.event;
  if (!record.valid) summary.invalid += 1;
  out({ seq: record.seq, channel: record.channel, type: ev.type });
  if (ev.type === "session_claimed" && !said) {
    const say = { type: "human_message", id: `say-${newSessionId().slice(10)}`, ts: seconds(), v: 1,
                  text: env("AGENTBUS_SAY"), author: "node" };
    said = (await publish("events", `${prefix}.session.${sid}.input.${user}`, say, `${sid}:${say.id}`)).seq;
    out({ said });
  }
  if (ev.type === "message_delivered" && ev.message_seq === said) delivered = ev.step;
  if (ev.type === "human_message") summary.sender = record.sender;
  if (ev.type === "session_ended") {
    Object.assign(summary, { session_id: sid, status: ev.status, result: ev.result, said, delivered });
    break;
  }
}

// 4. List sessions: the stream's subjects, one per session and channel; ids sort oldest first.
const info = await jsm.streams.info(stream, { subjects_filter: `${prefix}.session.>` });
const ids = [...new Set(Object.keys(info.state.subjects ?? {}).map((s) => s.split(".")[2]))].sort();
summary.sessions = ids;

// 5. The state cache: derived, written only by agentbus services; checked against the log.
// read by key with direct gets (the buckets allow them, and a reader is granted exactly those)
const kv = await new Kvm(js).open(`${prefix.toUpperCase()}_state`, { allow_direct: true });
const entry = await kv.get(sid);
const last = await jsm.direct.getMessage(stream, { last_by_subj: `${prefix}.session.${sid}.>` });
if (entry && entry.value.length) {
  const state = entry.json();
  summary.state = { valid: valid("state", state), status: state.status, last_seq: state.last_seq,
                    trusted: state.last_seq <= last.seq };
}
summary.last_seq = last.seq;

out({ summary });
await nc.close();

"""subjects.md is the contract: every name the code builds is documented, and every documented name exists."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from agentbus.roles import MATRIX, ROLES, Identity, allowed, permissions, probe
from agentbus.subjects import ConsumerSpec, Namespace

DOC = Path(__file__).resolve().parents[1] / "subjects.md"
NS = Namespace("agentbus")
PLACEHOLDERS = {"session_id": "SESSIONX", "pool": "POOLX", "user": "USERX"}


def _table(heading: str) -> list[list[str]]:
    text = DOC.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip().strip("`") for cell in row.strip("|").split("|")] for row in rows[2:]]


def _builders() -> dict[str, str]:
    """Every public Namespace method that returns a subject, rendered with placeholders."""
    out = {}
    for name, fn in inspect.getmembers(Namespace, inspect.isfunction):
        if name.startswith("_") or name.endswith("_consumer") or name in ("streams", "buckets", "retired_consumers"):
            continue
        args = [PLACEHOLDERS[p] for p in inspect.signature(fn).parameters if p != "self"]
        subject = getattr(NS, name)(*args)
        out[name] = subject.replace("SESSIONX", "<session>").replace("POOLX", "<pool>").replace("USERX", "<user>")
    return out


def test_every_subject_builder_in_code_is_documented_with_its_pattern() -> None:
    documented = {row[1]: row[0] for row in _table("Subjects")}
    for builder, subject in _builders().items():
        assert builder in documented, f"Namespace.{builder} is missing from subjects.md"
        assert documented[builder] == subject, f"{builder}: code builds {subject}, doc says {documented[builder]}"


def test_every_documented_subject_exists_in_code() -> None:
    builders = _builders()
    for row in _table("Subjects"):
        assert row[1] in builders, f"subjects.md documents {row[0]} via {row[1]}, which the code lacks"


def test_every_stream_is_documented_with_its_subjects_retention_and_dedup_window() -> None:
    rows = {row[0]: row for row in _table("Streams")}
    specs = NS.streams()
    assert set(rows) == {s.name for s in specs}
    for spec in specs:
        _name, subjects, retention, _storage, window, *_ = rows[spec.name]
        assert subjects == ", ".join(spec.subjects)
        assert retention == spec.retention
        assert window == f"{spec.duplicate_window_s:g} s"


def _consumers() -> list[ConsumerSpec]:
    """Every consumer the code can build (each `*_consumer` method)."""
    specs = []
    for name, fn in inspect.getmembers(Namespace, inspect.isfunction):
        if name.endswith("_consumer"):
            args = [PLACEHOLDERS[p] for p in inspect.signature(fn).parameters if p in PLACEHOLDERS]
            specs.append(getattr(NS, name)(*args))
    return specs


@pytest.mark.parametrize("spec", _consumers(), ids=lambda s: s.durable)
def test_every_consumer_is_documented_with_its_ack_wait_and_max_deliver(spec) -> None:  # type: ignore[no-untyped-def]
    rows = {row[0]: row for row in _table("Consumers")}
    durable = spec.durable.replace("POOLX", "<pool>")
    assert durable in rows, f"consumer {durable} missing from subjects.md"
    _, stream, filt, ack, wait, max_deliver, *_ = rows[durable]
    assert stream == spec.stream
    assert filt == spec.filter_subject.replace("POOLX", "<pool>")
    assert ack == "explicit"
    assert wait == f"{spec.ack_wait_s:g} s"
    assert int(max_deliver) == spec.max_deliver


def test_every_bucket_is_documented() -> None:
    assert {row[0] for row in _table("KV buckets")} == {b.name for b in NS.buckets()}


def test_the_doc_names_no_subject_the_code_cannot_build() -> None:
    known = set(_builders().values())
    text = DOC.read_text().split("\n## Permissions\n", 1)[0]  # that table's probes are checked below
    for match in re.finditer(r"`(agentbus\.[a-z<>.*_-]+)`", text):
        assert match.group(1) in known, f"subjects.md mentions {match.group(1)}, which no builder makes"


def test_every_documented_message_id_form_is_the_one_queues_builds() -> None:
    from agentbus.messages import WorkItem
    from agentbus.queues import msg_id

    causes = {
        "<seq>": "41",
        "handback-<stream seq>-<delivery>": "handback-7-2",
        "<child session>-<status>-<turn>": "c1-paused-2",
        "<call>-<due>": "toolu_1-1700000000",
    }
    rows = _table("Message ids")
    assert {row[0] for row in rows} == {"new", "revision", "evaluate", "resume", "child_result", "wake", "timeout"}
    for reason, _who, form, _why in rows:
        round_ = 1 if ":1" in form and "<round>" not in form else 3
        cause = next((v for k, v in causes.items() if form.endswith(f":{k}")), None)
        item = WorkItem(session_id="SESSIONX", reason=reason, round=round_)  # type: ignore[arg-type]
        expected = form.replace("<session>", "SESSIONX").replace("<round>", str(round_))
        for placeholder, value in causes.items():
            expected = expected.replace(placeholder, value)
        assert msg_id(item, cause) == expected, f"{reason}: queues builds {msg_id(item, cause)}, doc says {form}"


def test_the_permissions_table_is_the_matrix_the_code_enforces() -> None:
    rows = _table("Permissions")
    header = DOC.read_text().split("## Permissions\n", 1)[1].split("| action |", 1)[1].split("\n", 1)[0]
    assert [c.strip() for c in header.strip("|").split("|")][1:] == list(ROLES)
    documented = [(r[0], r[1], tuple(r[2:])) for r in rows]
    expected = [(m.action, f"{m.op} `{m.subject}", m.cells) for m in MATRIX]
    assert documented == expected


@pytest.mark.parametrize("row", MATRIX, ids=lambda r: r.key)
@pytest.mark.parametrize("role", ROLES)
def test_every_cell_of_the_table_is_what_the_generated_permissions_allow(row, role) -> None:  # type: ignore[no-untyped-def]
    cell = row.cell(role)
    for scoped in (True, False):
        ident = Identity(
            user="u1", role=role, prefix="agentbus",
            sessions=("g1",) if scoped else (), pools=("pl",) if scoped else (),
        )  # fmt: skip
        subject = probe(row, "u1", granted="g1", other="o2", pool="pl", otherpool="op", someone="u2")
        want = cell == "yes" or (cell == "if all" and not scoped)
        got = allowed(permissions(ident), row, subject)
        assert got == want, f"{role} ({'granted one' if scoped else 'granted all'}): {row.op} {subject}"


# --- payloads: the document, the code and schemas/ agree ------------------------------------------


def _payloads() -> str:
    return DOC.read_text().split("\n## Payloads\n", 1)[1].split("\n## ", 1)[0]


def _examples_shown() -> dict[str, list[object]]:
    """Each `### family` subsection's ```json block, one example per line."""
    import json

    out = {}
    for part in _payloads().split("\n### ")[1:]:
        name, body = part.split("\n", 1)
        block = body.split("```json\n", 1)[1].split("```", 1)[0]
        out[name.strip()] = [json.loads(line) for line in block.splitlines()]
    return out


def test_every_family_shows_one_example_of_every_kind_as_the_code_writes_it() -> None:
    import json

    from agentbus.messages import encode
    from agentbus.schema import EXAMPLES

    shown = _examples_shown()
    assert set(shown) == set(EXAMPLES)
    for family, examples in EXAMPLES.items():
        assert shown[family] == [json.loads(encode(e)) for e in examples], f"subjects.md, Payloads, {family}"


def test_every_example_in_the_document_is_valid_by_its_schema() -> None:
    import jsonschema

    from agentbus.schema import generate

    schemas = generate()
    for family, examples in _examples_shown().items():
        for example in examples:
            jsonschema.Draft202012Validator(schemas[family]).validate(example)


def test_the_payloads_table_names_every_schema_file() -> None:
    from agentbus.schema import generate

    first = _payloads().split("\n### ", 1)[0]
    lines = [line for line in first.splitlines() if line.startswith("|")][2:]
    rows = [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in lines]
    assert {row[0] for row in rows} == set(generate())
    for row in rows:
        assert row[1] == f"schemas/{row[0]}.schema.json"
        assert (DOC.parent / row[1]).exists()


def test_the_channel_table_is_what_authority_honours() -> None:
    from agentbus.authority import CONTROL_KINDS, INPUT_KINDS

    section = _payloads().split("\n### events\n", 1)[1]
    rows = {r.split("|")[1].strip().strip("`"): r.split("|")[2] for r in section.splitlines() if r.startswith("| `")}

    def kinds(cell: str) -> set[str]:
        return {word.strip() for word in re.sub(r"\([^)]*\)", "", cell).split(",")}

    assert kinds(rows["input.<user>"]) == {k.__struct_config__.tag for k in INPUT_KINDS}
    assert kinds(rows["control.<user>"]) == {k.__struct_config__.tag for k in CONTROL_KINDS}


def test_the_form_of_a_waiting_work_items_id_is_the_one_queues_reads() -> None:
    from agentbus.queues import _UNSEEN

    assert "`<its message id>:unseen-<since>-<n>`" in DOC.read_text()
    found = _UNSEEN.search("SESSIONX:new:1:unseen-1767225600-2")
    assert found is not None and found.groups() == ("1767225600", "2")

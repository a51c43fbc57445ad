"""The documented interfaces: README's Python API runs as written, every committed record follows the
record's JSON Schema, and `vramlab --help` names every command on one line."""

import argparse
import contextlib
import copy
import io
import json
import os
import re

import pytest

from harness.records import SCHEMA_FILE, record_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# published measurement *sets* (the inputs `vramlab import` reads), the allocator's datasets and llama.cpp's own
# measurements (their format: harness/engine_record.schema.json), not experiment records
_ENGINE_RECORDS = os.path.join("results", "engines") + os.sep
_NOT_RECORDS = (os.path.join("results", "published", "engines") + os.sep, os.path.join("results", "allocator") + os.sep,
                _ENGINE_RECORDS)
ENGINE_SCHEMA_FILE = os.path.join(ROOT, "harness", "engine_record.schema.json")


def _python_api_blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("\n## Python API\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def test_readme_python_api_has_examples():
    assert len(_python_api_blocks()) >= 3  # predict, plan, the engines


@pytest.mark.parametrize("i", range(len(_python_api_blocks())))
def test_readme_python_api_runs_as_written(i):
    block = _python_api_blocks()[i]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(block, f"README.md Python API block {i + 1}", "exec"), {"__name__": "readme"})
    assert out.getvalue().strip(), "each example prints what it computed"


# ------------------------------------------------------------------ the record format

jsonschema = pytest.importorskip("jsonschema")


def _validator():
    with open(SCHEMA_FILE, encoding="utf-8") as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _committed_records():
    files = record_files(os.path.join(ROOT, "results"))
    return [f for f in files if not os.path.relpath(f, ROOT).startswith(_NOT_RECORDS)]


def test_every_committed_record_follows_the_schema():
    v = _validator()
    files = _committed_records()
    assert len(files) > 100  # results/ holds measured, engine and published records
    bad = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        errors = sorted(v.iter_errors(rec), key=lambda e: e.json_path)
        if errors:
            bad.append(f"{os.path.relpath(path, ROOT)}: {errors[0].json_path}: {errors[0].message[:200]}")
    assert not bad, f"{len(bad)} records do not follow {SCHEMA_FILE}:\n" + "\n".join(bad[:20])


def test_the_schema_covers_every_source_the_records_use():
    sources = set()
    for path in _committed_records():
        with open(path, encoding="utf-8") as f:
            sources.add(json.load(f)["source"])
    with open(SCHEMA_FILE, encoding="utf-8") as f:
        allowed = set(json.load(f)["properties"]["source"]["enum"])
    assert sources <= allowed and {"measured", "published"} <= sources


def _a_measured_record():
    for path in _committed_records():
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        if rec["source"] == "measured" and rec["outcome"] == "ok":
            return rec
    raise AssertionError("no measured record committed")


@pytest.mark.parametrize("damage, where", [
    (lambda r: r["measured"].__setitem__("peak_allocated_bytes", 1234.5), "a fractional byte count"),
    (lambda r: r["predicted"]["breakdown"].__setitem__("misc", 1), "a category outside the vocabulary"),
    (lambda r: r["predicted"]["breakdown"].pop("kv_cache"), "a prediction without one of its categories"),
    (lambda r: r.__setitem__("measured", None), "an ok measured record without its measurement"),
    (lambda r: r.__setitem__("outcome", "exploded"), "an outcome outside OUTCOMES"),
    (lambda r: r.__setitem__("schema_version", 4), "a schema this file does not describe"),
    (lambda r: r["spec"].__setitem__("batch", 0), "a batch of 0"),
    (lambda r: r["measured"]["phases"].__setitem__("warmup", {}), "a phase outside the vocabulary"),
])
def test_the_schema_rejects_a_broken_record(damage, where):
    rec = copy.deepcopy(_a_measured_record())
    v = _validator()
    assert not list(v.iter_errors(rec))
    damage(rec)
    assert list(v.iter_errors(rec)), f"the schema accepts {where}"


def _engine_validator():
    with open(ENGINE_SCHEMA_FILE, encoding="utf-8") as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _engine_records():
    files = record_files(os.path.join(ROOT, _ENGINE_RECORDS))
    out = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            out.append((os.path.relpath(path, ROOT), json.load(f)))
    return out


def test_every_llamacpp_measurement_follows_its_schema():
    v, recs = _engine_validator(), _engine_records()
    assert {r["schema"] for _, r in recs} == {"vramlab-llamacpp-cpu-1", "vramlab-llamacpp-dryrun-1"}
    bad = [f"{p}: {e.json_path}: {e.message[:200]}" for p, r in recs for e in list(v.iter_errors(r))[:1]]
    assert not bad, f"{len(bad)} llama.cpp records do not follow {ENGINE_SCHEMA_FILE}:\n" + "\n".join(bad[:20])


@pytest.mark.parametrize("schema, damage", [
    ("vramlab-llamacpp-cpu-1", lambda r: r.pop("engine")),
    ("vramlab-llamacpp-cpu-1", lambda r: r.__setitem__("outcome", "exploded")),
    ("vramlab-llamacpp-dryrun-1", lambda r: r["predicted"].pop("compute_bytes")),
    ("vramlab-llamacpp-dryrun-1", lambda r: r.__setitem__("schema", "vramlab-llamacpp-dryrun-2")),
])
def test_the_engine_schema_rejects_a_broken_record(schema, damage):
    v = _engine_validator()
    rec = copy.deepcopy(next(r for _, r in _engine_records() if r["schema"] == schema))
    assert not list(v.iter_errors(rec))
    damage(rec)
    assert list(v.iter_errors(rec))


def test_a_new_record_follows_the_schema():
    """What the harness writes today (harness/records.new_record, as a traced sweep starts it), not only what is committed."""
    from formulas.spec import Spec
    from harness.records import new_record
    from harness.sweep.schema import Experiment

    exp = Experiment(spec=Spec(model="Qwen/Qwen2.5-0.5B", mode="train", method="lora", seq=256, batch=2))
    rec = new_record(exp, "traced")
    rec.update(outcome="ok", error=None, traced={"peak_allocated_bytes": 123, "peak_phase": "backward",
                                                 "breakdown": {"weights": 100, "activations": 23},
                                                 "phases": {"backward": {"weights": 100, "activations": 23}}})
    errors = list(_validator().iter_errors(rec))
    assert not errors, errors[0].message


# ------------------------------------------------------------------ vramlab --help

def test_help_lists_every_command_on_one_line(capsys):
    from harness.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert set(helps) == set(sub.choices)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name, text in helps.items():
        assert text, f"`vramlab {name}` has no one-line help"
        hits = [ln for ln in lines if ln.split()[:1] == [name]]
        assert len(hits) == 1 and hits[0].rstrip().endswith(text), f"{name}: {hits}"

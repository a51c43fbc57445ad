"""Records name their source: a traced sweep end to end, the CSV's columns, older schemas, stable hashes."""

import hashlib
import json
import os

import pytest

from formulas.units import MiB
from harness.cli import main
from harness.records import SCHEMA_VERSION, RecordError, migrate, read_record, write_record
from harness.sweep.schema import expand_sweep

TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 1000, "max_position_embeddings": 512}


def test_experiment_hash_is_stable():
    """Resuming a sweep depends on it: the hash is of what the experiment is — the spec and the run fields
    that change what is measured, each only where it differs from its default — not of the record
    schema, the timeout, the sampling interval or whether categories are tracked."""
    (exp,) = expand_sweep({"defaults": {"model": "gpt2", "seq": 64}}, "h.yaml")
    spec = {"model": "openai-community/gpt2", "seq": 64, "optimizer_impl": "foreach", "precision": "pure",
            "kv_dtype": "bf16"}  # the fields that differ from Spec's defaults once validated
    blob = json.dumps({"spec": spec, "run": {}}, sort_keys=True, separators=(",", ":"))
    assert exp.spec_hash == hashlib.sha256(blob.encode()).hexdigest()[:12] == "aa58f6973c1a"
    (same,) = expand_sweep({"defaults": {"model": "gpt2", "seq": 64, "timeout_s": 5, "sample_interval_ms": 10,
                                         "track_categories": False}}, "h.yaml")
    (capped,) = expand_sweep({"defaults": {"model": "gpt2", "seq": 64, "cap_gpu": "4090"}}, "h.yaml")
    assert same.spec_hash == exp.spec_hash != capped.spec_hash and capped.cap_gpu == "RTX 4090"


@pytest.fixture(scope="module")
def traced_sweep(tmp_path_factory):
    """A two-experiment sweep traced through the real launcher and worker (fake tensors, no GPU)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("yaml")
    root = tmp_path_factory.mktemp("traced")
    cfg = root / "config.json"
    cfg.write_text(json.dumps(TINY))
    sweep = root / "tiny.yaml"
    sweep.write_text(f"name: tiny\ndefaults: {{model: '{cfg}', seq: 32, batch: 2}}\n"
                     "groups:\n  - {set: {gen: 2}}\n  - {set: {mode: train, method: lora}}\n")
    out = root / "records"
    assert main(["run", str(sweep), "--mode", "trace", "--out", str(out), "--no-progress"]) == 0
    return out


def test_traced_records_keep_traced_figures_under_traced(traced_sweep):
    recs = [read_record(os.path.join(traced_sweep, f)) for f in os.listdir(traced_sweep) if f.endswith(".json")]
    assert len(recs) == 2
    for r in recs:
        assert r["outcome"] == "ok" and r["source"] == "traced" and r["measured"] is None
        assert r["traced"]["peak_allocated_bytes"] > 0 and r["predicted"]["peak_device_bytes"] > 0
        assert r["traced"]["device_breakdown"]["cuda_context"] is None  # fake tensors have no context
        assert set(r["predicted"]["breakdown"]) >= {"cuda_context", "workspaces", "allocator_slack"}


def test_traced_records_follow_the_record_schema(traced_sweep):
    """harness/record.schema.json holds for records the worker writes now, not only for the committed ones."""
    jsonschema = pytest.importorskip("jsonschema")
    from harness.records import SCHEMA_FILE

    with open(SCHEMA_FILE, encoding="utf-8") as f:
        validator = jsonschema.Draft202012Validator(json.load(f))
    for name in os.listdir(traced_sweep):
        if name.endswith(".json"):
            with open(os.path.join(traced_sweep, name), encoding="utf-8") as f:
                errors = list(validator.iter_errors(json.load(f)))
            assert not errors, (name, errors[0].json_path, errors[0].message[:300])


def test_traced_csv_has_empty_measured_and_filled_traced_columns(traced_sweep, tmp_path, capsys):
    pd = pytest.importorskip("pandas")
    csv = tmp_path / "out.csv"
    assert main(["results", str(traced_sweep), "--csv", str(csv)]) == 0
    df = pd.read_csv(csv)
    for col in ("traced_peak_allocated_bytes", "measured_peak_allocated_bytes", "measured_peak_device_bytes",
                "predicted_peak_allocated_bytes", "predicted_peak_device_bytes", "calibrated_peak_device_bytes"):
        assert col in df.columns
    assert df["traced_peak_allocated_bytes"].notna().all() and df["predicted_peak_device_bytes"].notna().all()
    assert df.filter(like="measured_").isna().all().all()
    assert df["calibrated_peak_device_bytes"].isna().all()  # no table fitted in a CPU environment
    capsys.readouterr()
    assert main(["results", str(traced_sweep)]) == 0
    out = capsys.readouterr().out
    assert "traced alloc GiB" in out and "measured" not in out


def test_report_on_traced_records_labels_the_source(traced_sweep, tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["report", str(traced_sweep), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "traced peak allocated" in md and "peak device" not in md.split("## Per category")[0].replace(
        "measured peak device", "")
    assert "None" not in md and "no GPU (CPU)" in md


# ------------------------------------------------------------------ older schemas

def _v1(source, context=544 * MiB, **extra):
    figures = {"peak_allocated_bytes": 1000, "peak_reserved_bytes": 1200, "peak_device_bytes": 600 * MiB,
               "cuda_context_bytes": 500 * MiB}
    return {"schema_version": 1, "spec_hash": "abc123abc123", "outcome": "ok", "source": source,
            "spec": {"model": "gpt2"}, "measured": figures if source == "measured" else {"peak_allocated_bytes": 900},
            "prediction": {"peak_allocated_bytes": 950, "breakdown": {"weights": 950, "cuda_context": context}},
            **extra}


def test_schema_1_traced_record_moves_to_traced():
    r = migrate(_v1("traced"))
    assert r["schema_version"] == SCHEMA_VERSION and r["migrated_from_schema"] == 1
    assert r["traced"] == {"peak_allocated_bytes": 900} and r["measured"] is None and "prediction" not in r
    # schema 1's context and workspaces were both outside the allocator: schema 3 calls that the CUDA context
    assert r["predicted"]["breakdown"]["cuda_context"] == 512 * MiB + 32 * MiB
    assert r["predicted"]["breakdown"]["workspaces"] == 0


def test_schema_1_measured_record_gains_its_device_breakdown():
    r = migrate(_v1("measured"))
    assert r["traced"] is None
    assert r["measured"]["device_breakdown"] == {"cuda_context": 600 * MiB - 1200, "workspaces": None,
                                                 "allocator_slack": 200}


def test_schema_2_record_moves_its_workspaces_outside_the_allocator():
    """Schema 2 put the workspaces outside the allocator beside the context; schema 3 counts them in the allocated
    peak. A schema-2 prediction counted none there: its figure joins the context, its totals stay."""
    v2 = {"schema_version": 2, "spec_hash": "abc123abc123", "outcome": "ok", "source": "measured",
          "spec": {"model": "gpt2"}, "traced": None,
          "predicted": {"peak_allocated_bytes": 950, "peak_device_bytes": 950 + 544 * MiB + 20 * MiB,
                        "breakdown": {"weights": 950, "cuda_context": 512 * MiB, "workspaces": 32 * MiB,
                                      "allocator_slack": 20 * MiB}},
          "measured": {"peak_allocated_bytes": 1000, "peak_reserved_bytes": 1200, "peak_device_bytes": 600 * MiB,
                       "cuda_context_bytes": 500 * MiB,
                       "device_breakdown": {"cuda_context": 500 * MiB, "workspaces": 600 * MiB - 1200 - 500 * MiB,
                                            "allocator_slack": 200}}}
    r = migrate(v2)
    assert r["schema_version"] == SCHEMA_VERSION == 3 and r["migrated_from_schema"] == 2
    bd = r["predicted"]["breakdown"]
    assert bd["cuda_context"] == 544 * MiB and bd["workspaces"] == 0
    assert r["predicted"]["peak_device_bytes"] == 950 + bd["cuda_context"] + bd["allocator_slack"]
    assert r["measured"]["device_breakdown"] == {"cuda_context": 600 * MiB - 1200, "workspaces": None,
                                                 "allocator_slack": 200}


def test_schema_1_with_an_unsplittable_context_is_named_older_schema(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(_v1("measured", context=700 * MiB)))
    with pytest.raises(RecordError, match="older schema 1"):
        read_record(str(path))
    with pytest.raises(RecordError, match="record schema 9"):
        migrate({**_v1("traced"), "schema_version": 9}, "x.json")


def test_old_and_new_records_read_alike(tmp_path):
    write_record(str(tmp_path), _v1("traced"))
    (r,) = [read_record(os.path.join(tmp_path, f)) for f in os.listdir(tmp_path)]
    assert r["traced"]["peak_allocated_bytes"] == 900

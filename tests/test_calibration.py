"""Calibration, check and report on synthetic records with planted overheads and regressions (CPU only)."""

import os
import random

import pytest

from formulas.predict import predict
from formulas.units import MiB
from harness.analysis.calibrate import (
    calibrated_totals,
    env_slug,
    find_calibration,
    fit,
    is_heldout,
    load_calibration,
    overheads_for,
    write_calibration,
)
from harness.analysis.check import CheckError, check, is_regression, parse_thresholds
from harness.cli import main
from harness.records import SCHEMA_VERSION, write_record
from harness.sweep.schema import expand_sweep

PLANTED_CONTEXT = 437 * MiB
PLANTED_WORKSPACE = 40 * MiB
PLANTED_SLACK = 0.065
RECOVERY_TOLERANCE = 0.01  # the bar: planted overheads recovered within 1%
NOISE = 0.005  # run-to-run noise on allocated bytes: ±0.5%
ENV = {"gpu": {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15"}, "torch_cuda": "12.4",
       "packages": {"torch": "2.5.1", "transformers": "4.46.0", "bitsandbytes": "0.44.1"}}


def _experiments():
    sweep = {"defaults": {"model": "Qwen2.5-0.5B"},
             "groups": [{"name": "inf", "grid": {"model": ["Qwen2.5-0.5B", "Llama-3.1-8B"], "batch": [1, 4, 16],
                                                 "seq": [512, 2048, 8192]}},
                        {"name": "train", "set": {"mode": "train", "method": "lora", "model": "Qwen2.5-7B"},
                         "grid": {"seq": [512, 1024, 2048, 4096], "batch": [1, 2]}}]}
    return expand_sweep(sweep, "synthetic.yaml")


def _record(exp, rng, context=PLANTED_CONTEXT, outcome="ok"):
    pred = predict(exp.spec).to_dict()
    pred.pop("spec")
    rec = {"schema_version": SCHEMA_VERSION, "spec_hash": exp.spec_hash, "formula_hash": "f0", **exp.to_dict(),
           "predicted": pred, "source": "measured", "outcome": outcome, "env": ENV, "error": None, "measured": None,
           "traced": None}
    if outcome != "ok":
        rec["error"] = {"type": "OutOfMemoryError", "message": "CUDA out of memory. Tried to allocate 2.00 GiB"}
        return rec
    alloc = int(pred["peak_allocated_bytes"] * (1 + rng.uniform(-NOISE, NOISE)))
    slack = int(PLANTED_SLACK * alloc)
    rec["measured"] = {
        "peak_allocated_bytes": alloc, "peak_reserved_bytes": alloc + slack,
        "peak_device_bytes": alloc + slack + context + PLANTED_WORKSPACE,
        "cuda_context_bytes": context, "peak_phase": pred["peak_phase"],
        "phases": {ph: {"max_allocated_bytes": int(sum(bd.values()))} for ph, bd in pred["phases"].items()},
    }
    return rec


@pytest.fixture(scope="module")
def records():
    rng = random.Random(7)
    return [_record(e, rng) for e in _experiments()]


def test_fit_recovers_planted_overheads(records):
    res = fit(records, now="2026-01-01T00:00:00+00:00")
    ov = res["overheads"]
    assert res["fit_quality"]["n_heldout"] >= 3 and res["fit_quality"]["n_fit"] >= 10
    assert ov.cuda_context_bytes == pytest.approx(PLANTED_CONTEXT, rel=RECOVERY_TOLERANCE)
    assert ov.workspaces_bytes == pytest.approx(PLANTED_WORKSPACE, rel=RECOVERY_TOLERANCE)
    assert ov.allocator_slack_fraction == pytest.approx(PLANTED_SLACK, rel=RECOVERY_TOLERANCE)
    assert res["corrections"] == {}  # ±0.5% noise is not a systematic error
    dev = res["heldout"]["device"]
    assert dev["median_after"] < dev["median_before"] and dev["p95_after"] < 2 * NOISE


def test_fit_is_robust_to_a_disturbed_record(records):
    bad = [dict(r) for r in records]
    for i in (0, 5):  # two records with another process on the GPU that nobody flagged
        bad[i] = {**bad[i], "measured": {**bad[i]["measured"],
                                        "peak_device_bytes": bad[i]["measured"]["peak_device_bytes"] + 3000 * MiB}}
    ov = fit(bad)["overheads"]
    assert ov.allocator_slack_fraction == pytest.approx(PLANTED_SLACK, rel=RECOVERY_TOLERANCE)
    assert ov.workspaces_bytes == pytest.approx(PLANTED_WORKSPACE, rel=0.05)


def test_systematic_category_error_becomes_a_correction(records):
    skewed = [{**r, "measured": {**r["measured"], "peak_allocated_bytes": int(r["measured"]["peak_allocated_bytes"] * 1.1)}}
              for r in records]
    res = fit(skewed)
    assert res["corrections"]["peak_allocated"] == pytest.approx(1.1, rel=0.01)


def test_a_category_measured_empty_is_no_correction_and_the_table_loads(records, tmp_path):
    """Measured breakdowns that put nothing under a category the prediction fills (a GPU run's temporaries) give
    a ratio of 0, not a factor: no correction, and the table written loads (load_calibration refuses ≤ 0)."""
    zeroed = []
    for r in records:
        pbd = {**r["predicted"]["breakdown"], "temporaries": 64 * MiB}
        mbd = {c: v for c, v in pbd.items() if c in ("weights", "kv_cache", "activations")}
        mbd["temporaries"] = 0
        zeroed.append({**r, "predicted": {**r["predicted"], "breakdown": pbd},
                       "measured": {**r["measured"], "breakdown": mbd}})
    res = fit(zeroed)
    assert "temporaries" not in res["corrections"]
    load_calibration(write_calibration(res, str(tmp_path), records_path="synthetic"))


def test_split_is_deterministic(records):
    hashes = [r["spec_hash"] for r in records]
    assert [is_heldout(h) for h in hashes] == [is_heldout(h) for h in hashes]
    assert 0 < sum(map(is_heldout, hashes)) < len(hashes)


def test_table_round_trip_and_lookup(records, tmp_path):
    res = fit(records)
    path = write_calibration(res, str(tmp_path), records_path="synthetic")
    assert os.path.basename(path) == env_slug(res["environment_key"]) + ".csv"
    cal = load_calibration(path)
    assert cal.overheads.cuda_context_bytes == res["overheads"].cuda_context_bytes
    assert cal.overheads.allocator_slack_fraction == pytest.approx(PLANTED_SLACK, rel=RECOVERY_TOLERANCE)
    assert os.path.basename(path) in cal.overheads.source and "held-out device error" in cal.overheads.source
    assert cal.provenance["n_fit"] == str(res["fit_quality"]["n_fit"])
    assert find_calibration("H100", str(tmp_path)).path == path
    assert find_calibration("h100-sxm", str(tmp_path)).path == path  # catalog alias of the NVML name
    assert find_calibration("H100 PCIe", str(tmp_path)) is None  # another card, though its name contains H100
    assert find_calibration("RTX 4090", str(tmp_path)) is None
    # Applied to a prediction, the table reproduces the planted device bytes within the noise.
    r = records[0]
    _, device = calibrated_totals(r["predicted"], cal.overheads, cal.corrections)
    assert device == pytest.approx(r["measured"]["peak_device_bytes"], rel=2 * NOISE)


def test_fit_refuses_mixed_environments(records):
    other = [{**r, "env": {**ENV, "gpu": {"name": "NVIDIA A100", "driver": "535"}}} for r in records[:3]]
    with pytest.raises(ValueError, match="environments"):
        fit(records + other)


def _write(dirpath, recs):
    for r in recs:
        write_record(str(dirpath), r)
    return str(dirpath)


def test_check_unchanged_rerun_passes(tmp_path):
    exps = _experiments()
    base = _write(tmp_path / "base", [_record(e, random.Random(1)) for e in exps])
    rng = random.Random(2)
    new = _write(tmp_path / "new", [_record(e, rng) for e in exps])
    comps = check(base, new)
    assert not is_regression(comps)
    assert {c.status for c in comps} == {"unchanged"}


def test_check_catches_and_names_planted_regression(tmp_path):
    exps = _experiments()
    base = _write(tmp_path / "base", [_record(e, random.Random(1)) for e in exps])
    rng = random.Random(3)
    oom = exps[4].spec_hash
    new = _write(tmp_path / "new", [_record(e, rng, context=PLANTED_CONTEXT + 300 * MiB,
                                            outcome="oom" if e.spec_hash == oom else "ok") for e in exps])
    comps = {c.spec_hash: c for c in check(base, new)}
    assert is_regression(comps.values())
    assert comps[oom].status == "new failure" and "oom" in comps[oom].line()
    worse = [c for c in comps.values() if c.status == "worse"]
    assert worse, "a +300 MiB context must count at least where it exceeds 3% of the device total"
    for c in worse:
        assert c.moved[0] == "CUDA context +300 MiB"
    assert all(c.status in ("worse", "unchanged", "new failure") for c in comps.values())


def test_check_statuses_fixed_and_unreadable(tmp_path):
    exps = _experiments()[:3]
    rng = random.Random(4)
    base_recs = [_record(exps[0], rng, outcome="oom"), _record(exps[1], rng), _record(exps[2], rng)]
    new_recs = [_record(exps[0], rng), {**_record(exps[1], rng), "schema_version": SCHEMA_VERSION + 1},
                _record(exps[2], rng)]
    comps = {c.spec_hash: c.status for c in check(_write(tmp_path / "b", base_recs), _write(tmp_path / "n", new_recs))}
    assert comps[exps[0].spec_hash] == "fixed"
    assert comps[exps[1].spec_hash] == "unreadable"  # a newer schema: named, never compared or skipped
    assert comps[exps[2].spec_hash] == "unchanged"


def test_thresholds_parse_and_reject():
    t = parse_thresholds(["peak_device:3%", "peak_device:256MiB"])
    assert t == {"peak_device": [("rel", 0.03), ("abs", 256 * MiB)]}
    with pytest.raises(CheckError, match="peak_devic"):
        parse_thresholds(["peak_devic:3%"])
    with pytest.raises(CheckError, match="neither"):
        parse_thresholds(["peak_device:lots"])


def test_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    assert main(["check", str(tmp_path / "r"), str(tmp_path / "r"), "--threshold", "peak:5%"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--threshold peak:5%" in err  # thresholds are checked before any file is read
    assert main(["fit", str(tmp_path / "r")]) == 2 and "no usable measured records" in capsys.readouterr().err


def test_cli_fit_check_report(tmp_path, capsys, records):
    src = _write(tmp_path / "recs", records)
    assert main(["fit", src, "--out", str(tmp_path / "cal")]) == 0
    out = capsys.readouterr().out
    assert "held-out device" in out and "cuda context 437 MiB" in out and "workspaces 40 MiB" in out
    assert main(["check", src, src]) == 0
    assert main(["check", src, str(tmp_path / "nope")]) == 2
    assert "no record files" in capsys.readouterr().err
    assert main(["report", src, "--out", str(tmp_path / "rep")]) == 0
    html = open(tmp_path / "rep" / "report.html", encoding="utf-8").read()
    assert "data:image/png;base64," in html and "16 bytes per parameter" in html
    assert os.path.exists(tmp_path / "rep" / "report.md")


def test_predict_and_plan_use_the_same_table(records, tmp_path, capsys):
    """The planner's overheads come from the same lookup as predict's: here a table fitted on an H100."""
    import json

    path = write_calibration(fit(records), str(tmp_path))
    assert overheads_for("H100 SXM", directory=str(tmp_path)).calibrated  # found by GPU name
    assert not overheads_for("RTX 4090", directory=str(tmp_path)).calibrated  # another card: the defaults
    assert main(["predict", "--model", "Llama-3.1-8B", "--gpu", "H100", "--calibration", path, "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["calibrated"] is True and pred["breakdown"]["cuda_context"] == load_calibration(path).overheads.cuda_context_bytes
    assert main(["plan", "--model", "Llama-3.1-8B", "--gpu", "H100", "--calibration", path, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["calibrated"] is True and plan["fit"]["per_gpu_bytes"] == pred["peak_device_bytes"]
    assert main(["plan", "--model", "Llama-3.1-8B", "--gpu", "H100", "--calibration", path]) == 0
    assert "calibrated: calibration " in capsys.readouterr().out

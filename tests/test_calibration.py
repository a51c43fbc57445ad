"""Calibration, check and report on synthetic records with planted overheads and regressions (CPU only)."""

import os
import random

import pytest

from formulas import categories as C
from formulas.predict import predict
from formulas.units import MiB
from harness.analysis.calibrate import (
    env_slug,
    find_calibration,
    fit,
    load_calibration,
    overheads_for,
    write_calibration,
)
from harness.analysis.check import CheckError, check, is_regression, parse_thresholds
from harness.records import measured_device_breakdown
from harness.cli import main
from harness.records import SCHEMA_VERSION, write_record
from harness.sweep.schema import expand_sweep

PLANTED_CONTEXT = 437 * MiB  # CUDA context at init
PLANTED_IMAGES = {"gemm": 91 * MiB, "train": 55 * MiB}  # kernel images the workloads load
PLANTED_SHARE = {"inference": 0.21, "train": 0.63}  # allocator slack: share of the transient bytes
RECOVERY_TOLERANCE = 0.01  # the bar: planted figures recovered within 1%
NOISE = 0.005  # run-to-run noise on allocated bytes: ±0.5%
ENV = {"gpu": {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15"}, "torch_cuda": "12.4",
       "packages": {"torch": "2.5.1", "transformers": "4.46.0", "bitsandbytes": "0.44.1"}}


def _experiments():
    sweep = {"defaults": {"model": "Qwen2.5-0.5B"},
             "groups": [{"name": "inf", "grid": {"model": ["Qwen2.5-0.5B", "Llama-3.1-8B"], "batch": [1, 4, 16],
                                                 "seq": [512, 2048, 8192]}},
                        {"name": "train", "set": {"mode": "train", "method": "lora"},
                         "grid": {"model": ["Qwen2.5-7B", "Qwen2.5-0.5B"], "seq": [512, 1024, 2048, 4096],
                                  "batch": [1, 2]}}]}
    return expand_sweep(sweep, "synthetic.yaml")


def _record(exp, rng, context=PLANTED_CONTEXT, outcome="ok"):
    """A measured record of `exp` in a cold process, its device figures made from the planted environment."""
    from formulas.overhead import DEFAULT_OVERHEADS
    from harness.analysis.repredict import spec_of

    pred_obj = predict(spec_of({**exp.to_dict(), "env": ENV}))
    pred = pred_obj.to_dict()
    pred.pop("spec")
    rec = {"schema_version": SCHEMA_VERSION, "spec_hash": exp.spec_hash, "formula_hash": "f0", **exp.to_dict(),
           "predicted": pred, "source": "measured", "outcome": outcome, "env": ENV, "error": None, "measured": None,
           "traced": None}
    if outcome != "ok":
        rec["error"] = {"type": "OutOfMemoryError", "message": "CUDA out of memory. Tried to allocate 2.00 GiB"}
        return rec
    mode = exp.spec.mode
    alloc = int(pred["peak_allocated_bytes"] * (1 + rng.uniform(-NOISE, NOISE)))
    transient = DEFAULT_OVERHEADS.transient(pred_obj.phases[pred_obj.peak_phase])
    from formulas.catalog import get_shape
    from formulas.predict import load_slack, workload_static
    from formulas.spec import validate

    st = workload_static(validate(pred_obj.spec, get_shape(pred_obj.spec.model)))
    reserved = alloc + load_slack(st, DEFAULT_OVERHEADS) + int(PLANTED_SHARE[mode] * transient)
    outside = context + PLANTED_IMAGES["gemm"] + (PLANTED_IMAGES["train"] if mode == "train" else 0)
    rec["measured"] = {
        "peak_allocated_bytes": alloc, "peak_reserved_bytes": reserved, "peak_device_bytes": reserved + outside,
        "cuda_context_bytes": context, "peak_phase": pred["peak_phase"],
        "phases": {ph: {"max_allocated_bytes": int(sum(bd.values()))} for ph, bd in pred["phases"].items()},
    }
    return rec


@pytest.fixture(scope="module")
def records():
    rng = random.Random(7)
    return [_record(e, rng) for e in _experiments()]


def test_fit_recovers_the_planted_environment(records):
    res = fit(records, now="2026-01-01T00:00:00+00:00")
    ov = res["overheads"]
    assert res["fit_quality"]["n_fit"] == len(records) and res["fit_quality"]["n_models"] == 3
    assert ov.cuda_context_bytes == PLANTED_CONTEXT  # the records' own context at init
    images = dict(ov.kernel_images)
    for fam, planted in PLANTED_IMAGES.items():
        assert images[fam] == pytest.approx(planted, rel=RECOVERY_TOLERANCE)
    share = dict(ov.slack_share)
    for mode, planted in PLANTED_SHARE.items():
        assert share[mode] == pytest.approx(planted, rel=0.05)  # the ±0.5% allocated noise lands on the slack
    dev = res["heldout"]["device"]
    assert dev["n"] == len(records)  # every record scored by a table that never saw its model
    assert dev["median_after"] < dev["median_before"] and dev["p95_after"] < 4 * NOISE


def test_fit_is_robust_to_a_disturbed_record(records):
    bad = [dict(r) for r in records]
    for i in (0, 5):  # two records with another process on the GPU that nobody flagged
        bad[i] = {**bad[i], "measured": {**bad[i]["measured"],
                                        "peak_device_bytes": bad[i]["measured"]["peak_device_bytes"] + 3000 * MiB}}
    images = dict(fit(bad)["overheads"].kernel_images)
    assert images["gemm"] == pytest.approx(PLANTED_IMAGES["gemm"], rel=0.05)


def test_held_out_by_model_never_scores_a_model_with_its_own_records(records, monkeypatch):
    """Each model is scored by a table fitted on the others: planting a different context for one model moves its
    held-out error, never the table it is scored by."""
    from harness.analysis import calibrate as cal

    seen = []
    real = cal.fit_overheads

    def spy(recs, base, loaded):
        seen.append({cal.model_of(r) for r in recs})
        return real(recs, base, loaded)

    monkeypatch.setattr(cal, "fit_overheads", spy)
    _, rows = cal.heldout_by_model(records, cal.default_overheads((9, 0)), {})
    models = {cal.model_of(r) for r in records}
    assert len(seen) == len(models) and all(len(s) == len(models) - 1 for s in seen)
    assert {r["model"] for r in rows} == models


def test_table_round_trip_and_lookup(records, tmp_path):
    res = fit(records)
    path = write_calibration(res, str(tmp_path), records_path="synthetic")
    assert os.path.basename(path) == env_slug(res["environment_key"]) + ".csv"
    cal = load_calibration(path)
    assert cal.overheads.cuda_context_bytes == res["overheads"].cuda_context_bytes
    assert dict(cal.overheads.slack_share)["train"] == pytest.approx(PLANTED_SHARE["train"], rel=0.05)
    assert os.path.basename(path) in cal.overheads.source and "held out by model" in cal.overheads.source
    assert cal.provenance["n_fit"] == str(res["fit_quality"]["n_fit"])
    assert find_calibration("H100", str(tmp_path)).path == path
    assert find_calibration("h100-sxm", str(tmp_path)).path == path  # catalog alias of the NVML name
    assert find_calibration("H100 PCIe", str(tmp_path)) is None  # another card, though its name contains H100
    assert find_calibration("RTX 4090", str(tmp_path)) is None
    # Applied to a prediction, the table reproduces the planted device bytes within the noise.
    from harness.analysis.repredict import repredict

    r = records[0]
    _, device = repredict(r, cal.overheads)
    assert device == pytest.approx(r["measured"]["peak_device_bytes"], rel=2 * NOISE)


def test_an_older_table_is_refused_in_one_line(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text("parameter,value,note\ncuda_context_bytes,648871936,\nworkspaces_bytes,127926272,\n"
                   "allocator_slack_fraction,0.045,\nallocator_slack_min_bytes,0,\n")
    with pytest.raises(ValueError, match="older format.*vramlab fit"):
        load_calibration(str(old))


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


ENV_H200 = {"gpu": {"name": "NVIDIA H200", "driver": "580.159.04"}, "torch_cuda": "13.0",
            "packages": {"torch": "2.11.0", "transformers": "5.17.0", "bitsandbytes": "0.50.2"}}


def _in_environment(rec, env, context_delta=0, workspace_delta=0, activations_delta=0):
    """`rec` as another environment measured it: the same tensors (its breakdown the prediction's), another context
    (outside the allocator) and cuBLAS workspaces (inside it: allocated, reserved and device move with them);
    `activations_delta` plants a tensor-level change."""
    m = dict(rec["measured"])
    bd = {c: v for c, v in rec["predicted"]["breakdown"].items() if c in C.TENSOR_CATEGORIES}
    bd["activations"] = bd.get("activations", 0) + activations_delta
    m["breakdown"] = bd
    m["workspaces_bytes"] = 32 * MiB + workspace_delta
    m["peak_allocated_bytes"] += activations_delta + workspace_delta
    m["peak_reserved_bytes"] += activations_delta + workspace_delta
    m["cuda_context_bytes"] += context_delta
    m["peak_device_bytes"] += activations_delta + context_delta + workspace_delta
    m["device_breakdown"] = measured_device_breakdown(m)
    return {**rec, "env": env, "measured": m}


def test_check_across_environments_names_context_and_workspaces_not_tensor_categories(tmp_path, capsys):
    """H100 records against H200 ones: the context 90 MiB smaller, the cuBLAS workspaces 120 MiB larger, the tensors alike —
    every experiment differs by environment, none is a regression, and no tensor category is named; the same move
    within one environment would be compared as before. A tensor category that moves across environments is."""
    exps = _experiments()
    rng = random.Random(5)
    base_recs = [_in_environment(_record(e, rng), ENV) for e in exps]
    new_recs = [_in_environment(r, ENV_H200, context_delta=-90 * MiB, workspace_delta=120 * MiB) for r in base_recs]
    base, new = _write(tmp_path / "h100", base_recs), _write(tmp_path / "h200", new_recs)
    comps = check(base, new)
    assert not is_regression(comps)
    assert {c.status for c in comps} == {"environment"}
    for c in comps:
        named = {item.rsplit(" ", 2)[0] for item in c.environment}
        assert named == {"CUDA context", "workspaces"}, c.line()
        assert not c.moved and not any(cat in c.line() for cat in C.TENSOR_CATEGORIES)
    assert main(["check", base, new]) == 0
    out = capsys.readouterr().out
    assert "environment effect: CUDA context differs in" in out and "(median -90 MiB)" in out
    assert "environment effect: workspaces differs in" in out and "(median +120 MiB)" in out
    # a tensor category that moves is a regression across environments too, and is named
    grown = exps[2].spec_hash
    new_recs = [_in_environment(r, ENV_H200, context_delta=-90 * MiB, workspace_delta=120 * MiB,
                                activations_delta=2048 * MiB if r["spec_hash"] == grown else 0) for r in base_recs]
    comps = {c.spec_hash: c for c in check(base, _write(tmp_path / "h200-grown", new_recs))}
    assert is_regression(comps.values()) and comps[grown].status == "worse"
    assert comps[grown].moved[0] == "activations +2,048 MiB" and "CUDA context" not in " ".join(comps[grown].moved)
    # within one environment the same context change is still compared as a regression where it counts
    same = [_in_environment(r, ENV, context_delta=300 * MiB) for r in base_recs]
    assert is_regression(check(base, _write(tmp_path / "h100-again", same)))


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
    assert "held out by model" in out and "cuda context 437 MiB" in out and "kernel images" in out
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
    ov = load_calibration(path).overheads
    assert pred["calibrated"] is True  # outside the allocator: the table's context and the GEMM kernels' images
    assert pred["breakdown"]["cuda_context"] == ov.cuda_context_bytes + dict(ov.kernel_images)["gemm"]
    assert main(["plan", "--model", "Llama-3.1-8B", "--gpu", "H100", "--calibration", path, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["calibrated"] is True and plan["fit"]["per_gpu_bytes"] == pred["peak_device_bytes"]
    assert main(["plan", "--model", "Llama-3.1-8B", "--gpu", "H100", "--calibration", path]) == 0
    assert "calibrated: calibration " in capsys.readouterr().out

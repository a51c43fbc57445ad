"""A short GPU window (issue #32): boundary searches, the order the experiments run in, --only, the allocator's
settings per experiment, and sweeps that ask a model for positions it does not have."""

import json
import os
import sys

import pytest

from harness.records import iter_records
from harness.sweep.launcher import order_experiments, run_sweep
from harness.sweep.schema import SweepError, expand_sweep, load_sweep
from harness.sweep.search import BoundarySearch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STANDIN = [sys.executable, os.path.join(HERE, "standin_worker.py"), "--out"]


# ------------------------------------------------------------------ the search itself

def _settle(boundary, start, lo=1, hi=64, step=1):
    """Run a search against a card where values up to `boundary` fit; return (result, probes in order)."""
    s = BoundarySearch(base=None, axis="batch", lo=lo, hi=hi, step=step, start=start)
    probes = []
    while (v := s.next_value()) is not None:
        probes.append(v)
        s.feed(v, "ok" if v <= boundary else "oom")
        assert len(probes) <= 20
    return s.result(), probes


@pytest.mark.parametrize("boundary", [0, 1, 2, 7, 31, 32, 33, 63, 64, 100])
@pytest.mark.parametrize("start", [1, 8, 32, 64, 200])
def test_the_search_finds_the_boundary_from_any_start(boundary, start):
    r, probes = _settle(boundary, start)
    assert r["done"] and not r["stopped"]
    assert r["largest_ok"] == (min(boundary, 64) if boundary >= 1 else None)
    assert r["smallest_oom"] == (boundary + 1 if boundary < 64 else None)
    assert len(set(probes)) == len(probes) <= 14  # each value once; gallop then bisect, never a linear walk


def test_a_right_prediction_settles_the_boundary_in_two_probes():
    r, probes = _settle(boundary=9, start=9)
    assert probes == [9, 10] and r["largest_ok"] == 9 and r["smallest_oom"] == 10


def test_the_grid_has_a_step_and_the_start_is_taken_down_to_it():
    r, probes = _settle(boundary=7_000, start=7_687, lo=512, hi=32_768, step=256)
    assert probes[0] == 7_680  # the largest grid value ≤ 7,687
    assert r["largest_ok"] == 6_912 and r["smallest_oom"] == 7_168  # one step apart, on the grid


def test_a_failure_that_is_not_memory_stops_the_search_and_says_why():
    s = BoundarySearch(base=None, axis="seq", lo=256, hi=4096, step=256, start=1024)
    s.feed(s.next_value(), "error")
    assert s.next_value() is None
    r = s.result()
    assert not r["done"] and "error at seq 1,024" in r["stopped"] and "not a memory result" in r["stopped"]


def test_outcomes_against_the_premise_stop_the_search():
    s = BoundarySearch(base=None, axis="batch", lo=1, hi=16, step=1, start=4)
    s.feed(4, "oom")
    s.feed(8, "ok")
    assert s.next_value() is None and "does not grow" in s.result()["stopped"]


# ------------------------------------------------------------------ in a sweep

SEARCH_DOC = {"defaults": {"model": "gpt2", "seq": 32, "timeout_s": 30},
              "groups": [{"name": "edge", "search": {"axis": "batch", "lo": 1, "hi": 16, "step": 1}},
                         {"name": "grid", "grid": {"batch": [2, 3]}}]}


def test_a_search_group_probes_one_record_at_a_time_keeps_ooms_and_resumes(tmp_path, monkeypatch):
    exps = expand_sweep(SEARCH_DOC, "edge.yaml")
    assert [e.spec.batch for e in exps] == [2, 3] and len(exps.searches) == 1
    monkeypatch.setenv("STANDIN_LIMIT", "batch=5")
    out = str(tmp_path / "out")
    s = run_sweep(exps, out, worker_cmd=STANDIN + [out], progress=False, poll_s=0.02, warm=True,
                  searches=exps.searches)
    search = exps.searches[0]
    r = search.result()
    assert r["done"] and r["largest_ok"] == 5 and r["smallest_oom"] == 6
    recs = {rec["spec"]["batch"]: rec for rec in iter_records(out)}
    assert recs[6]["outcome"] == "oom" and recs[5]["outcome"] == "ok"  # the OOM is a record, kept as data
    probes = [b for b, rec in recs.items() if rec.get("search")]
    assert sorted(probes) == sorted(search.outcomes) and recs[5]["search"] == {"axis": "batch", "lo": 1, "hi": 16,
                                                                                  "step": 1}
    with open(os.path.join(out, ".completed")) as f:
        ran = f.read().split()
    assert len(ran) == len(set(ran)) == len(recs)  # batch 2 or 3, a grid experiment and a probe, ran once
    assert s.ran == len(recs)
    # a rerun reads the probes' records and runs nothing
    again = expand_sweep(SEARCH_DOC, "edge.yaml")
    s2 = run_sweep(again, out, worker_cmd=STANDIN + [out], progress=False, poll_s=0.02, searches=again.searches)
    assert s2.ran == 0 and again.searches[0].result() == r


def test_a_search_stops_at_a_failure_that_is_not_memory(tmp_path, monkeypatch):
    exps = expand_sweep(SEARCH_DOC, "edge.yaml")
    monkeypatch.setenv("STANDIN_ERROR_AT", "batch=2")
    out = str(tmp_path / "out")
    run_sweep([], out, worker_cmd=STANDIN + [out], progress=False, poll_s=0.02, searches=exps.searches)
    r = exps.searches[0].result()
    assert not r["done"] and "error at batch 2" in r["stopped"]


@pytest.mark.parametrize("search,needle", [
    ({"axis": "gen", "lo": 1, "hi": 8, "step": 1}, "search.axis: 'gen' is not one of batch, seq"),
    ({"axis": "batch", "lo": 8, "hi": 8, "step": 1}, "hi 8 must be above lo 8"),
    ({"axis": "batch", "lo": 1, "hi": 8}, "missing step"),
    ({"axis": "batch", "lo": 0, "hi": 8, "step": 1}, "search.lo: 0 must be a whole number ≥ 1"),
    ({"axis": "seq", "lo": 64, "hi": 4096, "step": 64}, "seq 4,096: openai-community/gpt2 has 1,024 learned positions"),
])
def test_a_bad_search_is_one_line(search, needle):
    with pytest.raises(SweepError) as e:
        expand_sweep({"defaults": {"model": "gpt2", "seq": 32}, "groups": [{"search": search}]}, "bad.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_rtx4090_sweep_searches_four_workloads_from_vramlab_plans_answer():
    pytest.importorskip("yaml")
    _, exps = load_sweep(os.path.join(ROOT, "experiments", "rtx4090.yaml"))
    searches = exps.searches
    assert len(searches) == 8 and {s.axis for s in searches} == {"batch", "seq"}
    assert {s.base.spec.model for s in searches} == {"meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B",
                                                     "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "Qwen/Qwen2.5-3B"}
    for s in searches:
        assert s.base.cap_gpu == "RTX 4090"
        first = s.next_value()
        assert s.lo <= first <= s.hi and first == s.value(s.index(min(max(s.predicted(), s.lo), s.hi)))


# ------------------------------------------------------------------ order, selection

def test_unmeasured_first_training_before_inference_and_default_allocator_first():
    exps = expand_sweep({"defaults": {"model": "gpt2", "seq": 32},
                         "groups": [{"set": {"mode": "inference"}, "grid": {"batch": [1, 2]}},
                                    {"set": {"mode": "train"}, "grid": {"batch": [1, 2],
                                                                        "alloc_conf": ["", "expandable_segments:True"]}}]},
                        "o.yaml")
    inf1, inf2, tr1, tr1x, tr2, tr2x = exps
    assert order_experiments(exps) == [inf1, inf2, tr1, tr2, tr1x, tr2x]  # file order, twins after
    measured = {tr1.spec_hash, inf1.spec_hash}
    assert order_experiments(exps, "unmeasured", measured) == [tr2, inf2, tr1, inf1, tr1x, tr2x]


def test_only_selects_by_any_field_and_refuses_an_unknown_one():
    from harness.cli.run import select

    exps = expand_sweep({"defaults": {"model": "gpt2", "seq": 32},
                         "grid": {"mode": ["inference", "train"], "alloc_conf": ["", "expandable_segments:True"]}},
                        "o.yaml")
    assert [(e.spec.mode, e.alloc_conf) for e in select(exps, [("alloc_conf", "")])] == [("inference", ""), ("train", "")]
    assert len(select(exps, [("mode", "train"), ("alloc_conf", "expandable_segments:True")])) == 1
    assert len(select(exps, [("mode", "train"), ("mode", "inference")])) == 4
    with pytest.raises(ValueError, match="'alloc' is not a field"):
        select(exps, [("alloc", "")])


# ------------------------------------------------------------------ the allocator's settings

def test_each_worker_runs_with_its_experiments_allocator_settings(tmp_path):
    exps = expand_sweep({"defaults": {"model": "gpt2", "timeout_s": 30},
                         "grid": {"seq": [32, 33], "alloc_conf": ["expandable_segments:True", ""]}}, "a.yaml")
    assert len({e.spec_hash for e in exps}) == 4  # part of what the experiment is
    out = str(tmp_path)
    run_sweep(exps, out, worker_cmd=STANDIN + [out], progress=False, poll_s=0.02, warm=True)
    alloc = {e.spec_hash: e.alloc_conf for e in exps}
    by_setting = {}
    for r in iter_records(out):
        assert r["env"]["PYTORCH_CUDA_ALLOC_CONF"] == (alloc[r["spec_hash"]] or None)
        by_setting.setdefault(alloc[r["spec_hash"]], set()).add(r["traced"]["process"]["pid"])
    assert len(by_setting[""]) == len(by_setting["expandable_segments:True"]) == 1  # one warm worker per setting …
    assert not by_setting[""] & by_setting["expandable_segments:True"]  # … not the same one


def test_a_worker_under_other_allocator_settings_refuses_to_measure(monkeypatch):
    from harness.sweep.worker import run_one

    (exp,) = expand_sweep({"defaults": {"model": "gpt2", "seq": 32, "alloc_conf": "expandable_segments:True"}}, "a.yaml")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    with pytest.raises(RuntimeError, match="asks PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True', this worker runs "
                                           "with ''"):
        run_one(exp, "measure", {})


@pytest.mark.parametrize("value", ["expandable_segments", "expandable_segments:True,", "a b:c"])
def test_a_bad_alloc_conf_is_one_line(value):
    with pytest.raises(SweepError, match="alloc_conf: .* is not PYTORCH_CUDA_ALLOC_CONF's"):
        expand_sweep({"defaults": {"model": "gpt2", "seq": 32, "alloc_conf": value}}, "a.yaml")


def test_allocator_settings_are_part_of_the_environment_key():
    from harness.env import environment_key

    env = {"gpu": {"name": "NVIDIA H200", "driver": "580"}, "packages": {"torch": "2.11"}}
    assert environment_key(env) == environment_key({**env, "alloc_conf": ""})  # old keys stay as they were
    assert environment_key({**env, "alloc_conf": "expandable_segments:True"}).endswith("|alloc=expandable_segments:True")


# ------------------------------------------------------------------ positions

def test_a_sweep_past_a_learned_position_table_is_one_line():
    with pytest.raises(SweepError) as e:
        expand_sweep({"defaults": {"model": "openai-community/gpt2-medium", "mode": "inference", "seq": 1024,
                                   "gen": 16}}, "p.yaml")
    msg = str(e.value)
    assert "seq 1,024 + gen 16 = 1,040 positions" in msg and "1,024 learned positions" in msg
    assert "at most seq 1,008 with gen 16" in msg and "\n" not in msg
    (ok,) = expand_sweep({"defaults": {"model": "openai-community/gpt2-medium", "mode": "inference", "seq": 1008,
                                       "gen": 16}}, "p.yaml")
    rope = expand_sweep({"defaults": {"model": "Qwen/Qwen2.5-0.5B", "seq": 40000}}, "p.yaml")  # rotary: computed
    assert ok and rope


def test_the_reference_sweep_keeps_gpt2_medium_inside_its_positions():
    pytest.importorskip("yaml")
    _, exps = load_sweep(os.path.join(ROOT, "experiments", "reference.yaml"))
    gpt2 = [e for e in exps if e.spec.model == "openai-community/gpt2-medium"]
    assert gpt2 and max(e.spec.seq + e.spec.gen for e in gpt2) == 1024
    twinned = [e for e in exps if e.spec.mode == "train" and not e.group.startswith("train-recipes")]
    assert twinned and len(twinned) == 2 * sum(not e.alloc_conf for e in twinned)
    assert all(not e.alloc_conf for e in exps if e.group.startswith("train-recipes"))


def test_a_rehearsed_probe_is_json_round_trip(tmp_path):
    """What the launcher sends a worker (Experiment.to_dict) comes back whole, the search included."""
    from harness.sweep.schema import Experiment

    exps = expand_sweep(SEARCH_DOC, "edge.yaml")
    probe = exps.searches[0].probe(4)
    back = Experiment.from_dict(json.loads(json.dumps(probe.to_dict())))
    assert back == probe and back.spec_hash == probe.spec_hash and back.search == ("batch", 1, 16, 1)


# ------------------------------------------------------------------ the report's tables

@pytest.mark.parametrize("offset,within", [(0, "yes"), (3, "no")])
def test_the_report_puts_the_measured_boundary_beside_vramlab_plan(tmp_path, monkeypatch, offset, within):
    from harness.analysis.report import boundary_table
    from harness.sweep.search import planned_boundary

    doc = {"defaults": {"model": "meta-llama/Llama-3.1-8B", "mode": "inference", "dtype": "bf16", "seq": 4096,
                        "gen": 2, "cap_gpu": "RTX 4090", "timeout_s": 30},
           "groups": [{"name": "edge", "search": {"axis": "batch", "lo": 1, "hi": 64, "step": 1}}]}
    exps = expand_sweep(doc, "edge.yaml")
    plan = planned_boundary(exps.searches[0].base.spec, "batch", "RTX 4090")
    assert 2 <= plan < 60
    monkeypatch.setenv("STANDIN_LIMIT", f"batch={plan + offset}")  # the card holds `offset` more than predicted
    out = str(tmp_path / "out")
    run_sweep([], out, worker_cmd=STANDIN + [out], progress=False, poll_s=0.02, searches=exps.searches)
    if offset == 0:
        assert exps.searches[0].result()["probes"] == 2  # a right prediction: two probes
    (row,) = boundary_table(list(iter_records(out)))
    assert row["largest that ran"] == f"{plan + offset:,}" and row["smallest OOM"] == f"{plan + offset + 1:,}"
    assert row["vramlab plan"] == f"{plan:,}" and row["within one step"] == within and row["state"] == "settled"
    assert "Llama-3.1-8B inference bf16 seq 4096: batch 1..64 step 1 under RTX 4090" in row["search"]


def test_the_category_table_reads_the_h200_records():
    """The README's table of measured vs predicted by category and mode, per environment, from the committed records."""
    from harness.analysis.report import category_table

    rows = category_table(list(iter_records(os.path.join(ROOT, "results", "runs"))))
    h200 = [r for r in rows if r["environment"].startswith("NVIDIA H200 · driver 580.159.04 (measured)")]
    assert {r["mode"] for r in h200} >= {"inference", "train"}
    cats = {(r["mode"], r["category"]): r for r in h200}
    assert abs(cats["inference", "weights"]["error of sums"]) < 0.01 and cats["inference", "weights"]["n"] >= 50
    for key in (("inference", "kv_cache"), ("inference", "cuda_context"), ("train", "optimizer_states"),
                ("train", "peak device")):
        assert key in cats, key


def test_check_tells_allocator_twins_apart(tmp_path):
    """A baseline with the expandable_segments twin, a new set without it: the twin is missing, not 'not comparable'."""
    from harness.analysis.check import check
    from harness.records import SCHEMA_VERSION, write_record

    exps = expand_sweep({"defaults": {"model": "gpt2", "seq": 32, "mode": "train"},
                         "grid": {"alloc_conf": ["", "expandable_segments:True"]}}, "t.yaml")

    def rec(e):
        return {"schema_version": SCHEMA_VERSION, "spec_hash": e.spec_hash, **e.to_dict(), "source": "traced",
                "outcome": "ok", "traced": {"peak_allocated_bytes": 10**9}, "predicted": {}, "env": {}}

    for e in exps:
        write_record(str(tmp_path / "base"), rec(e))
    write_record(str(tmp_path / "new"), rec(exps[0]))
    statuses = {c.spec_hash: c.status for c in check(str(tmp_path / "base"), str(tmp_path / "new"))}
    assert statuses == {exps[0].spec_hash: "unchanged", exps[1].spec_hash: "missing"}


def test_shard_and_only_slice_the_searches_too(capsys):
    pytest.importorskip("yaml")
    from harness.cli import main

    def searches(*args):
        assert main(["run", os.path.join(ROOT, "experiments", "rtx4090.yaml"), "--dry-run", *args]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("search ")]

    assert len(searches()) == 8
    assert len(searches("--shard", "1/4")) == 2 and len(searches("--shard", "4/4")) == 2
    inference = searches("--only", "mode=inference")
    assert len(inference) == 2 and all("R1-Distill-Qwen-7B inference" in line for line in inference)
    assert searches("--only", "alloc_conf=expandable_segments:True") == []  # the searches run the default allocator

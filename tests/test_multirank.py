"""Multi-GPU experiments: the sweep's `strategy:` sugar, packing onto GPU slots, and ranks rehearsed on the CPU.

The rehearsals run the real path — launcher → cold worker → torchrun → one process per rank over gloo —
on a tiny Llama (hidden 64, 2 layers, vocabulary 256), so CI checks the orchestration a GPU box runs
with NCCL: one record per experiment with every rank's figures, a killed rank failing the experiment
with one record, and no process left behind.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from harness.records import iter_records, read_record, record_path
from harness.sweep.launcher import next_to_start, run_sweep
from harness.sweep.schema import SweepError, expand_sweep, load_sweep

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_configs import write  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STANDIN = [sys.executable, os.path.join(HERE, "standin_worker.py"), "--out"]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux's")


def _tiny(tmp_path):
    return write(tmp_path, "llama", vocab_size=256)


def _rehearsal(model, **fields):
    run = {"model": model, "mode": "train", "dtype": "fp32", "batch": 2, "seq": 32, "steps": 1, "timeout_s": 120}
    return expand_sweep({"defaults": {**run, **fields}}, "t.yaml")


def _rehearse(exps, out, jobs=2):
    return run_sweep(exps, str(out), mode="rehearse", jobs=jobs, progress=False, poll_s=0.1)


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return None


def _running(needle):
    """Pids of live processes (not zombies) whose command line contains `needle`."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if needle.encode() in cmd and _state(d) not in (None, "Z"):
                out.append(int(d))
    return out


def _none_left(needle, wait_s=10):
    deadline = time.monotonic() + wait_s
    while _running(needle) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _running(needle)


# ------------------------------------------------------------------ the sweep file

@pytest.mark.parametrize("fields,expect", [
    ({"strategy": "ddp"}, {"zero": 0, "tp": 1, "layer_split": False}),
    ({"strategy": "ddp", "zero": 1}, {"zero": 1, "tp": 1}),
    ({"strategy": "fsdp"}, {"zero": 3}),
    ({"strategy": "fsdp", "zero": 2}, {"zero": 2}),
    ({"strategy": "tp"}, {"tp": 2, "zero": 0}),
    ({"strategy": "layer_split"}, {"layer_split": True, "zero": 0}),
])
def test_strategy_is_sugar_over_the_spec(fields, expect):
    exp = expand_sweep({"defaults": {"model": "Qwen/Qwen2.5-0.5B", "mode": "train", "dtype": "fp32", "gpus": 2,
                                     **fields}}, "t.yaml")[0]
    assert {k: getattr(exp.spec, k) for k in expect} == expect
    plain = {"model": "Qwen/Qwen2.5-0.5B", "mode": "train", "dtype": "fp32", "gpus": 2, **expect}
    assert exp.spec_hash == expand_sweep({"defaults": plain}, "t.yaml")[0].spec_hash  # it names nothing new


@pytest.mark.parametrize("fields,needle", [
    ({"strategy": "ddp", "zero": 3}, "strategy ddp: zero: 3"),
    ({"strategy": "fsdp", "zero": 1}, "strategy fsdp: zero: 1"),
    ({"strategy": "fsdp", "tp": 2}, "strategy fsdp: tp: 2"),
    ({"strategy": "tp", "zero": 3}, "strategy tp: zero: 3"),
    ({"strategy": "layer_split", "zero": 2}, "strategy layer_split: zero: 2"),
    ({"strategy": "ddp", "gpus": 1}, "needs gpus ≥ 2"),
    ({"strategy": "pipeline"}, "strategy: 'pipeline' is not one of ddp, fsdp, tp, layer_split"),
])
def test_contradictory_strategies_are_one_line(fields, needle):
    doc = {"defaults": {"model": "Qwen/Qwen2.5-0.5B", "mode": "train", "dtype": "fp32", "gpus": 2, **fields}}
    with pytest.raises(SweepError) as e:
        expand_sweep(doc, "t.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_example_sweep_loads():
    name, exps = load_sweep(os.path.join(ROOT, "experiments", "multigpu.yaml"))
    assert name == "multigpu" and {e.spec.gpus for e in exps} == {1, 2, 4}
    assert {(e.spec.zero, e.spec.tp) for e in exps if e.spec.gpus == 2} == {(0, 1), (3, 1), (0, 2)}


# ------------------------------------------------------------------ packing onto GPU slots

def test_a_waiting_experiment_lets_smaller_ones_past_only_while_it_will_get_its_slots():
    assert next_to_start([4, 2, 1], 4, []) == 0
    assert next_to_start([2, 1], 0, [4]) is None  # nothing free
    assert next_to_start([3, 1], 1, [3]) == 1  # the running 3 frees enough for the waiting 3
    assert next_to_start([3, 1], 1, [1, 1, 1]) is None  # ones cannot free 3 at once: drain, or it waits forever
    assert next_to_start([2, 2, 1], 1, [2, 1]) == 2


def test_single_and_multi_gpu_experiments_pack_onto_the_given_gpus(tmp_path):
    """Measure mode with a stand-in worker: each experiment gets as many GPUs as it asks, never a busy one."""
    exps = expand_sweep({"defaults": {"model": "gpt2", "timeout_s": 30},
                         "zip": {"seq": [41, 42, 43, 44, 45, 46], "gpus": [1, 2, 4, 1, 2, 8]}}, "t.yaml")
    cmd = STANDIN + [str(tmp_path)]
    s = run_sweep(exps, str(tmp_path), gpus=[0, 1, 2, 3], mode="measure", worker_cmd=cmd, progress=False, poll_s=0.02)
    assert s.ran == 6 and s.outcomes == {"ok": 5, "unsupported": 1}
    recs = {r["spec"]["seq"]: r for r in iter_records(str(tmp_path))}
    assert recs[46]["outcome"] == "unsupported" and "needs 8 GPUs; this run has 4" in recs[46]["error"]["message"]
    used = {seq: r["env"]["CUDA_VISIBLE_DEVICES"].split(",") for seq, r in recs.items() if r["outcome"] == "ok"}
    assert {seq: len(g) for seq, g in used.items()} == {41: 1, 42: 2, 43: 4, 44: 1, 45: 2}
    assert all(recs[seq]["env"]["VRAMLAB_NVML_INDEX"] == ",".join(g) for seq, g in used.items())
    assert recs[43]["began"] < min(recs[k]["began"] for k in (41, 42, 44, 45))  # the most GPUs first
    for a in used:
        for b in used:
            if a < b and set(used[a]) & set(used[b]):
                assert recs[a]["started"] <= recs[b]["began"] or recs[b]["started"] <= recs[a]["began"], (a, b)
    # With eight GPUs the eight-GPU experiment runs; nothing else does again.
    again = run_sweep(exps, str(tmp_path), gpus=list(range(8)), mode="measure", worker_cmd=cmd, progress=False,
                      poll_s=0.02)
    assert again.ran == 1 and again.skipped == 5
    assert read_record(record_path(tmp_path, exps[5].spec_hash))["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"


# ------------------------------------------------------------------ ranks rehearsed on the CPU (gloo)

@pytest.mark.slow
def test_fsdp_and_ddp_ranks_make_one_record_each_with_every_rank(tmp_path):
    pytest.importorskip("pandas")
    from harness.analysis.frame import records_frame

    model = _tiny(tmp_path)
    fsdp, ddp, one = (_rehearsal(model, gpus=2, strategy="fsdp")[0], _rehearsal(model, gpus=2)[0],
                      _rehearsal(model)[0])
    s = _rehearse([one, fsdp, ddp], tmp_path / "out", jobs=5)  # all at once: two ranks each, and one
    assert s.outcomes == {"ok": 3}
    recs = {name: read_record(record_path(tmp_path / "out", e.spec_hash))
            for name, e in (("fsdp", fsdp), ("ddp", ddp), ("one", one))}
    assert len(list(iter_records(str(tmp_path / "out")))) == 3
    for rec in recs.values():
        r, world = rec["rehearsed"], rec["spec"]["gpus"]
        assert rec["source"] == "rehearsed" and rec["measured"] is None and rec["env"]["device"] == "cpu"
        assert rec["env"]["gpu"] is None and r["device"] == "cpu" and r["world_size"] == world
        assert [x["rank"] for x in r["ranks"]] == list(range(world)) and len({x["pid"] for x in r["ranks"]}) == world
        assert r["peak_allocated_bytes"] == max(x["peak_allocated_bytes"] for x in r["ranks"]) > 0
        assert r["peak_allocated_bytes"] == r["ranks"][r["peak_rank"]]["peak_allocated_bytes"]
        assert rec["predicted"]["peak_allocated_bytes"] > 0  # the prediction per GPU stays beside them
    assert [recs[k]["rehearsed"]["strategy"] for k in ("fsdp", "ddp", "one")] == ["fsdp", "ddp", "single"]
    assert [recs[k]["rehearsed"]["backend"] for k in ("fsdp", "ddp", "one")] == ["gloo", "gloo", None]  # 1 rank: no group
    for rank in (0, 1):  # FSDP keeps half the weights and half the optimizer state on each of two ranks
        f, d = recs["fsdp"]["rehearsed"]["ranks"][rank]["phases"], recs["ddp"]["rehearsed"]["ranks"][rank]["phases"]
        assert 0.45 < f["load"]["weights"] / d["load"]["weights"] < 0.55
        assert 0.45 < f["optimizer_step"]["optimizer_states"] / d["optimizer_step"]["optimizer_states"] < 0.55
    # A rehearsal reads as any record, its figures under rehearsed_* (never measured_*).
    row = records_frame([recs["fsdp"]], None).iloc[0]
    assert row.rehearsed_peak_allocated_bytes == recs["fsdp"]["rehearsed"]["peak_allocated_bytes"]
    assert row.rehearsed_world_size == 2 and row.isna()["measured_peak_allocated_bytes"] and row.source == "rehearsed"


@pytest.mark.parametrize("fields,needle", [
    ({"gpus": 2, "strategy": "layer_split"}, "layer_split over 2 GPUs: a CPU rehearsal has one device"),
    ({"gpus": 2, "dtype": "nf4", "method": "lora"}, "dtype nf4: a CPU rehearsal runs float dtypes"),
    ({"gpus": 2, "dtype": "bf16", "precision": "master"}, "precision master with zero 0"),
])
def test_what_a_rehearsal_cannot_build_is_unsupported_before_any_rank_starts(tmp_path, fields, needle):
    from harness.sweep.worker import run_and_record

    exp = _rehearsal(_tiny(tmp_path), **fields)[0]
    assert run_and_record(exp, str(tmp_path), "rehearse", {}) == "unsupported"
    rec = read_record(record_path(tmp_path, exp.spec_hash))
    assert needle in rec["error"]["message"] and rec["rehearsed"] is None and rec["env"]["device"] == "cpu"


@pytest.mark.slow
@linux_only
def test_a_killed_rank_fails_the_experiment_with_one_record_and_leaves_no_process(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMLAB_TEST_RANK_FAULT", "1:backward:kill")
    exp = _rehearsal(_tiny(tmp_path), gpus=2, strategy="fsdp")[0]
    s = _rehearse([exp], tmp_path / "out")
    assert s.outcomes == {"crashed": 1}
    assert [r["spec_hash"] for r in iter_records(str(tmp_path / "out"))] == [exp.spec_hash]
    err = read_record(record_path(tmp_path / "out", exp.spec_hash))["error"]
    assert err["rank"] == 1 and err["message"] == "rank 1 was killed by SIGKILL before writing its figures"
    assert err["ranks"]["1"]["signal"] == "SIGKILL"
    assert _none_left(exp.spec_hash), "a rank, torchrun or the worker outlived the experiment"


@pytest.mark.slow
@linux_only
def test_a_raising_rank_and_ranks_past_their_timeout_are_one_record_each(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMLAB_TEST_RANK_FAULT", "0:forward:raise")
    raising = _rehearsal(_tiny(tmp_path), gpus=2)[0]
    slow = _rehearsal(_tiny(tmp_path), gpus=2, seq=16, timeout_s=4)[0]  # stopped 3 s (GRACE_S) early: no rank is up
    s = _rehearse([raising, slow], tmp_path / "out")
    assert s.outcomes == {"error": 1, "timeout": 1}
    err = read_record(record_path(tmp_path / "out", raising.spec_hash))["error"]
    assert err["rank"] == 0 and err["message"].startswith("rank 0: RuntimeError: VRAMLAB_TEST_RANK_FAULT")
    assert "Traceback" in err["stderr_tail"]
    late = read_record(record_path(tmp_path / "out", slow.spec_hash))
    assert late["outcome"] == "timeout" and "still running" in late["error"]["message"]
    assert _none_left(raising.spec_hash) and _none_left(slow.spec_hash)


_LAUNCH = """
import sys
sys.path.insert(0, {root!r})
from harness.sweep.launcher import run_sweep
from harness.sweep.schema import expand_sweep
exps = expand_sweep({doc!r}, "t.yaml")
run_sweep(exps, {out!r}, mode="rehearse", jobs=2, progress=False, poll_s=0.1)
"""


@linux_only
def test_ranks_die_with_a_killed_launcher(tmp_path):
    doc = {"defaults": {"model": _tiny(tmp_path), "mode": "train", "dtype": "fp32", "seq": 32, "gpus": 2,
                        "timeout_s": 600}}
    exp = expand_sweep(doc, "t.yaml")[0]
    code = _LAUNCH.format(root=ROOT, doc=doc, out=str(tmp_path / "out"))
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(_running(exp.spec_hash)) < 4 and time.monotonic() < deadline:  # the worker, torchrun, two ranks
        time.sleep(0.1)
    assert len(_running(exp.spec_hash)) == 4, "the worker, torchrun and two ranks never ran"
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert _none_left(exp.spec_hash), "a rank, torchrun or the worker outlived its launcher"

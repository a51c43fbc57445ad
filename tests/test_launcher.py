"""Launcher faults, with a stand-in worker: killed, hung, crashed, corrupted, interrupted — nothing lost or doubled."""

import json
import os
import sys

import pytest

from harness.records import iter_records, read_record, record_path
from harness.sweep.launcher import run_sweep
from harness.sweep.schema import expand_sweep

HERE = os.path.dirname(os.path.abspath(__file__))
STANDIN = [sys.executable, os.path.join(HERE, "standin_worker.py"), "--out"]


def _exps(seqs, timeout_s=30):
    return expand_sweep({"defaults": {"model": "gpt2", "timeout_s": timeout_s}, "grid": {"seq": seqs}}, "t.yaml")


def _cmd(out):
    return STANDIN + [str(out)]


def test_faults_become_records_and_rerun_skips_them(tmp_path):
    exps = _exps([32, 11, 12, 13, 14, 64], timeout_s=3)
    s = run_sweep(exps, str(tmp_path), worker_cmd=_cmd(tmp_path), progress=False, poll_s=0.05)
    assert s.ran == 6 and not s.interrupted
    outcomes = {read_record(record_path(tmp_path, e.spec_hash))["spec"]["seq"]:
                read_record(record_path(tmp_path, e.spec_hash))["outcome"] for e in exps}
    assert outcomes == {32: "ok", 11: "timeout", 12: "crashed", 13: "crashed", 14: "crashed", 64: "ok"}
    crashed = read_record(record_path(tmp_path, exps[3].spec_hash))
    assert "boom" in crashed["error"]["stderr_tail"] and crashed["predicted"]["peak_allocated_bytes"] > 0
    assert crashed["source"] == "traced" and crashed["traced"] is None and crashed["measured"] is None
    assert "SIGKILL" in read_record(record_path(tmp_path, exps[2].spec_hash))["error"]["message"]
    # Resume: nothing runs again, nothing is duplicated.
    again = run_sweep(exps, str(tmp_path), worker_cmd=_cmd(tmp_path), progress=False, poll_s=0.05)
    assert again.ran == 0 and again.skipped == 6
    assert len(list(iter_records(str(tmp_path)))) == 6


def test_retry_reruns_only_failures(tmp_path):
    exps = _exps([32, 13])
    run_sweep(exps, str(tmp_path), worker_cmd=_cmd(tmp_path), progress=False, poll_s=0.05)
    s = run_sweep(exps, str(tmp_path), worker_cmd=_cmd(tmp_path), progress=False, poll_s=0.05, retry=True)
    assert s.ran == 1 and s.skipped == 1


def test_corrupted_record_is_moved_aside_and_rerun(tmp_path):
    exps = _exps([32, 64])
    run_sweep(exps, str(tmp_path), worker_cmd=_cmd(tmp_path), progress=False, poll_s=0.05)
    bad = record_path(tmp_path, exps[0].spec_hash)
    with open(bad, "w") as f:
        f.write('{"spec_hash": "abc", "outc')
    good_before = open(record_path(tmp_path, exps[1].spec_hash)).read()
    s = run_sweep(exps, str(tmp_path), worker_cmd=_cmd(tmp_path), progress=False, poll_s=0.05)
    assert s.ran == 1 and len(s.corrupt_moved) == 1 and os.path.exists(s.corrupt_moved[0])
    assert read_record(bad)["outcome"] == "ok"
    assert open(record_path(tmp_path, exps[1].spec_hash)).read() == good_before


def test_interrupt_then_resume_loses_and_duplicates_nothing(tmp_path):
    exps = _exps([21, 22, 23, 24, 25])
    seen = []

    def stop_after_two(exp, outcome):
        seen.append(exp.spec_hash)
        if len(seen) == 2:
            raise KeyboardInterrupt

    s = run_sweep(exps, str(tmp_path), worker_cmd=_cmd(tmp_path), progress=False, poll_s=0.05, on_record=stop_after_two)
    assert s.interrupted
    done = {r["spec_hash"]: json.dumps(r, sort_keys=True) for r in iter_records(str(tmp_path))}
    assert set(seen) <= set(done)
    s2 = run_sweep(exps, str(tmp_path), worker_cmd=_cmd(tmp_path), progress=False, poll_s=0.05)
    assert s2.skipped == len(done) and s2.ran == len(exps) - len(done)
    final = {r["spec_hash"]: json.dumps(r, sort_keys=True) for r in iter_records(str(tmp_path))}
    assert len(final) == len(exps)
    assert all(final[h] == v for h, v in done.items())  # completed records untouched


def test_results_frame_columns(tmp_path):
    pytest.importorskip("pandas")
    from harness.analysis.frame import records_frame

    exps = _exps([32, 13])
    run_sweep(exps, str(tmp_path), worker_cmd=_cmd(tmp_path), progress=False, poll_s=0.05)
    df = records_frame(iter_records(str(tmp_path)))
    for col in ("spec_hash", "model", "mode", "method", "dtype", "batch", "seq", "gpu_name", "driver", "outcome",
                "predicted_peak_allocated_bytes", "measured_peak_allocated_bytes", "predicted_peak_device_bytes",
                "measured_peak_device_bytes"):
        assert col in df.columns
    assert sorted(df.outcome) == ["crashed", "ok"]


# ------------------------------------------------------------------ warm workers, processes, signals, the lock

def _warm(out, **kw):
    return run_sweep(kw.pop("exps"), str(out), worker_cmd=_cmd(out), progress=False, poll_s=0.05, warm=True, **kw)


def _records(out):
    return {r["spec"]["seq"]: r for r in iter_records(str(out))}


def test_warm_worker_runs_many_in_one_process_and_faults_become_records(tmp_path):
    exps = _exps([32, 33, 11, 34, 12, 35, 13, 36, 14, 37], timeout_s=3)
    s = _warm(tmp_path, exps=exps)
    assert s.ran == 10 and not s.interrupted
    recs = _records(tmp_path)
    assert {k: r["outcome"] for k, r in recs.items() if k < 20} == {11: "timeout", 12: "crashed", 13: "crashed",
                                                                     14: "crashed"}
    assert "boom" in recs[13]["error"]["stderr_tail"]
    ok = {k: r["traced"]["process"] for k, r in recs.items() if r["outcome"] == "ok"}
    assert ok[32]["pid"] == ok[33]["pid"] and [ok[32]["experiment_in_process"], ok[33]["experiment_in_process"]] == [1, 2]
    assert ok[34]["pid"] != ok[33]["pid"]  # after the hang, a fresh worker
    again = _warm(tmp_path, exps=exps)
    assert again.ran == 0 and again.skipped == 10


def test_a_warm_worker_that_cannot_reset_is_replaced_and_the_record_says_so(tmp_path):
    s = _warm(tmp_path, exps=_exps([32, 15, 33]))
    recs = _records(tmp_path)
    assert s.fresh_processes == 1 and all(r["outcome"] == "ok" for r in recs.values())
    p = recs[15]["traced"]["process"]
    assert p["fallback"] == "dirty" and p["experiment_in_process"] == 1 and p["pid"] != recs[32]["traced"]["process"]["pid"]


def test_cold_runs_each_experiment_in_its_own_process(tmp_path):
    """GPU tests measure through this path, so one case never sees another's context or cached blocks."""
    run_sweep(_exps([32, 33, 34]), str(tmp_path), worker_cmd=_cmd(tmp_path), progress=False, poll_s=0.05)
    procs = [r["traced"]["process"] for r in _records(tmp_path).values()]
    assert len({p["pid"] for p in procs}) == 3 and {p["experiment_in_process"] for p in procs} == {1}


def test_gpu_slots_name_the_same_gpu_to_cuda_and_nvml(tmp_path):
    run_sweep(_exps([32, 33]), str(tmp_path), gpus=[1, 3], worker_cmd=_cmd(tmp_path), progress=False, poll_s=0.05)
    envs = [r["env"] for r in _records(tmp_path).values()]
    assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in envs) == ["1", "3"]
    assert all(e["CUDA_VISIBLE_DEVICES"] == e["VRAMLAB_NVML_INDEX"] and e["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
               for e in envs)


_LAUNCH = """
import sys
sys.path.insert(0, {root!r})
from harness.sweep.launcher import run_sweep
from harness.sweep.schema import expand_sweep
exps = expand_sweep({{"defaults": {{"model": "gpt2", "timeout_s": 600}}, "grid": {{"seq": [11]}}}}, "t.yaml")
s = run_sweep(exps, {out!r}, worker_cmd={cmd!r}, progress=False, poll_s=0.05, warm={warm})
print("interrupted", s.interrupted, s.signal)
"""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(")")[-1].split()[0] != "Z"


def _worker_pids(launcher_pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if f"VRAMLAB_LAUNCHER_PID={launcher_pid}".encode() in f.read():
                        out.append(int(d))
            except OSError:
                continue
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux's")
@pytest.mark.parametrize("sig,warm", [("SIGKILL", False), ("SIGKILL", True), ("SIGTERM", False), ("SIGHUP", True)])
def test_workers_die_with_their_launcher(tmp_path, sig, warm):
    import signal
    import subprocess
    import time

    code = _LAUNCH.format(root=os.path.dirname(HERE), out=str(tmp_path), cmd=_cmd(tmp_path), warm=warm)
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not _worker_pids(launcher.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = _worker_pids(launcher.pid)
    assert workers, "the worker never started"
    launcher.send_signal(getattr(signal, sig))
    out, err = launcher.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), f"worker left running after {sig} of the launcher"
    if sig != "SIGKILL":
        assert f"interrupted True {sig}" in out, err
    # the lock died with the launcher: a new run can take the folder
    s = run_sweep([], str(tmp_path), worker_cmd=_cmd(tmp_path), progress=False)
    assert s.ran == 0


def test_one_launcher_per_folder(tmp_path):
    from harness.sweep.launcher import SweepLocked, lock_out_dir

    fd = lock_out_dir(str(tmp_path))
    try:
        with pytest.raises(SweepLocked, match=f"pid {os.getpid()}"):
            run_sweep(_exps([32]), str(tmp_path), worker_cmd=_cmd(tmp_path), progress=False)
    finally:
        os.close(fd)
    assert run_sweep(_exps([32]), str(tmp_path), worker_cmd=_cmd(tmp_path), progress=False, poll_s=0.05).ran == 1


def test_wait_for_idle_waits_for_the_baseline_then_says_what_it_found():
    from harness.sweep.launcher import wait_for_idle

    readings = iter([9_000, 6_000, 1_010, 1_000])
    clock = iter(range(100))
    r = wait_for_idle(0, 1_000, timeout_s=50, tolerance=20, used_bytes=lambda i: next(readings),
                      sleep=lambda s: None, clock=lambda: next(clock))
    assert r["idle"] and r["used_bytes"] == 1_010 and r["baseline_bytes"] == 1_000
    stuck = wait_for_idle(0, 1_000, timeout_s=3, tolerance=20, used_bytes=lambda i: 5_000,
                          sleep=lambda s: None, clock=lambda: next(clock))
    assert not stuck["idle"] and stuck["used_bytes"] == 5_000 and stuck["waited_s"] >= 3

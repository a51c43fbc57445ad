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

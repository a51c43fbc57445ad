"""scripts/gpu_calibration.sh, rehearsed on the CPU: every path a GPU window takes, with the sweeps traced.

The GPU session that runs it has minutes, so every path of the script runs here first: a new environment
(smoke, then the reference and rtx4090 sweeps in the window's order, the boundary searches, the
expandable_segments twins), the same environment again with the doctor first (smoke complete: resumed), a call
whose time box
leaves no time for sweeps (analysis and packing still run), and after each the fit, the report with its
tables, the checks against the other environment's records (a copy of the H200's here) and the packing
into the three files the device tool brings back."""

import os
import shutil
import subprocess
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H200 = "nvidia-h200-580.159.04"


def _call(out, runs, budget, reserve=45, doctor=False):
    env = {**os.environ, "MODE": "trace", "SHARD": "1/130", "BUDGET_S": str(budget), "RESERVE_S": str(reserve),
           "OUT": str(out), "RUNS": str(runs), "DOCTOR": "1" if doctor else "0"}
    t0 = time.monotonic()
    r = subprocess.run(["bash", "scripts/gpu_calibration.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    summary = (out / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["analysis.tar.gz", "records.tar.gz", "summary.txt"]  # ≤ 8 files come back
    return summary, time.monotonic() - t0


def _has(summary, *lines):
    for line in lines:
        assert line in summary, (line, summary)


@pytest.mark.slow
def test_rehearsal_on_the_cpu(tmp_path):
    for mod in ("torch", "transformers", "yaml", "matplotlib"):
        pytest.importorskip(mod)
    runs = tmp_path / "runs"
    for sweep in ("smoke", "reference"):  # the other environment: the H200's records
        shutil.copytree(os.path.join(ROOT, "results", "runs", sweep, H200), runs / sweep / H200)

    # 1. a new environment
    summary, seconds = _call(tmp_path / "out1", runs, budget=480)
    _has(summary, "environment: traced-cpu", "no complete smoke sweep here: a new environment", "smoke: exit 0",
         "smoke failures: none", "reference: exit 0", "rtx4090: exit 0", "reference-expandable: exit 0",
         "rtx4090-expandable: exit 0", "into records.tar.gz", "report: exit 0", "into analysis.tar.gz",
         f"check smoke: {H200} → traced-cpu: exit", f"check reference: {H200} → traced-cpu: exit")
    assert "fit: exit 0 (1 table(s)" in summary  # the H200's measured records fit; traced ones calibrate nothing
    assert "  search meta-llama/Llama-3.1-8B qlora ckpt nf4 seq 2048: batch 1..32" in summary  # the shard's search
    records = tarfile.open(tmp_path / "out1" / "records.tar.gz").getnames()
    for folder in ("smoke", "reference", "rtx4090"):
        assert any(n.startswith(f"runs/{folder}/traced-cpu/") and n.endswith(".json") for n in records), folder
    assert not any(H200 in n for n in records)  # only this environment's records travel back
    assert any(n.startswith("runs/smoke/traced-cpu/.logs/") for n in records)  # the workers' stderr
    assert "smoke.log" in records and "reference-expandable.log" in records
    analysis = tarfile.open(tmp_path / "out1" / "analysis.tar.gz").getnames()
    for name in ("report/report.md", "categories.md", "boundary.md", "summary.txt", "check.log", "results.csv",
                 "fit.log"):
        assert name in analysis, name
    assert any(n.startswith("calibration/nvidia-h200") for n in analysis)
    print(f"new environment: {seconds:.0f} s")

    # 2. the same environment again, doctor first: smoke is complete, the sweeps resume (this shard is done)
    summary, seconds = _call(tmp_path / "out2", runs, budget=480, doctor=True)
    _has(summary, "doctor: exit 0", "smoke already complete here: a measured environment, resuming",
         "reference: exit 0", "rtx4090: exit 0", "report: exit 0")
    assert "doctor.log" in tarfile.open(tmp_path / "out2" / "records.tar.gz").getnames()
    assert "smoke: start" not in summary and "ran 0, skipped" in summary
    print(f"known environment: {seconds:.0f} s")

    # 3. a call with no time for sweeps still analyses and packs what there is
    summary, seconds = _call(tmp_path / "out3", runs, budget=60, reserve=45)
    _has(summary, "reference: skipped, no time left", "rtx4090-expandable: skipped, no time left",
         "into records.tar.gz", "into analysis.tar.gz")
    print(f"no time left: {seconds:.0f} s")

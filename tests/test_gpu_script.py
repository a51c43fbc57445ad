"""scripts/gpu_calibration.sh, rehearsed on the CPU: the path a GPU run takes, with the sweeps traced.

The GPU session that runs it has minutes, so every step of the script runs here first: doctor,
smoke (and its check), a slice of the reference and rtx4090 sweeps, a second smoke run, fit,
report, check, and the packing of everything into one archive under $OUT."""

import os
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_rehearsal_on_the_cpu(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("yaml")
    pytest.importorskip("matplotlib")
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = {**os.environ, "MODE": "trace", "SHARD": "1/130", "BUDGET_S": "400", "OUT": str(out), "RUNS": str(runs)}
    r = subprocess.run(["bash", "scripts/gpu_calibration.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    summary = (out / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stderr[-2000:]
    # the device brings back at most 8 files: the records come first, in case the rest runs out of time
    assert sorted(os.listdir(out)) == ["analysis.tar.gz", "records.tar.gz", "summary.txt"]
    for line in ("doctor: exit 0", "smoke: exit 0", "smoke failures: none", "reference: exit 0", "rtx4090: exit 0",
                 "smoke-again: exit 0", "packed", "into records.tar.gz", "report: exit 0",
                 "check smoke vs smoke-again (cold): exit 0", "into analysis.tar.gz"):
        assert line in summary, (line, summary)
    assert "no usable measured records" in summary  # traced records calibrate nothing: fit says so
    records = tarfile.open(out / "records.tar.gz").getnames()
    assert any(n.startswith("runs/smoke/traced-cpu/") and n.endswith(".json") for n in records)
    assert any(n.startswith("runs/reference/") and n.endswith(".json") for n in records)
    assert any(n.startswith("runs/smoke/traced-cpu/.logs/") for n in records)  # the workers' stderr
    assert "doctor.log" in records and "smoke.log" in records
    analysis = tarfile.open(out / "analysis.tar.gz").getnames()
    for name in ("report/report.md", "summary.txt", "check.log", "results.csv"):
        assert name in analysis, name

"""`vramlab doctor`: the checks it runs without a GPU, and how it judges measured pairs."""

import json

import pytest

from harness.cli import main
from harness.doctor import check_measurements

MiB = 2**20


def _rec(outcome="ok", alloc=1000 * MiB, workload_s=1.0, flagged=False):
    return {"spec": {"mode": "train", "method": "lora", "dtype": "bf16"}, "outcome": outcome,
            "error": {"message": "boom"} if outcome != "ok" else None,
            "measured": {"peak_allocated_bytes": alloc, "timings": {"workload_s": workload_s},
                         "device_figures_flagged": flagged, "cuda_context_bytes": 500 * MiB,
                         "peak_device_bytes": alloc + 600 * MiB} if outcome == "ok" else None}


def test_measured_pairs_are_judged_on_the_tracker_moving_the_peak():
    ok, moved, flagged, failed = check_measurements([
        (_rec(), _rec(workload_s=1.3)),
        (_rec(), _rec(alloc=1010 * MiB)),
        (_rec(flagged=True), _rec()),
        (_rec(), _rec(outcome="oom")),
    ])
    assert ok.status == "ok" and "1.00 s → 1.30 s" in ok.detail
    assert moved.status == "fail" and "+10.00 MiB" in moved.detail
    assert flagged.status == "warn" and "other processes" in flagged.detail
    assert failed.status == "fail" and failed.detail.startswith("oom")


def test_doctor_without_a_gpu_checks_the_rest(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: doctor would measure")
    code = main(["doctor", "--json"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert checks["measurement"]["status"] == "skip" and checks["tracer"]["status"] == "ok"
    assert checks["packages"]["status"] in ("ok", "warn")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert code == 1 and checks["bitsandbytes"]["status"] == "fail"
    else:
        assert code == 0 and checks["peft LoRA layers"]["status"] == "ok"

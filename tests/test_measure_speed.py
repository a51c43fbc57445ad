"""What makes a measured experiment fast without changing what it measures (issue #32's speed bar).

The category tracker counts only the last steps op by op (`track_window: last`): on real CPU
tensors it must find the same peak, in the same phase, with the same categories and the same
per-phase peaks as when it counts every op. The NVML sampler backs off on plateaus and returns to
its 1 ms interval wherever memory moves; its own CPU time is measured."""

import json
import time

import pytest

from harness.gpu import sampler as sampler_mod
from harness.gpu.sampler import NvmlSampler, next_interval

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 1000, "max_position_embeddings": 512}


def _tracked(tmp_path, fields, window, steps=2):
    import torch

    from formulas.catalog import get_shape
    from formulas.spec import Spec, validate
    from harness.gpu.build import build_on_device
    from harness.tracing.tracker import CategoryTracker
    from harness.workload.steps import run_inference, run_training

    path = tmp_path / "llama.json"
    path.write_text(json.dumps(LLAMA))
    spec = validate(Spec(model=str(path), dtype="fp32", **fields), get_shape(str(path)))
    torch.manual_seed(0)
    model = build_on_device(spec, device="cpu")
    tracker = CategoryTracker(model, spec, LLAMA["vocab_size"], device_type="cpu", window=window, steps=steps)
    with tracker:
        if spec.mode == "inference":
            run_inference(model, spec, mark=tracker.mark, device="cpu")
        else:
            run_training(model, spec, mark=tracker.mark, device="cpu", steps=steps)
    return tracker.result(timeline=False, reserved=False)


@pytest.mark.parametrize("fields,steps", [
    (dict(mode="inference", batch=2, seq=4, gen=12), 2),  # the peak at the last decode step (the cache is largest)
    (dict(mode="inference", batch=2, seq=48, gen=5), 2),  # the peak in the prefill
    (dict(mode="train", method="full", precision="pure", batch=2, seq=32), 2),
    (dict(mode="train", method="full", precision="pure", batch=2, seq=32, grad_accum=2), 3),
    (dict(mode="train", method="lora", batch=2, seq=32, grad_ckpt=True), 2),
], ids=["decode-peak", "prefill-peak", "full", "accum-3-steps", "lora-ckpt"])
def test_counting_the_last_steps_finds_the_peak_and_its_categories(tmp_path, fields, steps):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    every, last = _tracked(tmp_path, fields, "all", steps), _tracked(tmp_path, fields, "last", steps)
    assert last.n_ops < every.n_ops  # it did count fewer ops …
    assert last.peak_allocated_bytes == every.peak_allocated_bytes  # … and lost nothing at the peak
    assert last.peak_phase == every.peak_phase
    assert last.breakdown == every.breakdown
    assert last.phases == every.phases  # every phase's own peak and its categories
    assert last.peak_tensors == every.peak_tensors
    if "gen" in fields and fields["seq"] == 4:
        assert every.peak_phase == "decode" and every.breakdown["kv_cache"] > 0


def test_a_tracker_window_is_validated():
    pytest.importorskip("torch")
    from harness.tracing.tracker import CategoryTracker

    with pytest.raises(ValueError, match="track_window: 'some'"):
        CategoryTracker(None, None, 10, window="some")


def test_the_interval_backs_off_on_plateaus_and_returns_where_memory_moves():
    iv = 0.001
    for want in (0.002, 0.004, 0.008, 0.016, 0.016):
        iv = next_interval(iv, False, 0.001, 0.016)
        assert iv == pytest.approx(want)
    assert next_interval(iv, True, 0.001, 0.016) == 0.001


class _FakeNvml:
    """NVML stand-in: device-used is `used(seconds from start)`; each reading costs `cost_s` of CPU."""

    def __init__(self, used, cost_s=20e-6, process_cost_s=3e-4):
        self.used, self.cost_s, self.process_cost_s = used, cost_s, process_cost_s
        self.t0 = time.perf_counter()
        self.process_calls = 0

    @staticmethod
    def _burn(s):
        end = time.thread_time() + s
        while time.thread_time() < end:
            pass

    def used_bytes(self, index):
        self._burn(self.cost_s)
        return self.used(time.perf_counter() - self.t0)

    def process_used_bytes(self, index, pid):
        self.process_calls += 1
        self._burn(self.process_cost_s)
        return self.used_bytes(index) - 100


def test_the_sampler_costs_under_one_percent_and_keeps_1ms_where_memory_moves(monkeypatch):
    """Two seconds of workload: a phase begins and memory grows for 50 ms (a MiB a millisecond), then holds at its
    peak — on the H200 device-used changed between two 1 ms samples in 1.4 % of them (median over the 62 records'
    timelines) and never fell, and it moves where a phase begins (allocations follow the mark). At a 20 µs reading
    (300 µs for the process list) the old fixed 1 ms schedule took 7.5–8.2 % of the workload in its thread's CPU
    time on this 2-core box (busy 4.0 %: the H200's 10 % is the same story); the adaptive one stays under 1 % and
    still samples the growth about every millisecond."""
    mib, base = 2**20, 2**30
    grow = {"from": None}

    def used(t):
        if grow["from"] is None:
            return base
        return base + int(min(max(time.perf_counter() - grow["from"], 0.0), 0.05) * 1000) * mib

    fake = _FakeNvml(used)
    monkeypatch.setattr(sampler_mod.nvml, "used_bytes", fake.used_bytes)
    monkeypatch.setattr(sampler_mod.nvml, "process_used_bytes", fake.process_used_bytes)
    t0 = time.perf_counter()
    with NvmlSampler(0, 0.001, pid=123) as s:
        time.sleep(0.3)
        s.mark("forward")
        grow["from"] = time.perf_counter()
        time.sleep(1.7)
    workload_s = time.perf_counter() - t0
    assert s.peaks["load"]["device_used_bytes"] == base
    assert s.peaks["forward"]["device_used_bytes"] == base + 50 * mib  # the peak, held after the growth
    assert s.peaks["forward"]["process_used_bytes"] >= base  # read after a new high
    growth = [v for _, phase, v in s.timeline if phase == "forward" and base < v < base + 50 * mib]
    assert len(growth) >= 5, s.timeline  # ~1 ms apart while memory moves (50 ms apart: at most 1; this shared
    # CPU may leave the thread unscheduled for tens of milliseconds)
    assert s.samples < 200  # 1 ms throughout would be ~2,000
    assert 1 <= fake.process_calls <= 4  # after new highs, at most every 0.5 s, not every 20th sample
    assert 0 < s.cpu_s < 0.01 * workload_s, (s.cpu_s, workload_s, s.samples)


def test_without_nvml_no_phase_has_a_figure(monkeypatch):
    monkeypatch.setattr(sampler_mod.nvml, "used_bytes", lambda index: None)
    with NvmlSampler(0, 0.001) as s:
        s.mark("forward")
        time.sleep(0.01)
    assert s.peaks == {} and s.peak() == (None, None)

"""The planner (formulas/plan.py) and `vramlab plan` (harness/cli/plan.py).

Hand-worked cases for each question — fit, fewest GPUs, largest batch and context, time,
the fine-tuning table — and the properties a plan must keep: more GPUs never raise per-GPU
memory under ZeRO-3 or TP; a longer deadline never needs more GPUs.
"""

import json

import pytest

from formulas import plan as P
from formulas.catalog import get_shape
from formulas.hardware import get_hardware
from formulas.predict import predict
from formulas.spec import Spec
from formulas.throughput import prefill_flops, training_flops_per_token
from formulas.units import parse_count, parse_duration, parse_fraction, parse_size
from harness.cli import main

GiB = 2**30
LLAMA8 = "meta-llama/Llama-3.1-8B"
LLAMA70 = "meta-llama/Llama-3.1-70B"


def vramlab(capsys, *argv):
    """`vramlab plan …` as the command line runs it."""
    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ fit

def test_fit_margin_is_usable_minus_predicted_peak():
    pl = P.Planner(Spec(model=LLAMA8, mode="train", method="qlora", seq=2048, grad_ckpt=True), "RTX 4090")
    f = pl.fit()
    peak = predict(Spec(model=LLAMA8, mode="train", method="qlora", seq=2048, grad_ckpt=True)).peak_device_bytes
    assert f["per_gpu_bytes"] == peak
    assert f["usable_bytes"] == 24 * GiB  # no measured total for the 4090: nominal
    assert f["margin_bytes"] == 24 * GiB - peak and f["fits"] and f["binds"] == "memory"


def test_fit_uses_the_reported_total_and_the_safety_margin():
    h100 = get_hardware("H100 SXM")
    pl = P.Planner(Spec(model=LLAMA8), "H100", margin=0.10)
    assert pl.usable_bytes == int(81559 * 2**20 * 0.9) == int(h100.reported_total_bytes * 0.9)


def test_70b_bf16_does_not_fit_one_h100():
    """Weights alone: 70,553,706,496 × 2 bytes = 141.1 GB > the 85.5 GB nvidia-smi reports."""
    f = P.Planner(Spec(model=LLAMA70), "H100").fit()
    assert not f["fits"]
    assert f["margin_bytes"] < -(2 * 70_553_706_496 - 81559 * 2**20)


# ------------------------------------------------------------------ fewest GPUs

def test_fewest_gpus_70b_inference_on_h100_is_two_with_a_layer_split():
    """transformers' TP plan keeps the 128,256 × 8,192 embedding whole on both GPUs (2.0 GiB each); the layer
    split puts it on the first GPU and the untied head on the second, so it needs less per GPU."""
    pl = P.Planner(Spec(model=LLAMA70), "H100 SXM")
    chosen, opts = pl.fewest_gpus()
    assert chosen.strategy.gpus == 2
    assert {o.strategy.kind for o in opts} == {"tp", "layer_split"}
    assert chosen.strategy.label() == "layer split over 2"
    tp = predict(Spec(model=LLAMA70, gpus=2, tp=2))
    assert chosen.per_gpu_bytes < tp.peak_device_bytes
    split = predict(Spec(model=LLAMA70, gpus=2, layer_split=True))
    assert tp.breakdown["weights"] - split.breakdown["weights"] > 0.9 * 128_256 * 8_192 * 2 / 2


def test_fewest_gpus_70b_on_h200_is_one():
    """141 GiB (143,771 MiB reported) holds the 141.1 GB of weights plus context and KV for one 2k prompt."""
    chosen, _ = P.Planner(Spec(model=LLAMA70), "H200").fewest_gpus()
    assert chosen.strategy.kind == "single"


def test_fewest_is_minimal_and_names_per_gpu_memory_for_each_strategy():
    for spec, gpu in [(Spec(model=LLAMA8, mode="train", seq=2048), "A100 80GB"),
                      (Spec(model=LLAMA70, mode="train", method="qlora", seq=2048, grad_ckpt=True), "RTX 4090"),
                      (Spec(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", dtype="q4_k_m", batch=3, seq=4096,
                            gen=1024), "RTX 4090")]:
        pl = P.Planner(spec, gpu)
        chosen, opts = pl.fewest_gpus()
        n = chosen.strategy.gpus
        assert n >= 2
        assert not any(o.fits for o in pl.options_at(n - 1)), "a smaller count already fits"
        for o in opts:
            assert o.per_gpu_bytes == predict(o.strategy.apply(pl.base)).peak_device_bytes


def test_training_full_8b_on_a100_80gb_shards():
    """16+ bytes per parameter for full AdamW: 128 GB of state for 8B — more than one 80 GB card. On 2 GPUs ZeRO-2
    and ZeRO-3 are as fast (the step is compute-bound over NVLink); ZeRO-2 sends fewer bytes and wins the tie. The
    offloading plans have more headroom but lose: the CPU optimizer step is on the critical path."""
    pl = P.Planner(Spec(model=LLAMA8, mode="train", seq=2048), "A100 80GB")
    chosen, opts = pl.fewest_gpus()
    assert chosen.strategy.gpus == 2 and chosen.strategy.kind == "zero2" and chosen.step.binds == "compute"
    zero3 = [o for o in opts if o.strategy.kind == "zero3"][0]
    assert zero3.fits and zero3.per_gpu_bytes < chosen.per_gpu_bytes
    assert abs(zero3.step.seconds / chosen.step.seconds - 1) < 0.005
    assert sum(zero3.step.links.values()) > sum(chosen.step.links.values())
    for o in opts:
        if o.fits and o.strategy.offload != "none":
            assert o.step.seconds > chosen.step.seconds and "CPU optimizer step" in o.step.exposed


def test_offload_only_when_nothing_else_fits():
    pl = P.Planner(Spec(model=LLAMA8, mode="train", seq=2048), "A100 80GB")
    _, opts = pl.fewest_gpus()
    off = [o for o in opts if o.strategy.offload != "none"][0]
    chosen, _ = pl.fewest_gpus()
    assert off.per_gpu_bytes < chosen.per_gpu_bytes and chosen.strategy.offload == "none"


def test_candidates_respect_heads():
    s = get_shape("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B")  # 40 heads, 8 KV heads
    spec = Spec(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-32B")
    kinds = {c.tp for c in P.candidates(s, spec, 5, 10) if c.kind == "tp"}
    assert kinds == set()  # 5 divides 40 but neither divides nor is divided by 8
    assert [c.tp for c in P.candidates(s, spec, 8, 8) if c.kind == "tp"] == [8]
    assert {(c.tp, c.pp) for c in P.candidates(s, spec, 8, 8) if c.kind == "tp_pp"} == {(2, 4), (4, 2)}


# ------------------------------------------------------------------ largest batch, longest context

def test_largest_batch_is_the_edge_of_fitting():
    spec = Spec(model=LLAMA8, seq=4096)
    pl = P.Planner(spec, "RTX 4090")
    b = pl.largest_batch(spec)["value"]
    usable = 24 * GiB
    assert predict(spec.replace(batch=b)).peak_device_bytes <= usable < predict(spec.replace(batch=b + 1)).peak_device_bytes
    # hand bound: the weights (16.06 GB) leave at most this many 4k-token KV caches (512 MiB each)
    assert b <= (usable - 2 * 8_030_261_248) // (4096 * 131_072)


def test_longest_context_is_the_edge_of_fitting():
    spec = Spec(model=LLAMA8, seq=1024, gen=256, batch=2)
    pl = P.Planner(spec, "RTX 4090")
    c = pl.longest_context(spec)
    s = c["seq"]
    assert c["context"] == s + 256 and c["binds"] == "memory"
    assert pl._fits(spec.replace(seq=s)) and not pl._fits(spec.replace(seq=s + 1))


def test_longest_context_stops_at_the_model_window():
    spec = Spec(model="openai-community/gpt2", seq=128)  # 1,024 positions
    c = P.Planner(spec, "H100").longest_context(spec)
    assert c["seq"] == 1024 and "context window" in c["binds"]


# ------------------------------------------------------------------ time

def test_decode_and_prefill_bounds_hand_worked():
    """Llama-3.1-8B bf16, 1 user, 1,024-token prompt on an RTX 4090.

    decode: reads 16,060,522,496 B of weights + 1,024 × 131,072 B of KV per step at 1,008 GB/s
    → ≤ 1008e9 / 16,194,740,224 = 62.24 tokens/s; prefill ≥ FLOPs / 165.2 TFLOP/s.
    """
    spec = Spec(model=LLAMA8, seq=1024)
    t = P.Planner(spec, "RTX 4090").inference_speed(spec)
    assert t["decode_bytes_per_step_per_gpu"] == 16_060_522_496 + 1024 * 131_072
    assert t["decode_tokens_per_s_per_sequence_max"] == pytest.approx(1008e9 / 16_194_740_224)
    assert t["decode_binds"] == "bandwidth"
    s = get_shape(LLAMA8)
    assert t["prefill_seconds_min"] == pytest.approx(prefill_flops(s, 1, 1024) / 165.2e12)


def test_decode_tp_divides_the_bytes_and_batch_shares_the_weights():
    base = Spec(model=LLAMA70, seq=2048, gen=512, batch=8)
    pl = P.Planner(base, "H100")
    one = pl.inference_speed(base.replace(gpus=4, tp=4))
    split = pl.inference_speed(base.replace(gpus=4, layer_split=True))
    assert one["decode_bytes_per_step_per_gpu"] * 4 == pytest.approx(split["decode_bytes_per_step_per_gpu"], rel=1e-9)
    assert one["decode_tokens_per_s_total_max"] == pytest.approx(8 * one["decode_tokens_per_s_per_sequence_max"])


def test_training_time_hand_worked():
    """LoRA Llama-3.1-8B, 1e9 tokens, H100 SXM at 40 % MFU: (4N + 3a + 6P + recompute 2N + a) per token."""
    spec = Spec(model=LLAMA8, mode="train", method="lora", seq=2048, grad_ckpt=True)
    pl = P.Planner(spec, "H100")
    t = pl.training_time(spec, 10**9, 0.4, deadline_s=86_400)
    s = get_shape(LLAMA8)
    per = training_flops_per_token(s, 2048, "lora", grad_ckpt=True, trainable_params=6_815_744)
    assert t["flops"] == pytest.approx(1e9 * per)
    assert t["seconds_on_plan"] == pytest.approx(1e9 * per / (989.4e12 * 0.4))
    assert t["gpus_for_compute"] == int(-(-1e9 * per // (86_400 * 989.4e12 * 0.4)))


def test_answer_with_deadline_scales_gpus_for_compute():
    spec = Spec(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", mode="train", method="qlora", seq=2048, grad_ckpt=True)
    ans = P.Planner(spec, "A10G").answer(tokens=250_000_000, deadline_s=86_400, mfu=0.4)
    t = ans["time"]
    assert ans["fewest"]["gpus"] == 1
    assert ans["gpus_needed"] == t["gpus_for_deadline"] == t["gpus_for_compute"] > 1
    assert ans["binds"] == "compute" and ans["strategy"].startswith("DDP")
    assert t["seconds_on_deadline_plan"] <= 86_400


# ------------------------------------------------------------------ properties

@pytest.mark.parametrize("model", [LLAMA8, "Qwen/Qwen3-30B-A3B", "deepseek-ai/DeepSeek-V2-Lite"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_more_gpus_never_raise_per_gpu_memory_under_zero3(model, method):
    prev = None
    for n in (2, 3, 4, 6, 8, 16, 32, 64):
        b = predict(Spec(model=model, mode="train", method=method, seq=1024, grad_ckpt=True, gpus=n, zero=3))
        assert prev is None or b.peak_device_bytes <= prev
        prev = b.peak_device_bytes


@pytest.mark.parametrize("model", [LLAMA70, "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "Qwen/Qwen3-30B-A3B"])
@pytest.mark.parametrize("mode", ["inference", "train"])
def test_more_tp_never_raises_per_gpu_memory(model, mode):
    shape, prev = get_shape(model), None
    for t in [t for t in range(1, 65) if t == 1 or P._tp_ok(shape, t)]:
        b = predict(Spec(model=model, mode=mode, seq=1024, gen=8 if mode == "inference" else 0, gpus=t, tp=t))
        assert prev is None or b.peak_device_bytes <= prev
        prev = b.peak_device_bytes


def test_longer_deadline_never_needs_more_gpus():
    spec = Spec(model=LLAMA70, mode="train", method="lora", seq=2048, grad_ckpt=True)
    pl = P.Planner(spec, "A100 80GB")
    needed = [pl.answer(tokens=2 * 10**9, deadline_s=d)["gpus_needed"] or float("inf")  # None: not within 1,024
              for d in (3_600, 6 * 3_600, 86_400, 3 * 86_400, 7 * 86_400, 365 * 86_400)]
    assert needed == sorted(needed, reverse=True)
    assert needed[-1] == pl.fewest_gpus()[0].strategy.gpus  # a long enough deadline: memory binds


def test_table_monotone_in_deadline_and_data():
    rows = (dict(model="deepseek-ai/DeepSeek-R1-Distill-Llama-8B", method="qlora", dtype="bf16"),
            dict(model=LLAMA70, method="lora", dtype="bf16"))
    base = Spec(model=LLAMA8, mode="train", seq=2048, grad_ckpt=True)
    sizes = (10**6, 10**9, 10**10)
    by_deadline = [P.finetune_table(rows, sizes, d, base, gpu="A100 80GB") for d in (3_600, 86_400, 30 * 86_400)]
    inf = float("inf")  # None: no plan within the deadline on up to --max-gpus
    for i in range(len(by_deadline[0])):
        counts = [t[i]["gpus"] or inf for t in by_deadline]
        assert counts == sorted(counts, reverse=True)
    for r in range(len(rows)):
        counts = [by_deadline[1][r * len(sizes) + k]["gpus"] or inf for k in range(len(sizes))]
        assert counts == sorted(counts)


def test_larger_margin_never_needs_fewer_gpus():
    spec = Spec(model=LLAMA70, mode="train", method="qlora", seq=2048, grad_ckpt=True)
    counts = [P.Planner(spec, "RTX 4090", margin=m).fewest_gpus()[0].strategy.gpus for m in (0.0, 0.05, 0.2, 0.4)]
    assert counts == sorted(counts)


# ------------------------------------------------------------------ the seeds table

def test_seed_table_rows_and_hand_checks():
    base = Spec(model=LLAMA8, mode="train", seq=2048, grad_ckpt=True)
    rows = P.finetune_table(P.SEED_ROWS, P.SEED_DATA_BYTES, 86_400, base)
    assert len(rows) == len(P.SEED_ROWS) * len(P.SEED_DATA_BYTES)
    # 671B in bf16 is 1.34 TB of weights: the seed's 16 × A100-80G (1.37 TB) cannot hold it with anything else —
    # unless the weights live on NVMe (DeepSpeed ZeRO-Infinity), which the planner offers where the host RAM is short
    pl = P.Planner(base.replace(model="deepseek-ai/DeepSeek-R1", method="lora"), "A100 80GB")
    assert pl.fewest_gpus(offload=False)[0].strategy.gpus > 16
    for r in rows:
        if r["gpus"] is None:
            continue
        assert r["gpus"] >= r["gpus_for_memory"] and r["gpus"] >= r["gpus_for_compute"]
        assert r["seconds"] <= 86_400 * (1 + 1e-9)
        assert r["per_gpu_bytes"] <= get_hardware(r["gpu"]).usable_bytes


# ------------------------------------------------------------------ parsing

def test_parsers():
    assert parse_duration("1d") == 86_400 == parse_duration("24h") == parse_duration("1440m")
    assert parse_duration("2 weeks") == 14 * 86_400
    assert parse_count("2.5B") == 2_500_000_000 and parse_count("1e9") == 10**9
    assert parse_size("1GB") == 10**9 == parse_size("1G") and parse_size("1GiB") == 2**30
    assert parse_size("256MiB") == 256 * 2**20 and parse_size("80 GB") == 80 * 10**9 and parse_size("1024") == 1024
    assert parse_fraction("5%") == pytest.approx(0.05) == parse_fraction("0.05")
    assert parse_fraction("100%", allow_zero=False, allow_one=True) == 1.0
    for bad, fn in (("5", parse_duration), ("-1d", parse_duration), ("lots", parse_count), ("1XB", parse_size),
                    ("120%", parse_fraction), ("nan%", parse_fraction), ("0", lambda t: parse_fraction(t, False))):
        with pytest.raises(ValueError):
            fn(bad)


# ------------------------------------------------------------------ CLI

def test_cli_json_contract(capsys):
    code, out, _ = vramlab(capsys, "--model", LLAMA70, "--mode", "train", "--method", "qlora", "--seq", "2048",
                           "--grad-ckpt", "--gpus", "2", "--zero", "3", "--gpu", "RTX 3090", "--json")
    assert code == 0
    d = json.loads(out)
    for key in ("gpus_needed", "strategy", "per_gpu_bytes", "fit", "largest_batch", "longest_context", "binds",
                "assumptions", "calibrated"):
        assert key in d
    assert isinstance(d["gpus_needed"], int) and isinstance(d["per_gpu_bytes"], int)
    assert d["calibrated"] is False and d["fit"]["gpus"] == 2


def test_cli_text_states_binds_assumptions_and_uncalibrated(capsys):
    code, out, _ = vramlab(capsys, "--model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "--mode", "train",
                           "--method", "qlora", "--gpu", "A10G", "--data", "1GB", "--deadline", "1d", "--grad-ckpt")
    assert code == 0
    assert "uncalibrated" in out and "assumptions:" in out and "0.25 tokens per byte" in out
    assert "[binds: memory]" in out and "[binds: compute" in out
    code, out, _ = vramlab(capsys, "--model", LLAMA8, "--users", "4", "--gen", "128", "--gpu", "L4")
    assert code == 0 and "decode ≤" in out and "[binds: bandwidth" in out and "uncalibrated" in out


def test_cli_compare_all_gpus(capsys):
    code, out, _ = vramlab(capsys, "--model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "--dtype", "q4_k_m",
                           "--users", "3", "--seq", "4096", "--gen", "1024", "--gpu", "all")
    assert code == 0
    for name in ("RTX 3060", "H200", "MI300X", "Jetson AGX Orin 64GB"):
        assert name in out


def test_cli_table_json(capsys):
    code, out, _ = vramlab(capsys, "--table", "--model", "seeds", "--deadline", "1d", "--grad-ckpt", "--json")
    assert code == 0
    d = json.loads(out)
    assert len(d["rows"]) == 36 and d["calibrated"] is False
    assert {r["gpu"] for r in d["rows"]} == {"A100 80GB", "A10G", "A100 40GB"}


@pytest.mark.parametrize("argv,flag", [
    (["--model", LLAMA8, "--gpu", "GTX 9090"], "--gpu"),
    (["--model", LLAMA8], "--gpu"),
    (["--model", LLAMA8, "--gpu", "4090", "--margin", "1.5"], "--margin"),
    (["--model", LLAMA8, "--gpu", "4090", "--deadline", "1d"], "--deadline"),
    (["--model", LLAMA8, "--gpu", "4090", "--mode", "train", "--deadline", "5", "--tokens", "1B"], "--deadline"),
    (["--model", LLAMA8, "--gpu", "4090", "--mode", "train", "--deadline", "1d"], "--deadline"),
    (["--model", LLAMA8, "--gpu", "4090", "--mode", "train", "--tokens", "1B", "--data", "1GB"], "--data"),
    (["--model", LLAMA8, "--gpu", "4090", "--mode", "train", "--tokens", "1B", "--mfu", "0"], "--mfu"),
    (["--model", LLAMA8, "--gpu", "4090", "--batch", "0"], "--batch"),
    (["--model", LLAMA8, "--gpu", "4090", "--max-gpus", "0"], "--max-gpus"),
    (["--table", "--model", "seeds", "--data-sizes", "lots"], "--data-sizes"),
])
def test_cli_bad_input_is_one_line_naming_the_flag(capsys, argv, flag):
    code, out, err = vramlab(capsys, *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0]

"""Properties that must hold over many specs: monotonicity, checkpointing, sharding order."""

import pytest

from formulas.grid import expand_grid, predict_grid
from formulas.predict import predict
from formulas.spec import Spec

MODELS = ["meta-llama/Llama-3.2-1B", "Qwen/Qwen3-30B-A3B", "deepseek-ai/DeepSeek-V2-Lite", "openai-community/gpt2",
          "facebook/opt-350m", "EleutherAI/pythia-410m", "bigcode/gpt_bigcode-santacoder", "mistralai/Mistral-7B-v0.1"]
WORKLOADS = [
    dict(mode="inference", dtype="bf16"),
    dict(mode="inference", dtype="nf4", attn="eager"),
    dict(mode="inference", dtype="q4_k_m", gen=64),
    dict(mode="train", method="full"),
    dict(mode="train", method="full", grad_ckpt=True, attn="eager"),
    dict(mode="train", method="lora", lora_targets=("all-linear",)),
    dict(mode="train", method="qlora"),
    dict(mode="train", method="freeze", optimizer="adafactor"),
]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("wl", range(len(WORKLOADS)))
def test_monotone_in_batch_and_seq(model, wl):
    base = dict(model=model, **WORKLOADS[wl])
    df = predict_grid(expand_grid(base, batch=[1, 2, 3, 8], seq=[16, 100, 512, 1500]))
    for col in ("peak_allocated_bytes", "peak_device_bytes"):
        by_seq = df.pivot(index="batch", columns="seq", values=col)
        assert (by_seq.diff(axis=1).iloc[:, 1:] >= 0).all().all(), f"{col} falls as seq grows"
        assert (by_seq.diff(axis=0).iloc[1:, :] >= 0).all().all(), f"{col} falls as batch grows"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["full", "lora", "freeze"])
@pytest.mark.parametrize("seq", [64, 2048])
def test_checkpointing_never_raises_activations(model, method, seq):
    kw = dict(model=model, mode="train", method=method, batch=2, seq=seq)
    off, on = predict(Spec(**kw)), predict(Spec(grad_ckpt=True, **kw))
    assert on.phases["forward"]["activations"] <= off.phases["forward"]["activations"]
    assert max(p["activations"] for p in on.phases.values()) <= max(p["activations"] for p in off.phases.values())
    for ph in ("forward", "backward"):
        assert sum(on.phases[ph].values()) <= sum(off.phases[ph].values())
    assert on.peak_allocated_bytes <= off.peak_allocated_bytes


@pytest.mark.parametrize("model", ["meta-llama/Llama-3.1-8B", "Qwen/Qwen3-30B-A3B", "meta-llama/Llama-3.1-70B"])
@pytest.mark.parametrize("gpus", [2, 8])
def test_zero_stages_order(model, gpus):
    kw = dict(model=model, mode="train", seq=1024, gpus=gpus)
    ddp = predict(Spec(precision="master", **kw)).peak_allocated_bytes
    z = [predict(Spec(zero=k, **kw)).peak_allocated_bytes for k in (1, 2, 3)]
    assert z[2] <= z[1] <= z[0] <= ddp


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_more_tensor_parallel_never_raises_per_gpu(mode):
    prev = None
    for tp in (1, 2, 4, 8):
        p = predict(Spec(model="meta-llama/Llama-3.1-70B", mode=mode, seq=2048, gpus=tp, tp=tp, gen=16))
        assert prev is None or p.peak_allocated_bytes <= prev
        prev = p.peak_allocated_bytes


def test_method_order_for_training():
    kw = dict(model="meta-llama/Llama-3.1-8B", mode="train", seq=1024)
    full = predict(Spec(method="full", **kw)).peak_allocated_bytes
    lora = predict(Spec(method="lora", **kw)).peak_allocated_bytes
    qlora = predict(Spec(method="qlora", **kw)).peak_allocated_bytes
    assert qlora < lora < full


def test_grid_equals_predict():
    specs = expand_grid(dict(gen=0), model=MODELS[:4], mode=["inference", "train"], batch=[1, 5], seq=[33, 700],
                        grad_ckpt=[False, True])
    df = predict_grid(specs)
    for s, (_, row) in zip(specs, df.iterrows()):
        p = predict(s)
        assert (p.peak_allocated_bytes, p.peak_device_bytes, p.peak_phase) == \
               (row.peak_allocated_bytes, row.peak_device_bytes, row.peak_phase)

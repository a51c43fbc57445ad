"""The device level: cuBLAS workspaces inside the allocated peak, the context outside it, the weights' load slack from
the allocator simulation, SDPA's kernel as torch picks it, and what a prediction does with them (formulas/device.py,
formulas/overhead.py, formulas/predict.py); records predicted again in their environment; `vramlab show`."""

import json
import os

import pytest

from formulas import categories as C
from formulas.catalog import get_shape
from formulas.device import (
    CONTEXT_AT_INIT,
    compute_capability,
    cublas_workspace_bytes,
    cublaslt_extra_bytes,
    cuda_context_at_init,
    sdpa_backend,
)
from formulas.hardware import get_hardware
from formulas.overhead import DEFAULT_OVERHEADS, default_overheads, load_slack_bytes
from formulas.predict import predict
from formulas.spec import Spec
from formulas.units import KiB, MiB

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H200_RUNS = os.path.join(ROOT, "results", "runs")


def _stack(torch):
    return (("torch", torch),)


def test_cublas_workspace_by_architecture_version_and_environment():
    hopper, ada, blackwell = (9, 0), (8, 9), (12, 0)
    assert cublas_workspace_bytes(hopper) == 32 * MiB
    assert cublas_workspace_bytes(ada) == 8 * MiB + 128 * KiB  # ':4096:2:16:8'
    old, new = Spec(model="gpt2", stack=_stack("2.10.0")), Spec(model="gpt2", stack=_stack("2.11.0"))
    assert cublas_workspace_bytes(blackwell, old) == 8 * MiB + 128 * KiB and cublas_workspace_bytes(blackwell, new) == 32 * MiB
    assert cublas_workspace_bytes(hopper, environ={"CUBLAS_WORKSPACE_CONFIG": ":4096:8:16:8"}) == 32 * MiB + 128 * KiB
    assert cublas_workspace_bytes(ada, environ={"CUBLAS_WORKSPACE_CONFIG": "nonsense"}) == 8 * MiB + 128 * KiB
    assert cublaslt_extra_bytes(new) == 0 and cublaslt_extra_bytes(old) == 1024 * KiB
    assert cublaslt_extra_bytes(new, {"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "0", "CUBLASLT_WORKSPACE_SIZE": "4096"}) == 4 * MiB


def test_architectures_from_the_hardware_catalog_and_the_context_rows():
    assert compute_capability(get_hardware("RTX 4090")) == (8, 9)
    assert compute_capability(get_hardware("H200")) == (9, 0)
    assert compute_capability(get_hardware("A100 80GB")) == (8, 0)
    assert compute_capability(get_hardware("RTX 5090")) == (12, 0)
    assert compute_capability(get_hardware("MI300X")) is None
    rows = {r.arch: r.bytes for r in CONTEXT_AT_INIT}
    assert cuda_context_at_init((9, 0)) == (rows["sm90"], next(r.source for r in CONTEXT_AT_INIT if r.arch == "sm90"))
    nbytes, src = cuda_context_at_init((8, 9))  # no sm89 row: the nearest below, said to be an estimate
    assert nbytes == rows["sm86"] and src.startswith("estimate for sm89")


@pytest.mark.parametrize("fields, grouped, cc, dtype, expected", [
    (dict(), True, (9, 0), None, "flash"),  # bf16, grouped heads: flash takes enable_gqa
    (dict(dtype="fp32", stack=_stack("2.13.0")), True, (9, 0), None, "math"),  # fp32 GQA before 2.14
    (dict(dtype="fp32", stack=_stack("2.14.0")), True, (9, 0), None, "efficient"),
    (dict(dtype="fp32"), False, (9, 0), None, "efficient"),  # fp32 without grouped heads
    (dict(stack=_stack("2.13.0")), True, (9, 0), "fp32", "math"),  # bf16 model, fp32 stream (kbit prep)
    (dict(mode="train"), False, (8, 9), None, "efficient"),  # head dim 200 training on sm89: no flash backward
    (dict(mode="train"), False, (9, 0), None, "flash"),
    (dict(), False, (7, 5), None, "math"),  # bf16 before sm80: neither flash nor memory-efficient
])
def test_sdpa_kernel_as_select_sdp_backend_picks_it(fields, grouped, cc, dtype, expected):
    from formulas.spec import validate

    spec = validate(Spec(model="gpt2", **fields), get_shape("gpt2"))
    hd = 200 if fields.get("mode") == "train" else 128  # (192, 224]: no flash backward on sm86–89 and sm120
    assert sdpa_backend(spec, head_dim_qk=hd, head_dim_v=hd, grouped=grouped, cc=cc, dtype=dtype) == expected


def test_workspaces_sit_inside_the_allocated_peak_one_per_gemm_thread():
    inf = predict(Spec(model="Qwen2.5-0.5B", seq=512, gen=4))
    train = predict(Spec(model="Qwen2.5-0.5B", mode="train", seq=512))
    assert inf.breakdown[C.WORKSPACES] == 32 * MiB and train.breakdown[C.WORKSPACES] == 64 * MiB
    for p in (inf, train):
        assert p.phases["load"][C.WORKSPACES] == 0  # no GEMM has run while loading
        assert p.peak_allocated_bytes == sum(p.breakdown[c] for c in C.ALLOCATED_CATEGORIES)
        assert p.peak_allocated_bytes <= p.peak_reserved_bytes <= p.peak_device_bytes
        assert p.peak_device_bytes == p.peak_reserved_bytes + p.breakdown[C.CUDA_CONTEXT]
        assert p.peak_device_bytes == p.peak_allocated_bytes + sum(p.breakdown[c] for c in C.DEVICE_CATEGORIES)


def test_an_ada_card_prices_its_own_workspaces_and_context():
    spec = Spec(model="Llama-3.1-8B", seq=2048)
    hopper, ada = predict(spec, default_overheads((9, 0))), predict(spec, default_overheads((8, 9)))
    assert hopper.breakdown[C.WORKSPACES] - ada.breakdown[C.WORKSPACES] == 32 * MiB - (8 * MiB + 128 * KiB)
    assert hopper.breakdown[C.CUDA_CONTEXT] - ada.breakdown[C.CUDA_CONTEXT] == 619 * MiB - 256 * MiB
    assert {c: hopper.breakdown[c] for c in C.TENSOR_CATEGORIES} == {c: ada.breakdown[c] for c in C.TENSOR_CATEGORIES}


def test_load_slack_is_the_segment_rounding_of_the_weights():
    """Hand-worked: tensors of 10 MiB or more get a segment each, rounded up to 2 MiB; smaller large requests share
    20 MiB segments; the rounding is what loading leaves reserved and unallocated."""
    from dataclasses import replace

    from formulas.shapes import Tensor

    base = get_shape("Llama-3.2-1B")
    odd = replace(base, n_layers=3, tie_embeddings=False, tensors=(
        Tensor("layers.mlp.up_proj.weight", "linear", (3000, 2048), 3, "up_proj", ""),  # 11.7 MiB bf16 → 12 MiB
        Tensor("embed_tokens.weight", "embedding", (5000, 1024), 1, "embed_tokens", ""),  # 9.77 MiB: a 20 MiB segment
    ))
    slack = load_slack_bytes(odd, "bf16")
    up, embed = 3000 * 2048 * 2, 5000 * 1024 * 2
    assert slack == 3 * (12 * MiB - up) + (20 * MiB - embed)
    # the shipped models: what the simulation of their own tensors leaves (a few ms each)
    assert load_slack_bytes(get_shape("Qwen/Qwen2.5-0.5B"), "fp32") > 100 * MiB
    assert load_slack_bytes(get_shape("meta-llama/Llama-3.2-1B"), "bf16") < 4 * MiB


def test_expandable_segments_leave_less_slack():
    from formulas.allocator import parse_alloc_conf

    spec = Spec(model="Llama-3.1-8B", mode="train", method="lora", seq=4096)
    native = predict(spec)
    expandable = predict(spec, DEFAULT_OVERHEADS.with_alloc_conf(parse_alloc_conf("expandable_segments:True")))
    assert expandable.peak_allocated_bytes == native.peak_allocated_bytes
    assert expandable.peak_reserved_bytes < native.peak_reserved_bytes
    assert "expandable_segments:True" in expandable.overheads_source


def test_math_kernel_prefill_holds_the_score_matrix_and_qlora_on_old_torch_saves_it():
    spec = Spec(model="Llama-3.2-1B", dtype="fp32", batch=8, seq=2048, gen=4)
    math = predict(spec.replace(stack=_stack("2.13.0")))
    efficient = predict(spec.replace(stack=_stack("2.14.0")))
    scores = 8 * 32 * 2048 * 2048 * 4  # one score matrix of one layer, fp32; the math kernel holds it and its softmax
    assert 1.5 * scores < math.peak_allocated_bytes - efficient.peak_allocated_bytes < 2.5 * scores
    q = Spec(model="Llama-3.1-8B", mode="train", method="qlora", seq=2048)
    old, new = predict(q.replace(stack=_stack("2.13.0"))), predict(q.replace(stack=_stack("2.14.0")))
    saved = 32 * 32 * 2048 * 2048 * 4  # the fp32 softmax every layer saves for backward
    assert old.breakdown[C.ACTIVATIONS] - new.breakdown[C.ACTIVATIONS] >= saved


def test_a_record_is_predicted_again_in_its_own_environment():
    from harness.analysis.repredict import gpu_hardware, loaded_before, repredict, spec_of
    from harness.records import iter_records

    recs = [r for r in iter_records(H200_RUNS) if r["outcome"] == "ok"]
    r = next(r for r in recs if r["spec_hash"] == "0bee74023c11")  # Llama-3.2-1B nf4, 20th in its worker
    assert dict(spec_of(r).stack) == {k: r["env"]["packages"][k] for k in ("transformers", "peft", "torch",
                                                                               "bitsandbytes")}
    assert gpu_hardware(r).name == "H200"
    loaded = loaded_before(recs)
    assert set(loaded["0bee74023c11"]) == {"gemm", "bnb_int8"}  # its worker had run int8 experiments before it
    first = next(x for x in recs if x["measured"]["process"]["experiment_in_process"] == 1)
    assert loaded[first["spec_hash"]] == ()
    pred, device = repredict(r, loaded=loaded["0bee74023c11"])
    assert device > pred.peak_device_bytes  # the kernel images the worker already held
    assert abs(pred.peak_allocated_bytes / r["measured"]["peak_allocated_bytes"] - 1) < 0.01


def test_show_explains_a_record_and_draws_its_timeline(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from harness.cli import main

    path = os.path.join(H200_RUNS, "smoke", "nvidia-h200-580.159.04", "03f78a02fd84.json")
    assert main(["show", path, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for line in ("peak allocated (torch)", "allocator slack", "outside the allocator", "peak device (NVML)", "optimizer_step"):
        assert line in out
    page = (tmp_path / "03f78a02fd84.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and (tmp_path / "03f78a02fd84.png").stat().st_size > 10_000
    assert main(["show", os.path.join(H200_RUNS, "nope.json")]) == 2


def test_alloc_conf_is_read_as_torch_reads_it_and_refused_in_one_line(capsys, monkeypatch):
    from harness.cli import main

    assert main(["predict", "--model", "Qwen2.5-0.5B", "--alloc-conf", "max_split_size_mb:5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--alloc-conf" in err and "too small" in err
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert main(["predict", "--model", "Qwen2.5-0.5B", "--json"]) == 0
    assert "expandable_segments:True" in json.loads(capsys.readouterr().out)["overheads_source"]

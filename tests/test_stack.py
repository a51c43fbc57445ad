"""The software-stack model (formulas/stack.py): flags, the table, and the behaviours it switches."""

import json
import subprocess
import sys
from importlib import metadata

import pytest

from formulas.catalog import get_shape
from formulas.predict import predict
from formulas.spec import Spec, SpecError
from formulas.stack import BEHAVIOURS, NEWEST, OLDEST, PACKAGES, behaviour, linear_experts, make_stack, parse_version
from harness.cli import main

MIXTRAL = "mistralai/Mixtral-8x7B-v0.1"
OLD = (("transformers", "4.40.0"),)


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("text,want", [("4.40", (4, 40, 0)), ("4.40.2", (4, 40, 2)), ("2.2.0+cu121", (2, 2, 0)),
                                       ("5.0.0rc1", (5, 0, 0)), ("0.43.0.dev0", (0, 43, 0)), ("v5.17.0", (5, 17, 0))])
def test_parse_version(text, want):
    assert parse_version(text) == want


def test_every_behaviour_has_a_version_inside_the_table_and_a_source():
    for b in BEHAVIOURS:
        assert b.package in PACKAGES and b.source and b.what and b.old != b.new
        assert parse_version(OLDEST[b.package]) <= parse_version(b.since) <= parse_version(NEWEST[b.package])


@pytest.mark.parametrize("argv,flag", [
    (["--transformers", "banana"], "--transformers banana"),
    (["--peft", "0.3.0"], "--peft 0.3.0"),
    (["--torch", "1.13"], "--torch 1.13"),
    (["--bitsandbytes", "x.y"], "--bitsandbytes x.y"),
])
def test_a_bad_version_is_one_line_naming_the_flag(capsys, argv, flag):
    code, out, err = run(capsys, "predict", "--model", "Llama-3.2-1B", *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and flag in err


def test_the_default_stack_is_what_is_installed(capsys):
    code, out, _ = run(capsys, "predict", "--model", "Llama-3.2-1B", "--json")
    d = json.loads(out)
    for p in PACKAGES:
        try:
            have = metadata.version(p)
        except metadata.PackageNotFoundError:
            have = None
        entry = d["stack"][p]
        if have and parse_version(have) >= parse_version(OLDEST[p]):
            assert entry == {"version": ".".join(map(str, parse_version(have))), "origin": "installed"}
        else:
            assert entry["version"] == NEWEST[p] and entry["origin"].startswith("newest modelled")
    assert d["spec"]["stack"] == {p: d["stack"][p]["version"] for p in PACKAGES}


def test_make_stack_asked_over_installed_over_newest():
    s = make_stack({"transformers": "4.40"}, {"transformers": "5.24.0", "peft": "0.10.0", "torch": None,
                                              "bitsandbytes": "0.30.0"})
    assert s.version("transformers") == "4.40.0" and s.origin("transformers") == "asked"
    assert s.version("peft") == "0.10.0" and s.origin("peft") == "installed"
    assert s.version("torch") == NEWEST["torch"] and s.origin("torch") == "newest modelled"
    assert s.version("bitsandbytes") == NEWEST["bitsandbytes"] and "older than the table" in s.origin("bitsandbytes")


def _mixtral_qlora(stack, **kw):
    return predict(Spec(model=MIXTRAL, mode="train", method="qlora", batch=4, seq=4096, grad_ckpt=True,
                        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), stack=stack, **kw))


def test_mixtral_qlora_two_stacks_two_answers(capsys):
    """transformers 4.x builds experts as nn.Linear, which bitsandbytes quantizes; 5.x fuses them into 3-D
    parameters it leaves alone, and kbit prep casts those to fp32: 3.5 bytes more per expert parameter."""
    old, new = _mixtral_qlora(OLD), _mixtral_qlora(())
    shape = get_shape(MIXTRAL)
    experts = sum(t.total_numel for t in shape.tensors if t.kind in ("experts", "router"))
    assert new.breakdown["weights"] - old.breakdown["weights"] == experts * 4 - experts // 2
    assert old.peak_device_bytes < 48 * 2**30 < 160 * 2**30 < new.peak_device_bytes
    for version, word in (("4.40", "4.40.0 (asked)"), ("5.17", "5.17.0 (asked)")):
        code, out, _ = run(capsys, "predict", "--model", MIXTRAL, "--mode", "train", "--method", "qlora", "--batch", "4",
                           "--seq", "4096", "--grad-ckpt", "--lora-targets", "q_proj,k_proj,v_proj,o_proj",
                           "--transformers", version)
        assert code == 0 and f"stack: transformers {word}" in out
        assert ("quantizes every expert" in out) == (version == "4.40")


def test_linear_experts_keep_every_parameter():
    shape = get_shape(MIXTRAL)
    lin = linear_experts(shape)
    assert sum(t.total_numel for t in lin.tensors) == sum(t.total_numel for t in shape.tensors)
    assert {t.module for t in lin.tensors if "experts" in t.name} == {"w1", "w2", "w3"}


def _trainable(p):
    line = next(n for n in p.notes if n.startswith("LoRA"))
    return int(line.split(": ")[1].split()[0].replace(",", ""))


def test_lora_all_linear_on_moe_follows_transformers_and_peft():
    """4.x: every expert's w1/w2/w3 and the router are nn.Linear that all-linear adapts; 5.x with peft ≤ 0.18:
    no expert (fused 3-D parameters); peft ≥ 0.20: the fused parameters and the router through
    target_parameters — gate_up at rank 2r, down at rank r, A (E·r', in) and B (out, E·r')."""
    r = 8
    kw = dict(model=MIXTRAL, mode="train", method="lora", lora_targets=("all-linear",), lora_rank=r, seq=128)
    shape = get_shape(MIXTRAL)
    E, H, I, L = shape.n_experts, shape.hidden, shape.moe_intermediate, shape.n_layers
    attn_only = _trainable(predict(Spec(stack=(("transformers", "5.24.0"), ("peft", "0.18.1")), **kw)))
    old = _trainable(predict(Spec(stack=(("transformers", "4.40.0"), ("peft", "0.10.0")), **kw)))
    new = _trainable(predict(Spec(stack=(("transformers", "5.24.0"), ("peft", "0.20.0")), **kw)))
    router = r * (H + E)
    assert old - attn_only == L * (E * r * (2 * (H + I) + (I + H)) + router)
    assert new - attn_only == L * ((E * 2 * r * H + 2 * I * E * 2 * r) + (E * r * I + H * E * r) + router)


@pytest.mark.parametrize("version,per_entry", [("4.45", 12), ("4.46", 14), ("4.48", 14), ("4.49", 10), ("5.24", 10)])
def test_logits_at_the_loss_follow_the_stack(version, per_entry):
    """Bytes per token per vocabulary entry at the loss, bf16: ≤ 4.45 the forward's fp32 logits (the bf16 ones
    freed), the shifted copy and the log-softmax; 4.46-4.48 bf16 logits, the loss's fp32 copy, the shifted copy
    and the log-softmax; since 4.49 the labels are shifted instead."""
    spec = Spec(model="meta-llama/Llama-3.2-1B", mode="train", method="full", precision="pure", batch=1, seq=512,
                stack=(("transformers", version),))
    p = predict(spec)
    assert p.phases["forward"]["logits"] == 512 * get_shape(spec.model).vocab * per_entry


def test_inference_logits_before_446_cover_every_prompt_position():
    kw = dict(model="meta-llama/Llama-3.1-8B", batch=1, seq=4096, gen=16)
    old, new = predict(Spec(stack=OLD, **kw)), predict(Spec(**kw))
    V = get_shape(kw["model"]).vocab
    assert old.phases["prefill"]["logits"] == 4096 * V * (2 + 4)
    assert new.phases["prefill"]["logits"] in (0, V * (2 + 4))  # the last position's (or a layer's working set wins)
    assert old.peak_allocated_bytes > new.peak_allocated_bytes


def test_peft_adapter_dtype_and_an_explicit_flag_wins(capsys):
    kw = dict(model="meta-llama/Llama-3.2-1B", mode="train", method="lora", lora_dtype="auto")
    assert predict(Spec(stack=(("peft", "0.11.1"),), **kw)).spec.lora_dtype == "bf16"
    assert predict(Spec(stack=(("peft", "0.12.0"),), **kw)).spec.lora_dtype == "fp32"
    assert predict(Spec(stack=(("peft", "0.11.1"),), **{**kw, "method": "qlora"})).spec.lora_dtype == "fp32"
    code, out, _ = run(capsys, "predict", "--model", "Llama-3.2-1B", "--mode", "train", "--method", "lora",
                       "--peft", "0.11", "--lora-dtype", "fp32", "--json")
    assert json.loads(out)["spec"]["lora_dtype"] == "fp32"


def test_bitsandbytes_before_0432_keeps_each_4bit_input():
    """MatMul4Bit kept A (cast to bf16) for backward: after kbit prep the stream is fp32, so each Linear4bit
    casts its own copy — per layer and token q, k, v (3H), o (H), gate, up (2H), down (I), 2 bytes each."""
    base = dict(model="meta-llama/Llama-2-7b-hf", mode="train", method="qlora", batch=1, seq=512)
    shape = get_shape(base["model"])
    H, I, L = shape.hidden, shape.intermediate, shape.n_layers
    held = 512 * L * (3 * H + H + 2 * H + I) * 2
    new = (("transformers", "5.24.0"), ("bitsandbytes", "0.43.2"))
    old = (("transformers", "5.24.0"), ("bitsandbytes", "0.43.1"))
    a_new, a_old = predict(Spec(stack=new, **base)), predict(Spec(stack=old, **base))
    assert a_old.phases["forward"]["activations"] - a_new.phases["forward"]["activations"] == held
    # checkpointed: held across every layer under non-reentrant checkpointing (5.x), not under reentrant (4.x)
    ck_new, ck_old = predict(Spec(stack=old, grad_ckpt=True, **base)), predict(Spec(stack=new, grad_ckpt=True, **base))
    assert ck_new.phases["forward"]["activations"] - ck_old.phases["forward"]["activations"] == held
    reentrant = (("transformers", "4.57.0"), ("bitsandbytes", "0.43.1"))
    plain = (("transformers", "4.57.0"), ("bitsandbytes", "0.43.2"))
    assert predict(Spec(stack=reentrant, grad_ckpt=True, **base)).phases["forward"]["activations"] == \
        predict(Spec(stack=plain, grad_ckpt=True, **base)).phases["forward"]["activations"]


def test_mla_cache_and_default_attention_follow_transformers():
    kw = dict(model="deepseek-ai/DeepSeek-V2-Lite", seq=1024, mla_cache="auto")
    assert predict(Spec(stack=(("transformers", "5.14.1"),), **kw)).spec.mla_cache == "expanded"
    assert predict(Spec(stack=(("transformers", "5.15.0"),), **kw)).spec.mla_cache == "compressed"
    kw = dict(model="meta-llama/Llama-2-7b-hf", attn="auto")
    assert predict(Spec(stack=(("transformers", "4.35.2"),), **kw)).spec.attn == "eager"
    assert predict(Spec(stack=(("transformers", "4.36.0"),), **kw)).spec.attn == "sdpa"


def test_a_spec_with_a_bad_stack_is_refused():
    with pytest.raises(SpecError, match="--transformers 4.2"):
        predict(Spec(model="gpt2", stack=(("transformers", "4.2"),)))


def test_stack_command_lists_every_behaviour(capsys):
    code, out, _ = run(capsys, "stack", "--transformers", "4.40", "--verbose")
    assert code == 0 and "stack: transformers 4.40.0 (asked)" in out
    for b in BEHAVIOURS:
        assert b.key in out and b.source in out
    code, out, _ = run(capsys, "stack", "--json")
    d = json.loads(out)
    assert {b["key"] for b in d["behaviours"]} == {b.key for b in BEHAVIOURS}
    assert all(b["assumed"] == behaviour(tuple((p, d["stack"][p]["version"]) for p in PACKAGES), b["key"])
               for b in d["behaviours"])


def test_predict_answers_fast_without_torch():
    code = ("import sys, time\nt = time.perf_counter()\nfrom harness.cli import main\n"
            "main(['predict', '--model', 'mistralai/Mixtral-8x7B-v0.1', '--mode', 'train', '--method', 'qlora', "
            "'--transformers', '4.40'])\nprint('SECONDS', time.perf_counter() - t)\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    best = None
    for _ in range(3):
        t0 = __import__("time").perf_counter()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        wall = __import__("time").perf_counter() - t0
        assert r.returncode == 0, r.stderr
        best = wall if best is None else min(best, wall)
    assert best < 0.5, f"vramlab predict took {best:.2f} s (interpreter start included)"


def test_generate_before_442_holds_two_caches_at_a_decode_step():
    """Up to 4.41 generate passed the cache as tuples: each step concatenated a new cache while the previous
    step's stayed referenced — the previous (prompt + steps − 1 tokens) cache beside the new one."""
    kw = dict(model="meta-llama/Llama-2-13b-hf", dtype="fp16", batch=16, seq=512, gen=511)
    shape = get_shape(kw["model"])
    per_token = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * 2
    old = predict(Spec(stack=(("transformers", "4.41.2"),), **kw))
    new = predict(Spec(stack=(("transformers", "4.42.0"),), **kw))
    assert old.phases["decode"]["temporaries"] == 16 * (512 + 511 - 1) * per_token
    assert new.phases["decode"]["temporaries"] == 16 * (512 + 511) * per_token // shape.n_layers // 2


def test_docs_table_names_every_behaviour():
    import os

    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "stack.md")).read()
    for b in BEHAVIOURS:
        assert f"| `{b.key}` | {b.package} | {b.since} |" in text, b.key


def test_rope_caches_of_llama_before_441():
    kw = dict(model="meta-llama/Llama-2-7b-hf", seq=128)
    shape = get_shape(kw["model"])
    old = predict(Spec(stack=(("transformers", "4.40.2"),), **kw))
    new = predict(Spec(stack=(("transformers", "4.41.0"),), **kw))
    assert old.breakdown["buffers"] - new.breakdown["buffers"] == 32 * 2 * shape.max_positions * shape.head_dim * 2


def test_trace_names_a_stack_it_does_not_run():
    from harness.cli.common import installed_versions
    from harness.cli.trace import stack_mismatch

    have = installed_versions()["transformers"]
    spec = predict(Spec(model="meta-llama/Llama-3.2-1B", mode="train", stack=(("transformers", "4.40.0"),))).spec
    lines = stack_mismatch(spec)
    assert len(lines) == 1 and f"installed transformers {have}" in lines[0] and "4.40.0 (--transformers)" in lines[0]
    assert "experts" in lines[0] and "logits_upcast" in lines[0] and "stack_venvs.sh" in lines[0]
    same = predict(Spec(model="meta-llama/Llama-3.2-1B", stack=(("transformers", have),))).spec
    assert stack_mismatch(same) == []


def test_a_sweep_record_predicts_with_the_installed_stack(tmp_path):
    from harness.cli.common import installed_versions
    from harness.records import new_record
    from harness.sweep.schema import Experiment

    exp = Experiment(spec=Spec(model="meta-llama/Llama-3.2-1B", seq=64))
    rec = new_record(exp, "traced")
    assert rec["spec"]["stack"] == {} and rec["spec_hash"] == exp.spec_hash
    assert rec["predicted"]["stack"]["transformers"] == ".".join(
        map(str, parse_version(installed_versions()["transformers"])))

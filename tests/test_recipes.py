"""Fine-tuning recipes (--recipe): their rules per version, the predictor's recipe path, the CLI, hashes.

The trace side (recipes run on fake tensors against the prediction) is in tests/test_trace.py.
"""

import glob
import json
import os

import pytest

from formulas import categories as C
from formulas import recipes as R
from formulas.predict import predict
from formulas.spec import Spec, SpecError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QLORA_8B = dict(model="Llama-3.1-8B", mode="train", method="qlora", dtype="bf16", seq=2048, grad_ckpt=True)
T, V, H, L = 2048, 128256, 4096, 32


def _spec(**fields):
    """A Spec as the CLI builds it: the recipe's defaults for the fields not given."""
    recipe = fields.get("recipe", "hf")
    return Spec(**{**QLORA_8B, **R.flag_defaults(recipe, fields.get("recipe_version", "")), **fields})


# ------------------------------------------------------------------ the issue's bars

@pytest.mark.parametrize("recipe", ["unsloth", "liger"])
def test_qlora_8b_holds_no_full_vocabulary_fp32_logits(recipe):
    p = predict(_spec(recipe=recipe))
    assert p.breakdown[C.LOGITS] < T * V * 4  # not even one fp32 copy of the logits
    for phase in p.phases.values():
        assert phase[C.LOGITS] < T * V * 4
    hf = predict(_spec())
    assert hf.breakdown[C.LOGITS] >= 3 * T * V * 4  # the full path: fp32 logits and their gradients


def test_unsloth_keeps_layer_inputs_in_host_ram():
    p = predict(_spec(recipe="unsloth"))
    # 32 pinned buffers grown to one layer input each (bf16), the other 168 of the 200 at 128 Ki elements
    assert p.host_ram_bytes == L * T * H * 2 + (200 - L) * 128 * 1024 * 2
    # on the GPU: the first and the last layer's inputs and two staging buffers, not 32 inputs
    assert p.phases["backward"][C.ACTIVATIONS] < 8 * T * H * 2 + T * 120_000
    assert any("gradient_checkpointing.py" in n for n in p.notes)
    assert any("fused_losses/cross_entropy_loss.py" in n for n in p.notes)
    assert any("fast_lora.py" in n and "rms_layernorm.py" in n for n in p.notes)
    assert predict(_spec(recipe="liger")).host_ram_bytes == 0


def test_ddp_replicas_hold_the_single_gpu_step_and_the_buckets():
    one = predict(_spec(recipe="unsloth"))
    two = predict(_spec(recipe="unsloth", gpus=2))
    grads = one.phases["optimizer_step"][C.GRADIENTS]
    assert two.peak_allocated_bytes == one.peak_allocated_bytes + grads  # DDP's bucket copy of the LoRA gradients
    assert two.host_ram_bytes == one.host_ram_bytes


def test_liger_notes_cite_its_kernels():
    notes = " ".join(predict(_spec(recipe="liger")).notes)
    for where in ("fused_linear_cross_entropy.py", "rms_norm.py line 657", "swiglu.py line 262"):
        assert where in notes


def test_recipes_predict_less_than_the_full_loss_path():
    hf = predict(_spec()).peak_allocated_bytes
    for recipe, at_most in (("unsloth", 0.6), ("trl", 0.8), ("liger", 0.9)):
        assert predict(_spec(recipe=recipe)).peak_allocated_bytes < at_most * hf, recipe


def test_grid_predicts_the_recipes_as_predict_does():
    pytest.importorskip("numpy")
    pytest.importorskip("pandas")
    from formulas.grid import expand_grid, predict_grid

    for recipe, extra in (("unsloth", {}), ("unsloth", {"recipe_version": "2025.1.5"}), ("liger", {}), ("trl", {}),
                          ("axolotl", {"grad_ckpt_mode": "selective"}), ("hf", {"loss": "cut"})):
        specs = expand_grid(dict(QLORA_8B, recipe=recipe, **extra), batch=[1, 2], seq=[256, 400, 1024, 4096])
        df = predict_grid(specs)
        for spec, (_, row) in zip(specs, df.iterrows()):
            p = predict(spec)
            assert row.peak_allocated_bytes == p.peak_allocated_bytes, (recipe, spec.batch, spec.seq)
            assert row.host_ram_bytes == p.host_ram_bytes, (recipe, spec.batch, spec.seq)


# ------------------------------------------------------------------ rules per version

@pytest.mark.parametrize("recipe,version,key,expected", [
    ("trl", "1.6.0", "loss", "full"), ("trl", "1.7.0", "loss", "chunked"),
    ("trl", "0.25.1", "kbit_prep", True), ("trl", "0.26.0", "kbit_prep", False),
    ("trl", "0.26.0", "quantized_adapter_dtype", "bf16"), ("trl", "0.99.0", "grad_ckpt", False),
    ("trl", "1.0.0", "grad_ckpt", True),
    ("unsloth", "2025.8.5", "loss", "cut"), ("unsloth", "2025.8.6", "loss", "fused"),
    ("unsloth", "2026.4.9", "double_buffer", False), ("unsloth", "2026.5.1", "double_buffer", True),
    ("unsloth", "2026.6.9", "ce_cap", False), ("unsloth", "2026.7.1", "ce_cap", True),
])
def test_versioned_behaviours(recipe, version, key, expected):
    assert R.versioned(recipe, version, key) == expected


def test_chunk_rules_follow_the_sources():
    # Liger: next_power_of_2(ceil(BT / ceil(V / H))): 2048 tokens, V/H = 31.3 → 32 → 64 rows
    assert R.liger_chunk_tokens(2048, 4096, 128256) == 64
    assert R.liger_chunk_tokens(1, 4096, 128256) == 1
    # Unsloth: one chunk while the fp32 logits fit in 4 GiB, else their GiB over 4, rounded up to a multiple of 4
    assert R.unsloth_ce_chunks(2048, 128256, 4 << 30) == 1
    assert R.unsloth_ce_chunks(100_000, 128256, 4 << 30) == 12
    assert R.unsloth_ce_chunks(100_000, 128256, 0) == 1
    # Unsloth before 2025.8.6: Cut Cross-Entropy above 1,024 tokens, its in-place loss at or below
    old = R.rules(Spec(model="Llama-3.1-8B", mode="train", recipe="unsloth", recipe_version="2025.1.5"))
    assert R.loss_impl(old, 1024) == "unsloth_inplace" and R.loss_impl(old, 1025) == "cce"
    # Unsloth checkpoints plainly below 512 tokens
    new = R.rules(Spec(model="Llama-3.1-8B", mode="train", recipe="unsloth"))
    assert R.effective_ckpt_mode(new, 511) == "full" and R.effective_ckpt_mode(new, 512) == "offload"


def test_kernels_only_for_dense_llama_style_layers():
    from formulas.catalog import get_shape

    spec = Spec(model="Qwen3-30B-A3B", mode="train", method="lora", recipe="liger")
    r = R.rules(spec, get_shape("Qwen3-30B-A3B"))
    assert not (r.norm_kernel or r.swiglu_kernel) and r.loss == "fused"
    assert any("dense Llama-style" in n for n in predict(spec).notes)


# ------------------------------------------------------------------ validation and hashes

@pytest.mark.parametrize("fields,flag", [
    (dict(recipe="deepspeed"), "--recipe deepspeed"),
    (dict(recipe="unsloth", recipe_version="2023.1.1"), "--recipe-version 2023.1.1"),
    (dict(recipe="liger", recipe_version="x.y"), "--recipe-version x.y"),
    (dict(recipe_version="1.0.0"), "--recipe-version 1.0.0"),
    (dict(loss="sampled"), "--loss sampled"),
    (dict(grad_ckpt=True, grad_ckpt_mode="offload"), "--grad-ckpt-mode offload"),
    (dict(grad_ckpt=False, grad_ckpt_mode="full"), "--grad-ckpt-mode full"),
    (dict(recipe="unsloth", grad_ckpt=True, grad_ckpt_mode="selective"), "--grad-ckpt-mode selective"),
    (dict(mode="inference", method="full", recipe="liger"), "--recipe liger"),
    (dict(recipe="unsloth", gpus=2, zero=2), "--recipe unsloth"),
    (dict(recipe="liger", gpus=2, tp=2), "--recipe liger"),
])
def test_bad_recipe_input_is_one_line(fields, flag):
    base = dict(model="Llama-3.1-8B", mode="train", method="lora")
    with pytest.raises(SpecError) as e:
        predict(Spec(**{**base, **fields}))
    assert flag in str(e.value) and "\n" not in str(e.value)


def test_existing_record_hashes_are_unchanged():
    """The new Spec fields' defaults leave out of the hash: every stored record's spec still hashes as written."""
    from harness.sweep.schema import Experiment

    checked = 0
    for path in glob.glob(os.path.join(ROOT, "results", "runs", "**", "*.json"), recursive=True):
        rec = json.load(open(path))
        if "spec" not in rec or "spec_hash" not in rec or rec.get("source") == "published":
            continue
        assert Experiment.from_dict(rec).spec_hash == rec["spec_hash"], path
        checked += 1
    assert checked > 0


def test_sweeps_fill_a_recipes_defaults(tmp_path):
    from harness.sweep.schema import load_sweep

    path = tmp_path / "r.yaml"
    path.write_text("name: r\ndefaults: {mode: train, method: lora, seq: 1024, model: Llama-3.2-1B, recipe: unsloth}\n"
                    "groups:\n  - name: u\n  - name: v\n    set: {grad_ckpt: false}\n")
    _, exps = load_sweep(str(path))
    assert exps[0].spec.grad_ckpt and exps[0].spec.lora_targets == R.UNSLOTH_TARGETS
    assert not exps[1].spec.grad_ckpt


# ------------------------------------------------------------------ CLI

def _main(*argv):
    from harness.cli import main

    return main(list(argv))


def test_cli_predict_recipe_json_and_defaults(capsys):
    assert _main("predict", "--model", "Llama-3.1-8B", "--mode", "train", "--method", "qlora", "--seq", "2048",
                 "--recipe", "unsloth", "--json") == 0
    d = json.loads(capsys.readouterr().out)
    assert d["spec"]["recipe"] == "unsloth" and d["spec"]["grad_ckpt"] and d["host_ram_bytes"] > 0
    assert d["spec"]["lora_targets"] == list(R.UNSLOTH_TARGETS) and not d["spec"]["kbit_prep"]
    assert _main("predict", "--model", "Llama-3.1-8B", "--mode", "train", "--method", "qlora", "--recipe", "unsloth",
                 "--no-grad-ckpt", "--lora-targets", "q_proj,v_proj", "--json") == 0
    d = json.loads(capsys.readouterr().out)
    assert not d["spec"]["grad_ckpt"] and d["host_ram_bytes"] == 0 and d["spec"]["lora_targets"] == ["q_proj", "v_proj"]
    assert _main("predict", "--model", "Llama-3.1-8B", "--mode", "train", "--method", "qlora", "--recipe", "unsloth") == 0
    out = capsys.readouterr().out
    assert "host RAM" in out and "recipe unsloth" in out


def test_cli_plan_takes_the_recipe(capsys):
    assert _main("plan", "--model", "Llama-3.1-8B", "--mode", "train", "--method", "qlora", "--seq", "2048",
                 "--recipe", "liger", "--gpu", "RTX 4090", "--json") == 0
    assert json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv,flag", [
    (["--recipe", "nemo"], "--recipe nemo"),
    (["--recipe", "unsloth", "--recipe-version", "2020.1.1"], "--recipe-version 2020.1.1"),
    (["--grad-ckpt-mode", "offload", "--grad-ckpt"], "--grad-ckpt-mode offload"),
])
def test_cli_recipe_errors_are_one_line_exit_2(capsys, argv, flag):
    assert _main("predict", "--model", "Llama-3.1-8B", "--mode", "train", "--method", "lora", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]

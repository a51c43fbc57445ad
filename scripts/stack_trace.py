"""Trace vramlab's workloads under whichever transformers this Python has (a stack venv or the system one).

    .stacks/venv-transformers-4.40.2/bin/python scripts/stack_trace.py trace --model cfg.json --mode train ...
    .stacks/venv-transformers-4.40.2/bin/python scripts/stack_trace.py quant --model cfg.json
    python3 scripts/stack_trace.py trainable --model cfg.json --mode train --method lora --lora-targets all-linear

`trace` is `python -m harness trace ... --json` (the same spec flags, the same JSON), run in this
process after `moe_routing_standin()`; `trainable` builds the spec's model on fake tensors and
counts its parameters; `quant` builds the model on the meta device and applies transformers' own
`replace_with_bnb_linear` with a BitsAndBytesConfig(load_in_4bit=True) and the modules the 4-bit
quantizer leaves out, and counts the elements that would be 4-bit. Each prints one JSON object.
scripts/stack_check.py runs these in every stack venv (scripts/stack_venvs.sh builds them).

Nothing is downloaded: models are built from config.json (tests/tiny_configs.py writes tiny ones).

What differs from a real run under transformers 4.x: its Mixtral MoE block routes tokens with
`torch.where(expert_mask[e])`, whose output size depends on the data, which fake tensors have none
of. `moe_routing_standin` answers that `torch.where` with a balanced routing (each expert gets
batch·seq·top_k / n_experts token slots, as many rows in all as the 5.x grouped experts run), so
every expert's matmuls run on fake tensors with the sizes of a balanced batch.
"""

import contextlib
import io
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def versions():
    """The stack this Python runs: {package: version}."""
    import importlib.metadata as md

    out = {}
    for p in ("transformers", "peft", "torch", "bitsandbytes"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


@contextlib.contextmanager
def moe_routing_standin():
    """Under transformers 4.x (nn.Linear experts, MixtralBlockSparseTop2MLP), answer the routing's
    one-argument `torch.where(expert_mask[e])` with a balanced assignment of fixed size; a no-op on 5.x.
    Yields the list of notes (one line when the stand-in was installed)."""
    import torch

    notes = []
    try:
        from transformers.models.mixtral import modeling_mixtral as mm
    except ImportError:
        yield notes
        return
    block = getattr(mm, "MixtralSparseMoeBlock", None)
    if block is None or not hasattr(mm, "MixtralBlockSparseTop2MLP"):  # 5.x: fused experts, no data-dependent where
        yield notes
        return
    orig_forward = block.forward

    used = []

    def forward(self, hidden_states):
        used.append(1)
        b, s, _ = hidden_states.shape
        tokens, k, experts = b * s, self.top_k, self.num_experts
        slots = tokens * k
        state = {"e": 0, "offset": 0}
        orig_where = torch.where

        def where(*args, **kwargs):
            if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
                e = state["e"]
                n = slots // experts + (1 if e < slots % experts else 0)
                state["e"] += 1
                dev = args[0].device
                top_x = (torch.arange(n, device=dev) + state["offset"]) % tokens
                state["offset"] += n
                idx = (torch.arange(n, device=dev) * 0)  # slot 0 (only its size matters), int64 like where's
                return idx, top_x
            return orig_where(*args, **kwargs)

        torch.where = where
        try:
            return orig_forward(self, hidden_states)
        finally:
            torch.where = orig_where

    block.forward = forward
    try:
        yield notes
    finally:
        block.forward = orig_forward
        if used:  # said only when a Mixtral block ran
            notes.append("transformers 4.x Mixtral routing: torch.where(expert_mask[e]) answered with a balanced "
                         "routing (batch·seq·top_k/n_experts slots per expert) — fake tensors have no router data")


def _spec(argv):
    from harness.cli import build_parser
    from harness.cli.common import spec_from_args

    return spec_from_args(build_parser().parse_args(["trace", *argv]))


def cmd_trace(argv):
    """`python -m harness trace ARGV --json` in this process, with the MoE routing stand-in; the JSON dict."""
    from harness.cli import main

    out = io.StringIO()
    with moe_routing_standin() as notes, contextlib.redirect_stdout(out):
        rc = main(["trace", *argv, "--json"])
    if rc:
        raise SystemExit(f"stack_trace: harness trace exited {rc}")
    d = json.loads(out.getvalue())
    d["notes"] = notes + d.get("notes", [])
    d["versions"] = versions()
    return d


def cmd_trainable(argv):
    """Build the spec's model as the tracer does (fake tensors) and count parameters and trainable ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from harness.tracing.tracer import _fake_module_conversions
    from harness.workload.models import build_model

    spec = _spec(argv)
    fake = FakeTensorMode()
    with fake, _fake_module_conversions(fake):
        model = build_model(spec)
    params = list(model.named_parameters())
    trainable = [(n, p) for n, p in params if p.requires_grad]
    expert_trainable = sum(p.numel() for n, p in trainable if ".experts." in n)
    return {"versions": versions(), "n_params": sum(p.numel() for _, p in params),
            "trainable_params": sum(p.numel() for _, p in trainable),
            "trainable_params_in_experts": expert_trainable,
            "trainable_tensors": len(trainable),
            "lora_targets": sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in trainable if ".lora_" in n})}


def _not_converted(model, quantizer_version):
    """The modules transformers' 4-bit quantizer leaves unquantized (its _process_model_before_weight_loading)."""
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if quantizer_version >= (5,):
        from transformers.quantizers.base import HfQuantizer

        return HfQuantizer.get_modules_to_not_convert(model, None, keep_fp32)
    from transformers.integrations.bitsandbytes import get_keys_to_not_convert

    return list(get_keys_to_not_convert(model)) + keep_fp32


def cmd_quant(argv):
    """Which parameters transformers' replace_with_bnb_linear would make 4-bit, on a meta-device model."""
    import bitsandbytes as bnb
    import torch
    import transformers
    import transformers.integrations.bitsandbytes as tib
    from transformers import BitsAndBytesConfig

    from formulas.catalog import load_config
    from harness.workload.models import transformers_config

    if not hasattr(tib, "bnb"):  # 4.x imports these there only when CUDA is available (is_bitsandbytes_available)
        from transformers.pytorch_utils import Conv1D

        tib.bnb, tib.torch, tib.nn, tib.Conv1D = bnb, torch, torch.nn, Conv1D
    spec = _spec(argv)
    from packaging.version import Version

    tv = Version(transformers.__version__).release
    config = transformers_config(load_config(spec.model))
    with torch.device("meta"):
        kw = {"dtype" if tv >= (4, 56) else "torch_dtype": torch.bfloat16}
        model = transformers.AutoModelForCausalLM.from_config(config, **kw)
    skip = _not_converted(model, tv)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
    model = tib.replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=qc)
    quantized, kept, modules = 0, 0, {}
    q_params = set()
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            q_params.add(id(m.weight))
            quantized += m.in_features * m.out_features
            leaf = name.rsplit(".", 1)[-1]
            modules[leaf] = modules.get(leaf, 0) + 1
    kept_by = {}
    for name, p in model.named_parameters():
        if id(p) not in q_params:
            kept += p.numel()
            key = name.rsplit(".", 1)[0].rsplit(".", 1)[-1] + "." + name.rsplit(".", 1)[-1]
            kept_by[key] = kept_by.get(key, 0) + p.numel()
    return {"versions": versions(), "modules_not_converted": sorted(skip),
            "quantized_elements": quantized, "unquantized_elements": kept,
            "quantized_modules": modules, "unquantized_by_tensor": kept_by,
            # nf4 packs two elements a byte; the rest stays in the compute dtype (bf16)
            "weights_bytes": quantized // 2 + kept * 2}


COMMANDS = {"trace": cmd_trace, "trainable": cmd_trainable, "quant": cmd_quant}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: stack_trace.py {{{'|'.join(COMMANDS)}}} SPEC-FLAGS (those of `vramlab trace`)", file=sys.stderr)
        return 2
    import warnings

    warnings.filterwarnings("ignore")
    print(json.dumps(COMMANDS[argv[0]](argv[1:]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

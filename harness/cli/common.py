"""What the `vramlab` commands share: the workload flags, error handling, loading records, GiB cells.

Every command's bad input ends the same way (`run_command`): one line on stderr naming the
flag, file or field, exit status 2. A missing optional dependency says which package to
install instead of a traceback. Nothing here imports torch, transformers or pandas.
"""

import argparse
import sys

from formulas.stack import NEWEST as STACK_NEWEST
from formulas.stack import PACKAGES as STACK_PACKAGES
from formulas.units import fmt_gib

from ..env import installed_versions  # noqa: F401  (the stack flags' default; re-exported)

# import name → the package that provides it (in the `harness` extra of pyproject.toml, unless EXTRAS names another)
OPTIONAL_PACKAGES = {"torch": "torch", "transformers": "transformers", "accelerate": "accelerate", "peft": "peft",
                     "bitsandbytes": "bitsandbytes", "pynvml": "nvidia-ml-py", "pandas": "pandas", "numpy": "numpy",
                     "yaml": "pyyaml", "tqdm": "tqdm", "matplotlib": "matplotlib", "submitit": "submitit", "ray": "ray"}
EXTRAS = {"submitit": "slurm", "ray": "ray"}  # `vramlab run --launcher slurm|ray`: extras of their own


def install_hint(extra="harness"):
    """How to add an extra: to the checkout (an editable install), or by name where vramlab is an installed wheel."""
    import os

    from ..paths import ROOT

    if os.path.isfile(os.path.join(ROOT, "pyproject.toml")):
        return f"pip install -e '.[{extra}]'"
    return f"pip install 'vramlab[{extra}]'"


def _targets(text):
    return tuple(t.strip() for t in text.split(",") if t.strip())


class DefaultDtype(str):
    """--dtype when the flag was left out: bf16 for transformers; an inference engine loads its own default
    (llama.cpp / Ollama: Q4_K_M) and tells the two apart by this type."""


def add_spec_arguments(p):
    """The workload flags of predict, trace and plan. Names are kept stable for scripts."""
    p.add_argument("--model", required=True, help="catalog name (e.g. Llama-3.1-8B), config.json path, model dir, or Hub id "
                        "org/name[@revision] (from the Hugging Face cache, else the Hub: config.json only)")
    p.add_argument("--mode", default="inference", help="inference | train")
    p.add_argument("--dtype", default=DefaultDtype("bf16"),
                   help="fp32 | bf16 | fp16 | fp8 | int8 | nf4 | fp4 | gptq-int4 | awq-int4 | q8_0 | q6_k | q5_k_m | "
                        "q4_k_m | q4_0 | q3_k_m | q2_k (with --method qlora: the compute dtype)")
    p.add_argument("--compute-dtype", default="bf16", help="compute dtype of quantized models (bf16 | fp16 | fp32)")
    p.add_argument("--batch", type=int, default=None,
                   help="concurrent sequences (inference) or micro-batch (training); default 1")
    p.add_argument("--users", type=int, default=None, help="alias of --batch for inference: concurrent users")
    p.add_argument("--seq", type=int, default=2048, help="prompt / sequence length in tokens")
    p.add_argument("--gen", type=int, default=0, help="tokens generated after the prompt (decode steps)")
    p.add_argument("--method", default="full", help="full | freeze | lora | qlora")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank r (default 16, or the recipe's)")
    p.add_argument("--lora-targets", type=_targets, default=None,
                   help="comma list of module names, or all-linear (default: the recipe's, else peft's choice for "
                        "the model type)")
    p.add_argument("--lora-dtype", default="auto",
                   help="adapter dtype: auto (as the stack's peft: fp32 from 0.12, the base layer's float dtype before) "
                        "| fp32 | bf16 | fp16")
    p.add_argument("--trainable-layers", type=int, default=2, help="--method freeze: last N layers train")
    p.add_argument("--optimizer", default="adamw",
                   help="adamw | adamw8bit | paged_adamw8bit | sgd | sgd_momentum | lion | adafactor")
    p.add_argument("--optimizer-impl", default="auto", help="auto | foreach | fused | forloop (AdamW)")
    p.add_argument("--precision", default="auto", help="auto | pure | amp | master (training)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing (default: off, or on where the recipe turns it on: trl ≥ 1.0, unsloth, "
                        "axolotl)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--attn", default="auto", help="auto (sdpa where the model supports it, else eager) | sdpa | eager")
    p.add_argument("--kv-dtype", default="", help="KV cache dtype (default: compute dtype)")
    p.add_argument("--mla-cache", default="auto",
                   help="MLA models: auto (as the stack's transformers) | compressed latent (transformers 5, vLLM, "
                        "SGLang) | expanded per-head K/V")
    p.add_argument("--logits", default="last", help="inference: last (generate) | all positions")
    p.add_argument("--no-double-quant", action="store_true", help="bitsandbytes 4-bit without double quantization")
    p.add_argument("--group-size", type=int, default=128, help="GPTQ/AWQ group size")
    p.add_argument("--gptq-kernel", default="exllama",
                   help="GPTQ kernel: exllama (v1, transformers' default) | exllamav2 (AutoGPTQ's fixed scratch buffer) | other")
    p.add_argument("--no-dropout", action="store_true", help="train without dropout masks")
    p.add_argument("--kbit-prep", action=argparse.BooleanOptionalAction, default=None,
                   help="QLoRA and LoRA over int8: peft's prepare_model_for_kbit_training, which casts the unquantized "
                        "weights (embeddings, norms, lm_head) to fp32 (default, as PEFT's QLoRA recipe and axolotl; "
                        "--recipe trl (≥ 0.26) and unsloth skip it)")
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs the workload is spread over (with --zero, --tp, --pp or --layer-split); figures are per GPU")
    p.add_argument("--zero", type=int, default=0, help="ZeRO stage 0-3 (3 = FSDP full shard)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    p.add_argument("--layer-split", action="store_true", help='split layers over --gpus like device_map="auto"')
    p.add_argument("--offload", default="none",
                   help="none | optimizer (ZeRO-Offload) | params (streamed from the CPU; with --zero 2/3 FSDP's CPU "
                        "offload: parameters, gradients and the optimizer step on the CPU)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel degree: each sequence split over cp GPUs (training)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree: MoE experts split over ep data-parallel GPUs")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="with --tp: Megatron-LM / torchtitan tensor parallelism (norm inputs split along the sequence, "
                        "vocabulary-parallel loss)")
    p.add_argument("--shard-gpus", type=int, default=0,
                   help="with --zero: shard over groups of this many data-parallel GPUs, replicate across them "
                        "(hybrid sharding, FSDP HYBRID_SHARD; default: over all)")
    p.add_argument("--grad-ckpt-every", type=int, default=1,
                   help="with --grad-ckpt: checkpoint every k-th layer (torchtitan's selective layer AC; default 1: all)")
    add_recipe_arguments(p)
    add_stack_arguments(p)


def add_recipe_arguments(p):
    """--recipe, --recipe-version, --loss, --grad-ckpt-mode (formulas/recipes.py)."""
    g = p.add_argument_group("fine-tuning recipe", "how the training step is run: vramlab's own loop (hf) or a recipe's "
                             "loss, checkpointing, kernels and defaults (docs/formulas.md, 'Recipes')")
    g.add_argument("--recipe", default="hf", help="hf | trl | unsloth | liger | axolotl (default hf)")
    g.add_argument("--recipe-version", default="", metavar="VERSION",
                   help="the recipe package's version (trl, unsloth, liger-kernel, axolotl); default the newest modelled")
    g.add_argument("--loss", default="auto", help="auto (the recipe's) | full | chunked (TRL) | fused (Liger; Unsloth's "
                                                   "under --recipe unsloth) | cut (Cut Cross-Entropy)")
    g.add_argument("--grad-ckpt-mode", default="auto",
                   help="with --grad-ckpt: auto (the recipe's) | full | offload (Unsloth's, to host RAM) | selective "
                        "(axolotl's: attention outputs saved)")


def add_stack_arguments(p):
    """--transformers, --peft, --torch, --bitsandbytes VERSION (predict, trace, plan, stack)."""
    g = p.add_argument_group("software stack", "library versions whose behaviour the prediction follows (the table: "
                             "`vramlab stack`); default: what is installed, else the newest modelled")
    for package in STACK_PACKAGES:
        g.add_argument(f"--{package}", default=None, metavar="VERSION", help=f"{package} version, e.g. {STACK_NEWEST[package]}")


def check_version_flags(a):
    """Every `--…-version` flag given (the engines' releases) read by the one version parser: 'abc', '5.x' or '' is
    one line naming the flag, before the engine's own range check."""
    from formulas.spec import SpecError
    from formulas.versions import parse_version

    for name, value in sorted(vars(a).items()):
        if name == "recipe_version" and value == "":
            continue  # --recipe-version's default: the recipe's newest modelled release (formulas/recipes.py)
        if name.endswith("_version") and value is not None:
            try:
                parse_version(value)
            except ValueError:
                flag = "--" + name.replace("_", "-")
                raise SpecError(f"{flag} {value!r}: not a version; give a release like 0.6.6") from None


def stack_from_args(a):
    """The formulas.stack.Stack the flags ask for, over what is installed."""
    from formulas.stack import make_stack

    asked = {p: getattr(a, p, None) for p in STACK_PACKAGES}
    return make_stack(asked, installed_versions())


def spec_from_args(a, resolve=True):
    """Build a Spec from parsed flags; resolve: a Hub id's config.json from the cache or the Hub (harness/hub.py)."""
    from formulas.spec import MAX_BATCH, Spec, SpecError

    if a.users is not None and a.batch is not None and a.users != a.batch:
        raise SpecError(f"--users {a.users}: --users is --batch under another name; give one (--batch {a.batch} too)")
    if a.users is not None and not 1 <= a.users <= MAX_BATCH:  # checked here, or validate would name --batch
        raise SpecError(f"--users {a.users:,}: must be an integer from 1 to {MAX_BATCH:,} (concurrent users)")
    batch = a.users if a.users is not None else (a.batch if a.batch is not None else 1)
    from ..hub import resolve_model
    from ..inventory import ensure_for_model

    from formulas.recipes import flag_defaults

    recipe = getattr(a, "recipe", "hf")
    given = {"grad_ckpt": a.grad_ckpt, "kbit_prep": a.kbit_prep, "lora_targets": a.lora_targets, "lora_rank": a.lora_rank}
    try:
        implied = flag_defaults(recipe, getattr(a, "recipe_version", ""))
    except (KeyError, ValueError):
        implied = {}  # an unknown recipe or version: validate() names the flag
    base = {"grad_ckpt": False, "kbit_prep": True, "lora_targets": (), "lora_rank": 16}
    flags = {k: v if v is not None else implied.get(k, base[k]) for k, v in given.items()}
    model = a.model
    if resolve:
        model = resolve_model(a.model)
        ensure_for_model(model)  # a model type outside the hand-modelled families: its inventory, built once
    return Spec(
        model=model, mode=a.mode, dtype=a.dtype.lower(), batch=batch, seq=a.seq, gen=a.gen, method=a.method,
        compute_dtype=a.compute_dtype, lora_rank=flags["lora_rank"], lora_targets=flags["lora_targets"],
        lora_dtype=a.lora_dtype, trainable_layers=a.trainable_layers, optimizer=a.optimizer,
        optimizer_impl=a.optimizer_impl, precision=a.precision, grad_ckpt=flags["grad_ckpt"], attn=a.attn,
        grad_accum=a.grad_accum, kv_dtype=a.kv_dtype,
        mla_cache=a.mla_cache, logits=a.logits, double_quant=not a.no_double_quant, group_size=a.group_size,
        gptq_kernel=a.gptq_kernel,
        dropout=not a.no_dropout, gpus=a.gpus, zero=a.zero, tp=a.tp, pp=a.pp, layer_split=a.layer_split,
        offload=a.offload, cp=a.cp, ep=a.ep, sequence_parallel=a.sequence_parallel, ckpt_every=a.grad_ckpt_every,
        shard_gpus=a.shard_gpus,
        kbit_prep=flags["kbit_prep"], stack=stack_from_args(a).versions,
        recipe=recipe, recipe_version=getattr(a, "recipe_version", ""), loss=getattr(a, "loss", "auto"),
        grad_ckpt_mode=getattr(a, "grad_ckpt_mode", "auto"),
    )


def warn_beyond_positions(command, spec):
    """A legal but suspicious request: more tokens than the model was trained on. One line on stderr."""
    from formulas.catalog import get_shape

    shape = get_shape(spec.model)
    tokens = spec.seq + (spec.gen if spec.mode == "inference" else 0)
    if shape.max_positions and tokens > shape.max_positions:
        print(f"vramlab {command}: warning: {tokens:,} tokens is more than the {shape.max_positions:,} positions "
              f"{shape.name} was configured for", file=sys.stderr)


def flag_value(parse, flag, text, *args):
    """parse(text) with a ValueError turned into a SpecError naming the flag and the value."""
    from formulas.spec import SpecError

    try:
        return parse(text, *args)
    except ValueError as e:
        raise SpecError(f"{flag} {text}: {e}") from None


def gib_cell(n, width=10):
    """A right-aligned GiB table cell ('<0.01' for a positive amount too small to show)."""
    return f"{fmt_gib(n, suffix=''):>{width}}"


def calibration_line(calibrated, source):
    """'calibrated: …' or 'uncalibrated: device overheads are …', as every answer ends."""
    return f"calibrated: {source}" if calibrated else f"uncalibrated: device overheads are {source}"


def load_records_for(command, path, empty_ok=False):
    """Records under `path` for a command: unreadable files are named on stderr and skipped.

    None (after saying so) when there are none, unless empty_ok (the caller explains instead)."""
    import os

    from ..records import iter_records

    if not os.path.exists(path):
        print(f"vramlab {command}: {path}: no such file or folder", file=sys.stderr)
        return None
    bad = []
    recs = list(iter_records(path, on_error=lambda p, e: bad.append(str(e))))
    for b in bad:
        print(f"vramlab {command}: skipped {b}", file=sys.stderr)
    if not recs and not empty_ok:
        print(f"vramlab {command}: no records under {path}", file=sys.stderr)
        return None
    return recs


def run_command(command, func, args):
    """Run one command; bad input is one line and exit status 2, a missing package names what to install."""
    try:
        return func(args)
    except ValueError as e:  # SpecError, UnknownModelError, SweepError, RecordError, CalibrationError, … are ValueErrors
        print(f"vramlab {command}: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in OPTIONAL_PACKAGES:
            raise
        hint = install_hint(EXTRAS.get(top, "harness"))
        print(f"vramlab {command}: needs {OPTIONAL_PACKAGES[top]}, which is not installed: {hint}", file=sys.stderr)
        return 2

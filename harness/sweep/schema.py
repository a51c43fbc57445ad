"""Experiment sweeps: YAML schema, validation, expansion, and a stable hash per experiment.

A sweep file (`experiments/*.yaml`) has a base spec and sweep axes:

    name: smoke
    description: a few tiny experiments
    defaults:                 # any formulas.spec.Spec field, plus the run fields below
      model: Qwen/Qwen2.5-0.5B
      seq: 256
    groups:                   # each group: overrides (`set`), a cartesian `grid`, and/or `zip`ped lists
      - set: {mode: inference}
        grid: {dtype: [bf16, nf4], batch: [1, 4]}
      - set: {mode: train, method: lora}
        zip: {seq: [256, 1024], batch: [4, 1]}

Without `groups`, top-level `grid`/`zip` form the single group. An optional top-level `launcher:`
block holds settings of `vramlab run --launcher slurm|ray` (`{slurm: {partition: gpu, time_min: 60,
gpus_per_task: 1}, ray: {address: auto}}`); they change how experiments run, never their hashes.
A multi-GPU experiment gives `gpus: N` and `strategy: ddp | fsdp | tp | layer_split`, sugar over the
spec's zero/tp/layer_split fields (see STRATEGIES).

A group with `search: {axis: batch | seq, lo: L, hi: H, step: S}` is a boundary search instead of a
grid: the largest value of the axis on the grid L, L+S, … ≤ H that runs without running out of memory,
found by probing on the card (harness/sweep/search.py), one experiment and one record per probe, an OOM
kept as data. It is meant with `cap_gpu` (the fit boundary of a smaller card); its other fields come
from `set` and `grid` (one search per grid row). `expand_sweep` returns the grid experiments as a list
whose `searches` attribute holds the searches.

`alloc_conf` runs the experiment's worker with PYTORCH_CUDA_ALLOC_CONF set to it (e.g.
`expandable_segments:True`); it is part of the hash, and records say it in `env.alloc_conf`.
Every expanded experiment is validated (the Spec against its model, the run fields by type) before
anything runs; an error names the file, where in it, the field, the value and what is allowed. An
experiment's hash is stable: it depends only on its resolved fields, not on file order or formatting.
"""

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, fields
from itertools import product

from formulas.catalog import UnknownModelError, get_shape
from formulas.shapes import UnsupportedModelError
from formulas.spec import Spec, SpecError, check_positions, validate
from formulas.stack import StackError, stack_pairs

from ..inventory import ensure_for_model

# Run fields: how the experiment is run, not what is predicted: (type, default, hashed, meaning).
# A hashed field changes what is measured, so it is part of the experiment's hash; the others
# (how long to wait, how often to sample, whether to count categories) do not.
RUN_FIELDS = {
    "steps": (int, 2, True, "training steps (the first allocates the optimizer state)"),
    "real_model_dir": (str, "", True, "load real weights from this local directory instead of a shape-matched model"),
    "cap_gpu": (str, "", True, "cap the process to this card's memory (a GPU from the hardware catalog, e.g. RTX 4090)"),
    "cap_bytes": (int, 0, True, "cap the process to this many bytes of device memory"),
    "timeout_s": (int, 600, False, "seconds before the experiment's process is killed"),
    "sample_interval_ms": (float, 1.0, False, "NVML sampling interval where memory moves"),
    "sample_max_interval_ms": (float, 50.0, False, "NVML sampling interval on plateaus (harness/gpu/sampler.py)"),
    "track_categories": (bool, True, False, "count the measured tensors by memory category (the tracer's tracker)"),
    "track_window": (str, "last", False, "which steps the tracker counts op by op: last (the load, prefill, last two "
                                         "decode steps, last optimizer step) or all"),
    # inference engines (harness/engines): an experiment with `engine` set loads a random-weight GGUF in the engine
    # on the CPU and records the buffers it logs under the record's `engine` object
    "engine": (str, "", True, "inference engine: llama.cpp (measured on the CPU), or '' for transformers"),
    "ctx": (int, 0, True, "engine context cells (llama.cpp -c; 0 = the spec's seq)"),
    "parallel": (int, 1, True, "engine parallel sequences (llama.cpp -np)"),
    "ubatch": (int, 512, True, "engine micro-batch (llama.cpp -ub)"),
    "flash_attn": (bool, False, True, "engine flash attention (llama.cpp -fa)"),
    "engine_kv_dtype": (str, "f16", True, "engine KV cache type: f16, q8_0, q4_0 (llama.cpp -ctk/-ctv)"),
    "cut_layers": (int, 0, True, "engine experiments: keep only the first N decoder layers (0 = all)"),
    # the CUDA caching allocator's settings for the worker process: PYTORCH_CUDA_ALLOC_CONF, '' = torch's defaults
    "alloc_conf": (str, "", True, "PYTORCH_CUDA_ALLOC_CONF of the worker, e.g. expandable_segments:True ('' = default)"),
}
RUN_MINIMUMS = {"steps": 1, "timeout_s": 1, "sample_interval_ms": 0.01, "sample_max_interval_ms": 0.01, "cap_bytes": 0,
                "ctx": 0, "parallel": 1, "ubatch": 1, "cut_layers": 0}
# Upper bounds: a week per experiment, a sample a minute, and what a record's integers hold (harness.records).
RUN_MAXIMUMS = {"steps": 1_000_000, "timeout_s": 7 * 24 * 3600, "sample_interval_ms": 60_000.0,
                "sample_max_interval_ms": 60_000.0, "cap_bytes": 2**60, "ctx": 1 << 26, "parallel": 1 << 20,
                "ubatch": 1 << 26, "cut_layers": 1 << 20}
RUN_CHOICES = {"engine": ("", "llama.cpp"), "engine_kv_dtype": ("f16", "q8_0", "q4_0"), "track_window": ("last", "all")}
# `strategy:` is sugar over the Spec's parallel fields (resolved before hashing, so it names nothing new):
# ddp → zero 0 (or the zero 1 given), fsdp → zero 3 (or the zero 2 given), tp → tp = gpus (or the tp given),
# layer_split → layer_split true.
STRATEGIES = ("ddp", "fsdp", "tp", "layer_split")
SPEC_FIELDS = {f.name: f for f in fields(Spec)}
MAX_EXPERIMENTS = 10_000  # a bigger sweep needs `vramlab run --yes` (each experiment costs seconds to minutes)
HARD_MAX_EXPERIMENTS = 1_000_000  # refused even with --yes (counted before expanding): years of GPU time
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a sweep's name is a folder name under results/runs
TOP_KEYS = {"name", "description", "defaults", "groups", "grid", "zip", "launcher"}
GROUP_KEYS = {"name", "set", "grid", "zip", "search"}
SEARCH_KEYS = {"axis": str, "lo": int, "hi": int, "step": int}
SEARCH_AXES = ("batch", "seq")
# PYTORCH_CUDA_ALLOC_CONF's syntax, `<option>:<value>,<option2>:<value2>` (PyTorch docs/source/notes/cuda.rst,
# "Optimizing memory usage with PYTORCH_CUDA_ALLOC_CONF"); the options themselves change between torch versions and
# torch refuses an unknown one when the worker starts, so only the syntax is checked here.
_ALLOC_OPTION = r"[a-z_0-9]+:(\[[^\]\s]*\]|[^,:\s\[\]]+)"  # a value, or a bracketed list (roundup_power2_divisions)
ALLOC_CONF = re.compile(f"{_ALLOC_OPTION}(,{_ALLOC_OPTION})*")
# The optional `launcher:` block: settings of `vramlab run --launcher slurm|ray` (its flags win over them);
# (type, minimum) per key.
LAUNCHER_KEYS = {"slurm": {"partition": (str, None), "time_min": (int, 1), "gpus_per_task": (int, 0)},
                 "ray": {"address": (str, None)}}


class SweepError(ValueError):
    """A sweep file that cannot run; the message names file, place, field, value and what is allowed."""


@dataclass(frozen=True)
class Experiment:
    """One experiment: what to predict and measure, and how to run it."""

    spec: Spec  # validated, 'auto' fields resolved
    steps: int = 2
    real_model_dir: str = ""
    cap_gpu: str = ""  # the catalog's name of the card this run stands in for ("" = no cap)
    cap_bytes: int = 0
    timeout_s: int = 600
    sample_interval_ms: float = 1.0
    sample_max_interval_ms: float = 50.0
    track_categories: bool = True
    track_window: str = "last"
    engine: str = ""  # inference engine measured on the CPU ("" = transformers)
    ctx: int = 0
    parallel: int = 1
    ubatch: int = 512
    flash_attn: bool = False
    engine_kv_dtype: str = "f16"
    cut_layers: int = 0
    alloc_conf: str = ""  # PYTORCH_CUDA_ALLOC_CONF of the worker process ('' = torch's defaults)
    group: str = ""  # the group it came from, for display
    search: tuple = ()  # a boundary search's probe: (axis, lo, hi, step); not part of the hash

    @property
    def spec_hash(self):
        """Stable 12-hex-digit hash of the resolved spec and run fields."""
        return spec_hash(self.spec, self.run_fields())

    def run_fields(self):
        return {k: getattr(self, k) for k in RUN_FIELDS}

    def to_dict(self):
        d = {"spec": self.spec.to_dict(), **self.run_fields(), "group": self.group, "spec_hash": self.spec_hash}
        if self.search:
            d["search"] = dict(zip(SEARCH_KEYS, self.search))
        return d

    @classmethod
    def from_dict(cls, d):
        spec = dict(d["spec"])
        spec["lora_targets"] = tuple(spec.get("lora_targets", ()))
        search = tuple((d.get("search") or {}).get(k) for k in SEARCH_KEYS) if d.get("search") else ()
        return cls(spec=Spec(**spec), group=d.get("group", ""), search=search,
                   **{k: d[k] for k in RUN_FIELDS if k in d})

    def label(self):
        """One line describing the experiment."""
        s = self.spec
        core = f"{s.model} {s.mode} {s.dtype} b{s.batch} s{s.seq}"
        if s.mode == "inference":
            core += f" g{s.gen}"
        else:
            core += f" {s.method} {s.optimizer} {s.precision}" + (" ckpt" if s.grad_ckpt else "")
        core += "" if s.attn == "sdpa" else f" {s.attn}"
        core += f" recipe {s.recipe}" if s.recipe != "hf" else ""
        core += f" [{self.alloc_conf}]" if self.alloc_conf else ""
        return core + (f" {s.gpus}gpu {parallel_label(s)}" if s.gpus > 1 else "")


class Experiments(list):
    """A sweep's grid experiments in file order; `searches`: its boundary searches (harness.sweep.search)."""

    def __init__(self, items=(), searches=()):
        super().__init__(items)
        self.searches = list(searches)


def parallel_label(spec):
    """How a multi-GPU spec splits the work, in the words of a sweep's `strategy:`."""
    if spec.layer_split:
        return "layer_split"
    parts = [f"tp{spec.tp}"] if spec.tp > 1 else []
    if spec.pp > 1:
        parts.append(f"pp{spec.pp}")
    if spec.gpus // (spec.tp * spec.pp) > 1:  # data parallel over the rest
        parts.append("replicas" if spec.mode == "inference" else
                     {0: "ddp", 1: "ddp-zero1", 2: "fsdp-zero2", 3: "fsdp"}[spec.zero])
    return "+".join(parts)


def spec_hash(spec, run_fields):
    """sha256 over canonical JSON of what the experiment is, first 12 hex digits.

    The spec's fields and the hashed run fields go in, each only where it differs from its
    default, so a field added later with a default keeps every existing hash. The record schema
    (harness.records) is not part of it either."""
    spec_d = {f.name: v for f, v in ((f, getattr(spec, f.name)) for f in fields(Spec)) if v != f.default}
    if "lora_targets" in spec_d:
        spec_d["lora_targets"] = list(spec_d["lora_targets"])
    run = {k: v for k, v in run_fields.items() if RUN_FIELDS[k][2] and v != RUN_FIELDS[k][1]}
    payload = {"spec": spec_d, "run": run}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _coerce(path, where, key, value):
    """Check one field's type; lists become tuples for lora_targets."""
    if key in RUN_FIELDS:
        typ, _, _, meaning = RUN_FIELDS[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
            raise SweepError(f"{path}: {where}: {key}: {value!r} is not a {typ.__name__} ({meaning})")
        if key == "cap_gpu" and value:
            from formulas.hardware import UnknownGPUError, get_hardware

            try:
                value = get_hardware(value).name
            except UnknownGPUError as e:
                raise SweepError(f"{path}: {where}: cap_gpu: {str(e).replace('--gpu ', '', 1)}") from None
        minimum, maximum = RUN_MINIMUMS.get(key), RUN_MAXIMUMS.get(key)
        if minimum is not None and not value >= minimum:  # `not >=`: NaN fails too
            raise SweepError(f"{path}: {where}: {key}: {value!r} must be ≥ {minimum}")
        if maximum is not None and not value <= maximum:  # .inf too
            raise SweepError(f"{path}: {where}: {key}: {value!r} must be at most {maximum:,}")
        if key == "real_model_dir" and value and not os.path.isfile(os.path.join(value, "config.json")):
            why = "no such folder" if not os.path.isdir(value) else "a folder without config.json"
            raise SweepError(f"{path}: {where}: real_model_dir: {value!r}: {why} (give a local model folder with "
                             "config.json and its weights)")
        if key == "engine" and value in ("ollama", "vllm", "sglang"):
            raise SweepError(f"{path}: {where}: engine: {value!r}: measured {value} sweeps need a GPU and the engine "
                             "itself and are not built; `vramlab predict/plan --engine` predicts it, `engine: "
                             "llama.cpp` measures llama.cpp on the CPU")
        if key == "alloc_conf" and value and not ALLOC_CONF.fullmatch(value):
            raise SweepError(f"{path}: {where}: alloc_conf: {value!r} is not PYTORCH_CUDA_ALLOC_CONF's "
                             "<option>:<value>[,<option>:<value>…], e.g. expandable_segments:True")
        if key in RUN_CHOICES and value not in RUN_CHOICES[key]:
            raise SweepError(f"{path}: {where}: {key}: {value!r} is not one of {', '.join(map(repr, RUN_CHOICES[key]))}")
        return value
    if key == "strategy":
        if value not in STRATEGIES:
            raise SweepError(f"{path}: {where}: strategy: {value!r} is not one of {', '.join(STRATEGIES)}")
        return value
    if key not in SPEC_FIELDS:
        allowed = ", ".join(sorted(set(SPEC_FIELDS) | set(RUN_FIELDS) | {"strategy"}))
        raise SweepError(f"{path}: {where}: unknown field {key!r}; allowed: {allowed}")
    if key == "stack":
        try:
            return stack_pairs(value, f"{where}: stack")
        except StackError as e:
            raise SweepError(f"{path}: {e}") from None
    if key == "lora_targets":
        if isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = tuple(value)
        else:
            raise SweepError(f"{path}: {where}: lora_targets: {value!r} must be a list of module names "
                             "(or a comma-separated string), e.g. [q_proj, v_proj] or all-linear")
        return value
    default = SPEC_FIELDS[key].default
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SweepError(f"{path}: {where}: {key}: {value!r} must be true or false")
    elif isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise SweepError(f"{path}: {where}: {key}: {value!r} must be an integer")
    elif isinstance(default, str) or key == "model":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise SweepError(f"{path}: {where}: {key}: {value!r} must be a string")
    return value


def _axes(path, where, kind, block):
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise SweepError(f"{path}: {where}.{kind}: must be a mapping of field → list of values")
    out = {}
    for k, v in block.items():
        if not isinstance(v, list) or not v:
            raise SweepError(f"{path}: {where}.{kind}.{k}: must be a non-empty list, got {v!r}")
        out[k] = [_coerce(path, f"{where}.{kind}", k, x) for x in v]
    if kind == "zip":
        lengths = {k: len(v) for k, v in out.items()}
        if len(set(lengths.values())) > 1:
            raise SweepError(f"{path}: {where}.zip: lists must have equal lengths, got {lengths}")
    return out


def _rows(grid, zipped):
    grid_keys = list(grid)
    grid_rows = [dict(zip(grid_keys, vals)) for vals in product(*(grid[k] for k in grid_keys))] or [{}]
    if zipped:
        n = len(next(iter(zipped.values())))
        zip_rows = [{k: zipped[k][i] for k in zipped} for i in range(n)]
    else:
        zip_rows = [{}]
    return [{**g, **z} for g in grid_rows for z in zip_rows]


def _check_keys(path, where, d, allowed):
    extra = set(d) - allowed
    if extra:
        raise SweepError(f"{path}: {where}: unknown key(s) {', '.join(sorted(extra))}; allowed: {', '.join(sorted(allowed))}")


def _count(path, groups):
    """How many experiments the groups expand to, before expanding them."""
    n = 0
    for g in groups:
        if isinstance(g, dict):
            grid = g.get("grid") if isinstance(g.get("grid"), dict) else {}
            zipped = g.get("zip") if isinstance(g.get("zip"), dict) else {}
            sizes = [len(v) for v in grid.values() if isinstance(v, list)]
            z = max((len(v) for v in zipped.values() if isinstance(v, list)), default=1)
            n += math.prod(sizes) * z
    return n


def expand_sweep(doc, path="<sweep>", limit=MAX_EXPERIMENTS):
    """Expand a parsed sweep document into validated Experiments, in file order, without duplicates.

    More than `limit` experiments is a SweepError (None: no limit), decided before anything is expanded."""
    if not isinstance(doc, dict):
        raise SweepError(f"{path}: the top level must be a mapping with 'defaults' and 'groups' (or 'grid'/'zip')")
    _check_keys(path, "top level", doc, TOP_KEYS)
    launcher_settings(doc, path)
    if doc.get("name") is not None and not (isinstance(doc["name"], str) and NAME.fullmatch(doc["name"])):
        raise SweepError(f"{path}: name: {doc['name']!r} must be a plain name (letters, digits, . _ -), "
                         "the folder its records go to under results/runs")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise SweepError(f"{path}: defaults: must be a mapping of field → value")
    base = {k: _coerce(path, "defaults", k, v) for k, v in defaults.items()}
    groups = doc.get("groups")
    if groups is None:
        groups = [{"grid": doc.get("grid"), "zip": doc.get("zip")}]
    elif doc.get("grid") or doc.get("zip"):
        raise SweepError(f"{path}: top level: give axes inside 'groups', or top-level 'grid'/'zip', not both")
    if not isinstance(groups, list) or not groups:
        raise SweepError(f"{path}: groups: must be a non-empty list")
    n = _count(path, groups)
    if n > HARD_MAX_EXPERIMENTS:
        raise SweepError(f"{path}: {n:,} experiments; at most {HARD_MAX_EXPERIMENTS:,} run in one sweep, even with "
                         "--yes (split it, or shorten the axes)")
    if limit is not None and n > limit:
        raise SweepError(f"{path}: {n:,} experiments; more than {limit:,} needs `vramlab run --yes`")
    out, seen, searches = Experiments(), set(), []
    for gi, g in enumerate(groups):
        where = f"groups[{gi}]"
        if not isinstance(g, dict):
            raise SweepError(f"{path}: {where}: must be a mapping with set/grid/zip")
        _check_keys(path, where, g, GROUP_KEYS)
        gname = str(g.get("name", gi))
        sets = g.get("set") or {}
        if not isinstance(sets, dict):
            raise SweepError(f"{path}: {where}.set: must be a mapping of field → value")
        overrides = {k: _coerce(path, f"{where}.set", k, v) for k, v in sets.items()}
        search = _search_block(path, where, g)
        for ri, row in enumerate(_rows(_axes(path, where, "grid", g.get("grid")), _axes(path, where, "zip", g.get("zip")))):
            fields_ = {**base, **overrides, **row}
            run = {k: fields_.pop(k) for k in list(fields_) if k in RUN_FIELDS}
            fields_ = apply_strategy(path, f"{where} experiment {ri}", fields_)
            if "model" not in fields_:
                raise SweepError(f"{path}: {where}: experiment {ri}: no model given (set it in defaults, set or an axis)")
            if search:
                searches.append(_make_search(path, f"{where} experiment {ri}", fields_, run, gname, search))
                continue
            exp = _make(path, f"{where} experiment {ri}", fields_, run, gname)
            if exp.spec_hash not in seen:
                seen.add(exp.spec_hash)
                out.append(exp)
    out.searches = searches
    return out


def _search_block(path, where, g):
    """A group's validated `search:` block as (axis, lo, hi, step), or None."""
    block = g.get("search")
    if block is None:
        return None
    if not isinstance(block, dict):
        raise SweepError(f"{path}: {where}.search: must be a mapping {{axis: batch|seq, lo: L, hi: H, step: S}}")
    _check_keys(path, f"{where}.search", block, set(SEARCH_KEYS))
    missing = [k for k in SEARCH_KEYS if k not in block]
    if missing:
        raise SweepError(f"{path}: {where}.search: missing {', '.join(missing)} (give axis, lo, hi and step)")
    axis, lo, hi, step = (block[k] for k in SEARCH_KEYS)
    if axis not in SEARCH_AXES:
        raise SweepError(f"{path}: {where}.search.axis: {axis!r} is not one of {', '.join(SEARCH_AXES)}")
    for k in ("lo", "hi", "step"):
        if not isinstance(block[k], int) or isinstance(block[k], bool) or block[k] < 1:
            raise SweepError(f"{path}: {where}.search.{k}: {block[k]!r} must be a whole number ≥ 1")
    if hi <= lo:
        raise SweepError(f"{path}: {where}.search: hi {hi} must be above lo {lo}")
    if axis in (g.get("grid") or {}) or axis in (g.get("zip") or {}):
        raise SweepError(f"{path}: {where}.search: the axis {axis} is searched; it cannot also be a grid or zip axis")
    return axis, lo, hi, step


def _make_search(path, where, fields_, run, group, search):
    """A BoundarySearch over `search` = (axis, lo, hi, step): both ends validated now, so every probe between is."""
    from .search import BoundarySearch

    axis, lo, hi, step = search
    hi = lo + (hi - lo) // step * step  # the grid's last value
    ends = [_make(path, f"{where} ({axis} {v})", {**fields_, axis: v}, run, group) for v in (lo, hi)]
    return BoundarySearch(base=ends[0], axis=axis, lo=lo, hi=hi, step=step, group=group)


def launcher_settings(doc, path="<sweep>"):
    """The sweep's validated `launcher:` block, e.g. {"slurm": {"partition": "gpu"}} ({} without one)."""
    block = doc.get("launcher") if isinstance(doc, dict) else None
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise SweepError(f"{path}: launcher: must be a mapping with slurm and/or ray settings")
    _check_keys(path, "launcher", block, set(LAUNCHER_KEYS))
    out = {}
    for name, settings in block.items():
        settings = settings or {}
        if not isinstance(settings, dict):
            raise SweepError(f"{path}: launcher.{name}: must be a mapping of setting → value")
        _check_keys(path, f"launcher.{name}", settings, set(LAUNCHER_KEYS[name]))
        for key, value in settings.items():
            typ, minimum = LAUNCHER_KEYS[name][key]
            if not isinstance(value, typ) or isinstance(value, bool) or (typ is str and not value.strip()):
                raise SweepError(f"{path}: launcher.{name}.{key}: {value!r} must be a "
                                 + ("non-empty string" if typ is str else "whole number"))
            if minimum is not None and value < minimum:
                raise SweepError(f"{path}: launcher.{name}.{key}: {value!r} must be ≥ {minimum}")
        out[name] = dict(settings)
    return out


def apply_strategy(path, where, fields_):
    """The spec fields with `strategy:` resolved into gpus/zero/tp/layer_split; a contradiction is one SweepError."""
    fields_ = dict(fields_)
    strategy = fields_.pop("strategy", None)
    if strategy is None:
        return fields_
    gpus, zero, tp = fields_.get("gpus", 1), fields_.get("zero"), fields_.get("tp")

    def bad(why):
        raise SweepError(f"{path}: {where}: strategy {strategy}: {why}")

    if gpus < 2:
        bad(f"needs gpus ≥ 2 (gpus: {gpus})")
    if strategy != "tp" and tp not in (None, 1):
        bad(f"tp: {tp} is tensor parallelism (strategy: tp)")
    if strategy != "layer_split" and fields_.get("layer_split"):
        bad("layer_split: true is strategy: layer_split")
    if strategy == "ddp":
        if zero not in (None, 0, 1):
            bad(f"zero: {zero} shards parameters or gradients (strategy: fsdp); DDP takes zero 0, or 1 to shard the "
                "optimizer state")
        fields_.setdefault("zero", 0)
    elif strategy == "fsdp":
        if zero not in (None, 2, 3):
            bad(f"zero: {zero}; FSDP shards with zero 3 (the default) or 2 (zero 0/1 is strategy: ddp)")
        fields_.setdefault("zero", 3)
    elif strategy == "tp":
        if zero:
            bad(f"zero: {zero}; tensor parallelism runs with DDP over the other GPUs")
        fields_.setdefault("tp", gpus)
    else:
        if zero:
            bad(f"zero: {zero}; a layer split has no data parallelism")
        fields_["layer_split"] = True
    return fields_


def _make(path, where, spec_fields, run, group):
    from formulas.recipes import flag_defaults

    try:
        # a recipe's defaults (checkpointing on, its LoRA targets and rank, kbit prep) for the fields not written
        implied = flag_defaults(spec_fields.get("recipe", "hf"), spec_fields.get("recipe_version", ""))
    except ValueError:
        implied = {}  # a bad version: validate() says which
    spec_fields = {**implied, **spec_fields}
    try:
        spec = Spec(**spec_fields)
        ensure_for_model(spec.model)  # model types outside the hand-modelled families: inventory built once
        shape = get_shape(spec.model)
        spec = validate(spec, shape)
        check_positions(spec, shape)  # an experiment must run: no position past the model's learned table
    except (SpecError, UnknownModelError, UnsupportedModelError) as e:
        desc = ", ".join(f"{k}={v}" for k, v in spec_fields.items() if k in ("model", "mode", "dtype", "method", "batch", "seq"))
        msg = str(e).replace("--", "", 1) if str(e).startswith("--") else str(e)
        raise SweepError(f"{path}: {where} ({desc}): {msg}") from None
    return Experiment(spec=spec, group=group, **run)


def _load(path):
    """The sweep file's document (harness.sweep.documents: a regular file, UTF-8, no key twice, bounded aliases, size
    and nesting); SweepError naming the file."""
    from .documents import DocumentError, load_yaml

    if not os.path.exists(path):
        raise SweepError(f"{path}: no such sweep file")
    try:
        return load_yaml(path)
    except DocumentError as e:
        raise SweepError(str(e)) from None


def load_sweep(path, limit=MAX_EXPERIMENTS):
    """Read and expand a sweep YAML file; invalid YAML or content is a SweepError naming the file."""
    doc = _load(path)
    return sweep_name(path, doc), expand_sweep(doc, path, limit)


def load_launcher_settings(path):
    """The validated `launcher:` block of a sweep file that load_sweep has read without error."""
    return launcher_settings(_load(path), path)


def sweep_name(path, doc=None):
    """The sweep's name: its `name:` field, else the file's stem (a plain name either way)."""
    if isinstance(doc, dict) and doc.get("name"):
        return str(doc["name"])
    stem = os.path.splitext(os.path.basename(path))[0]
    if not NAME.fullmatch(stem):
        raise SweepError(f"{path}: the file name {stem!r} is not a plain name; give the sweep a `name:`")
    return stem

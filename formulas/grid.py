"""Evaluate many specs at once into a pandas DataFrame.

Specs that differ only in batch, seq and gen share everything but arithmetic, so they
are grouped and their numeric axes evaluated as numpy arrays through the same formula
code `predict` uses (the formulas use only + - * // and abs, which broadcast).
pandas and numpy are imported here only: the rest of `formulas` needs neither.
"""

from dataclasses import fields
from itertools import product

from . import categories as C
from .catalog import get_shape
from .overhead import DEFAULT_OVERHEADS
from .predict import (
    allocated_bytes, device_totals, host_ram_bytes, paged_bytes, per_gpu_phases, reserved_bytes, workload_static
)
from .spec import MAX_BATCH, MAX_TOKENS, Spec, SpecError, validate


def expand_grid(base=None, **axes):
    """Specs for the cartesian product of axes, e.g. expand_grid(model=[…], batch=[1, 8], seq=[512, 4096])."""
    base = dict(base or {})
    names = list(axes)
    return [Spec(**{**base, **dict(zip(names, values))}) for values in product(*(axes[n] for n in names))]


_NUMERIC = ("batch", "seq", "gen")


def _check_numeric(name, values, minimum, maximum):
    """Vectorised bounds check for one numeric axis; the error names the flag and the first bad value."""
    bad = values < minimum
    if bad.any():
        raise SpecError(f"--{name} {int(values[bad.argmax()])}: must be an integer ≥ {minimum}")
    bad = values > maximum
    if bad.any():
        raise SpecError(f"--{name} {int(values[bad.argmax()]):,}: must be at most {maximum:,}")


def predict_grid(specs, overheads=DEFAULT_OVERHEADS):
    """One row per spec: its fields, peak_allocated_bytes, peak_device_bytes, peak_phase and per-category bytes."""
    try:
        import numpy as np
        import pandas as pd
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"formulas.grid.predict_grid needs {e.name}, which is not installed: "
                                  "pip install -e '.[harness]'", name=e.name) from None

    specs = list(specs)
    names = [f.name for f in fields(Spec)]
    groups = {}  # the spec without batch/seq/gen → row indices
    for i, s in enumerate(specs):
        groups.setdefault(s.replace(batch=1, seq=1, gen=0), []).append(i)
    n = len(specs)
    alloc = np.zeros(n, dtype=np.int64)
    device = np.zeros(n, dtype=np.int64)
    phase = np.empty(n, dtype=object)
    host = np.zeros(n, dtype=np.int64)
    cats = {c: np.zeros(n, dtype=np.int64) for c in C.ALL_CATEGORIES}
    spec_cols = {name: np.empty(n, dtype=object) for name in names if name not in _NUMERIC}
    B_all = np.fromiter((s.batch for s in specs), dtype=np.int64, count=n)
    S_all = np.fromiter((s.seq for s in specs), dtype=np.int64, count=n)
    N_all = np.fromiter((s.gen for s in specs), dtype=np.int64, count=n)
    _check_numeric("batch", B_all, 1, MAX_BATCH)
    _check_numeric("seq", S_all, 1, MAX_TOKENS)
    _check_numeric("gen", N_all, 0, MAX_TOKENS)
    for key, idx in groups.items():
        st = workload_static(validate(key, get_shape(key.model)))
        idx = np.asarray(idx)
        B, S, N = B_all[idx], S_all[idx], N_all[idx]
        best = np.full(len(idx), -1, dtype=np.int64)
        best_phase = np.empty(len(idx), dtype=object)
        best_bd = {c: np.zeros(len(idx), dtype=np.int64) for c in C.ALLOCATED_CATEGORIES}
        best_res = np.zeros(len(idx), dtype=np.int64)
        for phases in per_gpu_phases(st, B, S, N, overheads):
            if key.mode == "inference":
                phases = {ph: bd for ph, bd in phases.items() if ph != "decode"} if not N.any() else phases
            res = np.zeros(len(idx), dtype=np.int64)  # this GPU's largest reservation
            arrs_by_phase = {}
            for ph, bd in phases.items():
                arrs = {c: np.broadcast_to(np.asarray(v, dtype=np.int64), B.shape) for c, v in bd.items()}
                if ph == "decode":  # specs without decode steps (gen 0) have no decode phase
                    arrs = {c: np.where(N > 0, v, 0) for c, v in arrs.items()}
                arrs_by_phase[ph] = arrs
                tot = allocated_bytes(st, arrs)
                r = np.asarray(reserved_bytes(st, ph, arrs, tot, overheads, B, S) + paged_bytes(st, arrs), dtype=np.int64)
                res = np.maximum(res, np.where(tot > 0, r, 0))
            for ph, arrs in arrs_by_phase.items():
                tot = allocated_bytes(st, arrs)
                better = tot > best
                best = np.where(better, tot, best)
                best_phase = np.where(better, ph, best_phase)
                best_res = np.where(better, res, best_res)
                for c in C.ALLOCATED_CATEGORIES:
                    best_bd[c] = np.where(better, arrs[c], best_bd[c])
        device_bd, device_total = device_totals(st, best_bd, best, best_res, overheads)
        alloc[idx] = best
        device[idx] = device_total
        host[idx] = np.broadcast_to(np.asarray(host_ram_bytes(st, B, S), dtype=np.int64), B.shape)
        phase[idx] = best_phase
        for c, v in {**best_bd, **device_bd}.items():
            cats[c][idx] = v
        for name in spec_cols:
            v = getattr(key, name)
            if name == "lora_targets":
                v = ",".join(v)
            elif name == "stack":  # ((package, version), ...) → "transformers=4.40.0,peft=0.10.0"
                v = ",".join(f"{p}={w}" for p, w in v)
            spec_cols[name][idx] = v
    cols = {}
    for name in names:
        cols[name] = {"batch": B_all, "seq": S_all, "gen": N_all}[name] if name in _NUMERIC else spec_cols[name]
    df = pd.DataFrame(cols)
    df["peak_allocated_bytes"] = alloc
    df["peak_device_bytes"] = device
    df["peak_phase"] = phase
    df["host_ram_bytes"] = host  # a recipe's offloaded activations, not on the device
    for c, v in cats.items():
        df[c] = v
    return df

"""Nominal GPU memory capacities for `--gpu NAME` (a fuller hardware catalog belongs to the planner)."""

import json
import os
from functools import lru_cache

_PATH = os.path.join(os.path.dirname(__file__), "catalog", "gpus.json")


@lru_cache(maxsize=1)
def _gpus():
    with open(_PATH, encoding="utf-8") as f:
        return json.load(f)["gpus"]


def _key(s):
    return "".join(ch for ch in s.lower() if ch.isalnum())


def gpu_names():
    """Names of the GPUs with a known capacity."""
    return [g["name"] for g in _gpus()]


def gpu_memory_bytes(name):
    """(canonical name, nominal memory bytes) of a GPU; unknown names are a ValueError naming the flag."""
    k = _key(name)
    for g in _gpus():
        if k == _key(g["name"]) or k in {_key(a) for a in g["aliases"]}:
            return g["name"], g["memory_bytes"]
    raise ValueError(f"--gpu {name}: unknown GPU; known: {', '.join(gpu_names())}")

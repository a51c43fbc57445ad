"""Shipped config.json files and lookup by name, Hugging Face id, or path.

Files are named after the Hugging Face repo id with "/" → "--"
(`meta-llama--Llama-3.1-8B.json`), so `Llama-3.1-8B`, `meta-llama/Llama-3.1-8B`
and `llama-3.1-8b` all find the same config. Nothing is downloaded: a name that is
not shipped must be given as a path to a config.json or a model directory.
"""

import difflib
import json
import os
from functools import lru_cache

from ..shapes import shape_from_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


class UnknownModelError(ValueError):
    """A model name that is neither in the catalog nor a readable path."""


@lru_cache(maxsize=1)
def _index():
    """lower-case alias → file path; aliases are the repo id and the bare repo name."""
    idx = {}
    for fn in sorted(os.listdir(CONFIG_DIR)):
        if not fn.endswith(".json"):
            continue
        stem = fn[: -len(".json")]
        org, _, repo = stem.partition("--")
        path = os.path.join(CONFIG_DIR, fn)
        for alias in (f"{org}/{repo}", repo, stem):
            idx.setdefault(alias.lower(), path)
    return idx


def catalog_names():
    """Hugging Face ids of every shipped config."""
    return sorted(
        fn[: -len(".json")].replace("--", "/", 1) for fn in os.listdir(CONFIG_DIR) if fn.endswith(".json")
    )


def resolve_config_path(name):
    """Path of the config.json that `name` (catalog name, file, or model directory) refers to."""
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
        if not os.path.isfile(path):
            raise UnknownModelError(f"--model {name}: directory has no config.json")
        return path
    if os.path.isfile(name):
        return name
    key = name.strip().lower()
    idx = _index()
    if key in idx:
        return idx[key]
    close = difflib.get_close_matches(key, list(idx), n=4, cutoff=0.5)
    seen, hints = set(), []
    for c in close:
        p = idx[c]
        if p not in seen:
            seen.add(p)
            hints.append(os.path.basename(p)[: -len(".json")].replace("--", "/", 1))
    hint = f"; did you mean {', '.join(hints)}?" if hints else ""
    raise UnknownModelError(
        f"--model {name}: not in the catalog and not a path to a config.json{hint} "
        f"(`vramlab models` lists the {len(catalog_names())} shipped configs)"
    )


def load_config(name):
    """The config.json dict for `name`."""
    path = resolve_config_path(name)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnknownModelError(f"--model {name}: {path} is not valid UTF-8 JSON ({e})") from None
    except OSError as e:
        raise UnknownModelError(f"--model {name}: cannot read {path} ({e.strerror})") from None
    if not isinstance(cfg, dict):
        kind = {"list": "a list", "str": "a string", "NoneType": "null"}.get(type(cfg).__name__, type(cfg).__name__)
        raise UnknownModelError(f"--model {name}: {path} must hold a JSON object, not {kind}")
    return cfg


@lru_cache(maxsize=256)
def get_shape(name):
    """ModelShape for a catalog name or a config path (cached)."""
    path = resolve_config_path(name)
    label = name if not os.path.exists(name) else path
    if path.startswith(CONFIG_DIR):
        label = os.path.basename(path)[: -len(".json")].replace("--", "/", 1)
    return shape_from_config(load_config(name), label)


def hub_snapshot(folder):
    """('org/name', commit) when folder is a snapshot of the Hugging Face cache, else None.

    The cache layout is models--org--name/snapshots/<commit>/."""
    parts = os.path.normpath(os.path.abspath(folder)).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/", 1), parts[-1]
    return None


def hub_cache_label(path):
    """'org/name@commit' (commit shortened) for a file in a Hugging Face cache snapshot, else None."""
    snap = hub_snapshot(os.path.dirname(os.path.abspath(path)))
    return f"{snap[0]}@{snap[1][:12]}" if snap else None


def model_label(name):
    """How a model is named to people: 'org/name@commit' for a Hugging Face cache snapshot, else as given."""
    return hub_cache_label(name) or name

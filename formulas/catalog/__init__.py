"""Shipped config.json files and lookup by name, Hugging Face id, or path.

Files are named after the Hugging Face repo id with "/" → "--"
(`meta-llama--Llama-3.1-8B.json`), so `Llama-3.1-8B`, `meta-llama/Llama-3.1-8B`
and `llama-3.1-8b` all find the same config. Nothing is downloaded: a name that is
not shipped must be given as a path to a config.json or a model directory.
"""

import dataclasses
import difflib
import json
import os
from functools import lru_cache

from ..remote_code import REMOTE_CODE, needs_remote_code, shape_from_remote_config
from ..documents import DocumentError, load_json
from ..versions import parse_version
from ..shapes import FAMILIES, UnsupportedModelError, _config_dtype, shape_from_config, shape_from_inventory

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
# Configs of models that need remote code, mapped to a family without running it (formulas/remote_code.py).
REMOTE_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "remote_code")
# Inventories of the shipped configs whose model type is not hand-modelled (built by harness/inventory.py).
INVENTORY_DIR = os.path.join(os.path.dirname(__file__), "inventories")


class UnknownModelError(ValueError):
    """A model name that is neither in the catalog nor a readable path."""


def _config_files():
    """Paths of every shipped config.json, the remote-code ones included."""
    return [os.path.join(folder, fn) for folder in (CONFIG_DIR, REMOTE_CONFIG_DIR)
            for fn in sorted(os.listdir(folder)) if fn.endswith(".json")]


@lru_cache(maxsize=1)
def _index():
    """lower-case alias → file path; aliases are the repo id and the bare repo name."""
    idx = {}
    for path in _config_files():
        stem = os.path.basename(path)[: -len(".json")]
        org, _, repo = stem.partition("--")
        for alias in (f"{org}/{repo}", repo, stem):
            idx.setdefault(alias.lower(), path)
    return idx


def shipped_repo(path):
    """'org/name' when path is one of the shipped configs (files are named org--name.json), else None."""
    folder, fn = os.path.split(os.path.abspath(path))
    if folder in (CONFIG_DIR, REMOTE_CONFIG_DIR) and fn.endswith(".json"):
        return fn[: -len(".json")].replace("--", "/", 1)
    return None


def catalog_names():
    """Hugging Face ids of every shipped config."""
    return sorted(os.path.basename(p)[: -len(".json")].replace("--", "/", 1) for p in _config_files())


def resolve_config_path(name):
    """Path of the config.json that `name` (catalog name, file, or model directory) refers to."""
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
        if not os.path.exists(path):
            raise UnknownModelError(f"--model {name}: directory has no config.json")
        return path  # load_config refuses one that is not a file
    if os.path.exists(name):  # a file (load_config refuses a FIFO or a device)
        return name
    if os.path.lexists(name):  # a link that leads nowhere
        raise UnknownModelError(f"--model {name}: a link to nothing that exists (dangling, or a loop of links)")
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
        cfg = load_json(path, where=f"--model {name}: {path}" if name != path else f"--model {path}")
    except DocumentError as e:
        raise UnknownModelError(str(e)) from None
    if not isinstance(cfg, dict):
        kind = {"list": "a list", "str": "a string", "NoneType": "null"}.get(type(cfg).__name__, type(cfg).__name__)
        raise UnknownModelError(f"--model {name}: {path} must hold a JSON object, not {kind}")
    return cfg


def inventory_cache_dir():
    """Where built inventories are cached: $VRAMLAB_CACHE/inventories, else ~/.cache/vramlab/inventories."""
    root = os.environ.get("VRAMLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vramlab")
    return os.path.join(root, "inventories")


def inventory_file_name(cfg, sha256, transformers_version):
    """File name of an inventory: model type, config hash, and the transformers that built it."""
    return f"{cfg.get('model_type')}-{sha256[:16]}-transformers-{transformers_version}.json"


def _version_key(v):
    """Newest first among inventory file names' versions; a name that is no version sorts first."""
    try:
        return (1, parse_version(v))
    except ValueError:
        return (0, ())


def config_sha256(cfg):
    """sha256 of a config.json dict, keys sorted: what an inventory is keyed by."""
    import hashlib

    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def find_inventory(cfg):
    """Path of the inventory of a config.json dict (user cache first, then the shipped ones), or None.

    Of several, the one built by the installed transformers (read from package metadata, no import),
    else the one built by the newest transformers."""
    import importlib.metadata

    prefix = inventory_file_name(cfg, config_sha256(cfg), "")[: -len(".json")]
    try:
        installed = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    for folder in (inventory_cache_dir(), INVENTORY_DIR):
        try:
            names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".json")]
        except OSError:
            continue
        if not names:
            continue
        versions = {n[len(prefix): -len(".json")]: n for n in names}
        best = installed if installed in versions else max(versions, key=_version_key)
        return os.path.join(folder, versions[best])
    return None


def _shape_of(cfg, label):
    """Hand-modelled families from the config, mapped remote-code models from theirs (formulas/remote_code.py);
    any other model type from its inventory."""
    if not isinstance(cfg, dict) or cfg.get("model_type") in FAMILIES:
        return shape_from_config(cfg, label)
    if cfg.get("model_type") in REMOTE_CODE:
        return shape_from_remote_config(cfg, label)
    return dataclasses.replace(_inventory_shape(cfg, label), stored_quant=_stored_quant(cfg))


def _stored_quant(cfg):
    """The --dtype of a quantization_config vramlab models as a dtype (mxfp4, fp8), else ''."""
    qc = cfg.get("quantization_config")
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    return method if method in ("mxfp4", "fp8") else ""


def _inventory_shape(cfg, label):
    """The ModelShape of a config from its cached or shipped general inventory."""
    path = find_inventory(cfg)
    if path is None:
        mt = cfg.get("model_type")
        arch = ", ".join(cfg.get("architectures") or []) or "?"
        remote = (f"; its config names remote code ({', '.join(sorted(set(map(str, cfg['auto_map'].values()))))}), "
                  "which vramlab does not run, so only a model type transformers itself knows can be built"
                  if needs_remote_code(cfg) else "")
        raise UnsupportedModelError(
            f"{label}: model_type {mt!r} (architectures: {arch}) is not hand-modelled and has no inventory yet; "
            f"vramlab builds one from transformers on first use (needs torch and transformers installed){remote}")
    try:
        inv = load_json(path)
        return shape_from_inventory(inv, label, _config_dtype(cfg))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # a damaged or older file
        raise UnsupportedModelError(f"{label}: the inventory {path} cannot be read ({str(e).splitlines()[0][:120]}); "
                                    "vramlab builds it again when torch and transformers are installed, or delete it") from None


@lru_cache(maxsize=256)
def get_shape(name):
    """ModelShape for a catalog name or a config path (cached)."""
    path = resolve_config_path(name)
    label = shipped_repo(path) or (name if not os.path.exists(name) else path)
    return _shape_of(load_config(name), label)


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

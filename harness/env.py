"""Environment fingerprint: what a measurement depends on, recorded with every record.

Library versions are read from package metadata (no imports of torch here), the GPU and
driver through NVML, the CUDA version torch was built with only if torch is already loaded.
"""

import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata

from .gpu import nvml
from .paths import ROOT

PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "peft", "nvidia-ml-py", "numpy", "pandas")


def _version(pkg):
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_state(root=ROOT):
    """(commit, dirty) of the vramlab checkout, or (None, None) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=5)
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def formula_hash(root=ROOT):
    """Hash of the predictor's source (formulas/*.py): records made with other formulas are not comparable."""
    h = hashlib.sha256()
    base = os.path.join(root, "formulas")
    for dirpath, _, files in sorted(os.walk(base)):
        for fn in sorted(files):
            if fn.endswith(".py"):
                with open(os.path.join(dirpath, fn), "rb") as f:
                    h.update(fn.encode() + b"\0" + f.read())
    return h.hexdigest()[:12]


def fingerprint(device_index=0):
    """The environment of this process, as a JSON-ready dict."""
    commit, dirty = git_state()
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "packages": {p: _version(p) for p in PACKAGES},
        "vramlab": {"commit": commit, "dirty": dirty, "formula_hash": formula_hash()},
        "gpu": nvml.device_info(device_index),
        # the CUDA caching allocator's settings this process runs with ('' = torch's defaults)
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch_cuda"] = getattr(torch.version, "cuda", None)
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return env


def environment_key(env):
    """What makes two environments comparable for calibration: GPU, driver, CUDA, library versions, and the caching
    allocator's settings where they are not torch's defaults (`alloc=…`, so keys of default runs stay as they were)."""
    gpu = env.get("gpu") or {}
    pk = env.get("packages") or {}
    parts = [gpu.get("name"), gpu.get("driver"), env.get("torch_cuda"), pk.get("torch"), pk.get("transformers"),
             pk.get("bitsandbytes")]
    if env.get("alloc_conf"):
        parts.append(f"alloc={env['alloc_conf']}")
    return "|".join(str(x) for x in parts)


def allocator_label(env):
    """'expandable_segments:True', or 'default' where the record ran under torch's own allocator settings."""
    return env.get("alloc_conf") or "default"


def environment_label(env):
    """The environment as a reader wants it: 'NVIDIA H100 80GB HBM3 · driver 550.54 · CUDA 12.4 · torch 2.5.1 · …'.

    Only what the record has is named; a record made without a GPU says so instead of 'None'."""
    gpu = env.get("gpu") or {}
    pk = env.get("packages") or {}
    parts = [gpu["name"] if gpu.get("name") else "no GPU (CPU)"]
    if gpu.get("driver"):
        parts.append(f"driver {gpu['driver']}")
    if env.get("torch_cuda"):
        parts.append(f"CUDA {env['torch_cuda']}")
    parts += [f"{p} {pk[p]}" for p in ("torch", "transformers", "bitsandbytes") if pk.get(p)]
    if env.get("alloc_conf"):
        parts.append(f"PYTORCH_CUDA_ALLOC_CONF={env['alloc_conf']}")
    return " · ".join(parts)


def installed_versions():
    """{package: version or None} of the stack's packages, from their metadata (no import, so no torch)."""
    global _INSTALLED
    if _INSTALLED is None:
        from importlib import metadata

        from formulas.stack import PACKAGES

        _INSTALLED = {}
        for package in PACKAGES:
            try:
                _INSTALLED[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                _INSTALLED[package] = None
    return _INSTALLED


_INSTALLED = None

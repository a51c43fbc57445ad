import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Inventories the tests build go to a throw-away cache, never the user's (~/.cache/vramlab).
if "VRAMLAB_CACHE" not in os.environ:
    import tempfile

    os.environ["VRAMLAB_CACHE"] = tempfile.mkdtemp(prefix="vramlab-test-cache-")


def _has_nvidia_gpu():
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_nvidia_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run only as `python -m harness`, in the child processes the CLI tests start.
_SUBPROCESS_ONLY = {"harness.__main__"}


def _project_modules():
    """Dotted names of every module of formulas/ and harness/."""
    names = []
    for package in ("formulas", "harness"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            rel = os.path.relpath(folder, ROOT).replace(os.sep, ".")
            names += [rel if f == "__init__.py" else f"{rel}.{f[:-3]}" for f in files if f.endswith(".py")]
    return sorted(set(names) - _SUBPROCESS_ONLY)


def pytest_sessionfinish(session, exitstatus):
    """README's test command (the fast tier, `-m "not slow"`, every file): fail unless every module of
    formulas/ and harness/ was imported in this process by some fast test, so the fast tier covers them all."""
    config = session.config
    whole = [os.path.abspath(a) for a in config.args] in ([os.path.join(ROOT, "tests")], [ROOT])
    if config.getoption("markexpr") != "not slow" or config.getoption("keyword") or not whole or exitstatus != 0 \
            or config.getoption("collectonly"):
        return
    missing = [m for m in _project_modules() if m not in sys.modules]
    if missing:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line(f"the fast tier imports none of: {', '.join(missing)} (tests/conftest.py "
                            "pytest_sessionfinish): add a fast test that exercises them", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config, items):
    if _has_nvidia_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

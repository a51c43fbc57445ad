"""`vramlab predict`: output contract, clear one-line errors, and no torch import."""

import json
import os
import subprocess
import sys

import pytest

from formulas.categories import ALLOCATED_CATEGORIES, DEVICE_CATEGORIES, TENSOR_CATEGORIES
from harness.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_contract(capsys):
    code, out, _ = run(capsys, "predict", "--model", "Llama-3.1-8B", "--seq", "4096", "--gen", "100", "--json")
    assert code == 0
    d = json.loads(out)
    for key in ("peak_allocated_bytes", "peak_device_bytes", "peak_phase", "breakdown"):
        assert key in d
    assert d["breakdown"]["weights"] == 8_030_261_248 * 2
    assert isinstance(d["peak_device_bytes"], int)
    # tensors and the cuBLAS workspace add up to the allocated peak; slack and context to the device peak
    assert d["peak_allocated_bytes"] == sum(v for k, v in d["breakdown"].items() if k in ALLOCATED_CATEGORIES)
    assert d["breakdown"]["workspaces"] == 32 * 2**20  # one (inference) thread's cuBLAS workspace, sm90 default
    assert set(d["breakdown"]) == set(TENSOR_CATEGORIES) | {"cuda_context", "workspaces", "allocator_slack"}
    assert d["peak_device_bytes"] == d["peak_allocated_bytes"] + sum(d["breakdown"][k] for k in DEVICE_CATEGORIES)
    assert d["peak_allocated_bytes"] <= d["peak_reserved_bytes"] <= d["peak_device_bytes"]


def test_table_in_gib_with_phase_and_totals(capsys):
    code, out, _ = run(capsys, "predict", "--model", "Qwen2.5-7B", "--mode", "train", "--method", "qlora",
                       "--dtype", "bf16", "--seq", "1024", "--gpu", "RTX 4090")
    assert code == 0
    assert "GiB" in out and "peak allocated" in out and "peak device" in out and "RTX 4090" in out
    assert "uncalibrated" in out


@pytest.mark.parametrize("argv,flag", [
    (["--model", "Llama-3.1-8", "--json"], "--model"),
    (["--model", "Llama-3.1-8B", "--batch", "0"], "--batch"),
    (["--model", "Llama-3.1-8B", "--mode", "train", "--method", "qlora", "--dtype", "fp32"], "--dtype fp32"),
    (["--model", "Llama-3.1-8B", "--gpus", "3", "--tp", "3"], "--tp 3"),
    (["--model", "Llama-3.1-8B", "--dtype", "int3"], "--dtype int3"),
    (["--model", "Llama-3.1-8B", "--mode", "train", "--dtype", "nf4"], "--dtype nf4"),
    (["--model", "Llama-3.1-8B", "--gpu", "GTX 9090"], "--gpu"),
])
def test_bad_input_is_one_line_naming_the_flag(capsys, argv, flag):
    code, out, err = run(capsys, "predict", *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0]


def test_models_lists_catalog(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "deepseek-ai/DeepSeek-R1" in out.splitlines()


@pytest.mark.parametrize("blocked,argv,package", [
    ("yaml", ["run", "experiments/smoke.yaml", "--dry-run"], "pyyaml"),
    ("pandas", ["results", "tests"], "pandas"),
    ("numpy", ["report", "tests", "--out", "/nonexistent/never-written"], "numpy"),
    ("torch", ["trace", "--model", "gpt2", "--seq", "8"], "torch"),
])
def test_a_missing_package_is_one_line_naming_it(blocked, argv, package):
    """With only `pip install -e .`, commands that need the harness extra say what to install."""
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            f"from harness.cli import main; sys.exit(main({argv!r}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"needs {package}" in lines[0] and "pip install -e '.[harness]'" in lines[0]


def test_predict_grid_names_what_to_install():
    code = ("import sys; sys.modules['pandas'] = None\n"
            "from formulas.grid import expand_grid, predict_grid\n"
            "try:\n    predict_grid(expand_grid(model=['gpt2']))\n"
            "except ModuleNotFoundError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "needs pandas" in r.stdout and "pip install" in r.stdout, r.stdout + r.stderr

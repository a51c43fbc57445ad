"""Sweep files: expansion, stable hashes, and validation errors that name file, place, field and value."""

import os

import pytest

from harness.sweep.schema import SweepError, expand_sweep, load_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_times_zip_and_stable_hashes():
    doc = {"defaults": {"model": "gpt2", "seq": 64},
           "groups": [{"set": {"mode": "inference"}, "grid": {"dtype": ["bf16", "fp32"], "batch": [1, 2]},
                       "zip": {"seq": [64, 128], "gen": [4, 8]}},
                      {"set": {"mode": "train", "method": "lora"}, "grid": {"batch": [1]}}]}
    exps = expand_sweep(doc, "x.yaml")
    assert len(exps) == 2 * 2 * 2 + 1
    # The same experiment written differently hashes the same; a changed field does not.
    again = expand_sweep({"defaults": {"seq": 128, "model": "openai-community/gpt2", "gen": 8, "mode": "inference",
                                       "batch": 2, "dtype": "fp32"}, "grid": {}}, "y.yaml")
    assert again[0].spec_hash in {e.spec_hash for e in exps}
    assert len({e.spec_hash for e in exps}) == len(exps)


def test_duplicates_collapse():
    doc = {"defaults": {"model": "gpt2", "seq": 64}, "grid": {"batch": [1, 1, 2]}}
    assert len(expand_sweep(doc, "d.yaml")) == 2


@pytest.mark.parametrize("doc,needles", [
    ({"defaults": {"model": "gpt2", "dtyp": "bf16"}}, ["bad.yaml", "defaults", "'dtyp'", "allowed"]),
    ({"defaults": {"model": "gpt2", "seq": 64}, "grid": {"dtype": ["bf16", "int3"]}}, ["bad.yaml", "experiment 1", "dtype int3", "choose one of"]),
    ({"defaults": {"model": "gpt-9"}}, ["bad.yaml", "gpt-9", "not in the catalog"]),
    ({"defaults": {"model": "gpt2", "batch": "four"}}, ["bad.yaml", "batch", "'four'", "integer"]),
    ({"defaults": {"model": "gpt2"}, "zip": {"seq": [1, 2], "gen": [1]}}, ["bad.yaml", "zip", "equal lengths"]),
    ({"defaults": {"model": "gpt2", "timeout_s": "long"}}, ["bad.yaml", "timeout_s", "'long'"]),
    ({"groups": [{"grid": {"batch": [1]}}]}, ["bad.yaml", "no model"]),
    ({"defaults": {"model": "gpt2"}, "groups": [{"sett": {}}]}, ["bad.yaml", "groups[0]", "sett"]),
])
def test_errors_name_the_problem(doc, needles):
    with pytest.raises(SweepError) as e:
        expand_sweep(doc, "bad.yaml")
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_invalid_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("defaults:\n  model: gpt2\n  batch: [1, 2\n")
    with pytest.raises(SweepError, match=r"broken.yaml: invalid YAML at line \d+"):
        load_sweep(str(p))


@pytest.mark.parametrize("name", ["smoke", "reference", "rtx4090"])
def test_shipped_sweeps_are_valid(name):
    sweep, exps = load_sweep(os.path.join(ROOT, "experiments", f"{name}.yaml"))
    assert sweep == name and exps
    if name == "reference":
        assert len(exps) >= 100
        kinds = {(e.spec.mode, e.spec.method if e.spec.mode == "train" else e.spec.dtype) for e in exps}
        for k in [("inference", "bf16"), ("inference", "fp32"), ("inference", "int8"), ("inference", "nf4"),
                  ("train", "full"), ("train", "lora"), ("train", "qlora"), ("train", "freeze")]:
            assert k in kinds, k

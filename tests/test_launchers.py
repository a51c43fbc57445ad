"""`vramlab run --launcher slurm|ray`: the same records as the local launcher, resume, retry, faults, bad input.

Slurm runs through submitit's local executor (`--slurm-cluster local`: the same job array as local
processes); Ray on one local CPU cluster started once for the module. The faults use the stand-in
worker (tests/standin_worker.py); the comparison traces real tiny models through the real worker.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from harness.cli import main
from harness.records import iter_records, record_path
from harness.sweep.schema import SweepError, expand_sweep

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STANDIN = [sys.executable, os.path.join(HERE, "standin_worker.py"), "--out"]
TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 1000, "max_position_embeddings": 512}
LAUNCHERS = ("slurm", "ray")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module (starting one takes seconds); run_on uses it and leaves it up."""
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    yield ray
    ray.shutdown()


@pytest.fixture
def backend(request):
    """A backend of each launcher: Slurm through submitit's local executor, or the module's Ray cluster."""
    from harness.sweep.backends import make_backend

    if request.param == "slurm":
        pytest.importorskip("submitit")
        return make_backend("slurm", "trace", {"cluster": "local"})
    request.getfixturevalue("ray_cluster")
    return make_backend("ray", "trace", {})


def _exps(seqs, timeout_s=30):
    return expand_sweep({"defaults": {"model": "gpt2", "timeout_s": timeout_s}, "grid": {"seq": seqs}}, "t.yaml")


def _run(backend, exps, out, **kw):
    from harness.sweep.backends import run_on

    return run_on(backend, exps, str(out), worker_cmd=STANDIN + [str(out)], progress=False, poll_s=0.05, **kw)


def _records(out):
    return {r["spec"]["seq"]: r for r in iter_records(str(out))}


def _runs(out):
    """spec_hash of every completed stand-in run (not records: a run twice shows twice)."""
    path = os.path.join(out, ".completed")
    return open(path).read().split() if os.path.exists(path) else []


# ------------------------------------------------------------------ the real worker: the same records as local

@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A sweep of a tiny model traced on fake tensors: inference and LoRA training."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("yaml")
    root = tmp_path_factory.mktemp("tiny")
    (root / "config.json").write_text(json.dumps(TINY))
    sweep = root / "tiny.yaml"
    sweep.write_text(f"name: tiny\ndefaults: {{model: '{root / 'config.json'}', seq: 32, batch: 2}}\n"
                     "groups:\n  - {set: {gen: 2}}\n  - {set: {mode: train, method: lora}}\n"
                     "launcher: {slurm: {time_min: 10}, ray: {}}\n")
    assert main(["run", str(sweep), "--mode", "trace", "--out", str(root / "local"), "--no-progress"]) == 0
    return sweep, root / "local"


def _figures(out):
    return {r["spec_hash"]: (r["outcome"], (r["traced"] or {}).get("peak_allocated_bytes"),
                             (r["traced"] or {}).get("breakdown")) for r in iter_records(str(out))}


@pytest.mark.slow
@pytest.mark.parametrize("launcher,flags", [("slurm", ["--slurm-cluster", "local"]), ("ray", [])])
def test_cluster_launchers_give_the_local_records(tiny_sweep, tmp_path, capsys, request, launcher, flags):
    if launcher == "ray":
        request.getfixturevalue("ray_cluster")
    else:
        pytest.importorskip("submitit")
    sweep, local = tiny_sweep
    out = tmp_path / launcher
    capsys.readouterr()
    assert main(["run", str(sweep), "--mode", "trace", "--launcher", launcher, *flags, "--out", str(out),
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == "tiny: ran 2, skipped 0 already recorded (ok 2)"
    figures = _figures(out)
    assert figures == _figures(local) and len(figures) == 2
    assert all(outcome == "ok" and peak > 0 for outcome, peak, _ in figures.values())
    if launcher == "slurm":
        assert os.listdir(out / ".slurm")  # submitit's scripts and logs, beside the records
    # resume: a second run submits nothing
    assert main(["run", str(sweep), "--mode", "trace", "--launcher", launcher, *flags, "--out", str(out),
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == "tiny: ran 0, skipped 2 already recorded"


# ------------------------------------------------------------------ resume, retry, faults, interrupts (stand-in worker)

@pytest.mark.slow
@pytest.mark.parametrize("backend", LAUNCHERS, indirect=True)
def test_resume_runs_only_what_is_not_recorded(backend, tmp_path):
    s = _run(backend, _exps([32, 33]), tmp_path)
    assert s.ran == 2 and s.skipped == 0 and s.outcomes == {"ok": 2}
    s = _run(backend, _exps([32, 33, 34]), tmp_path)
    assert s.ran == 1 and s.skipped == 2
    assert sorted(_runs(tmp_path)) == sorted(e.spec_hash for e in _exps([32, 33, 34]))  # none ran twice


@pytest.mark.slow
@pytest.mark.parametrize("backend", LAUNCHERS, indirect=True)
def test_killed_workers_and_tasks_end_in_one_fallback_record_each(backend, tmp_path):
    """12: the worker is killed (the task writes the fallback); 16: the task itself is killed (the submitter
    writes it); 11: hangs past its timeout; 13: exits without a record."""
    exps = _exps([32, 12, 16, 11, 13], timeout_s=2)
    s = _run(backend, exps, tmp_path)
    assert s.ran == 5 and not s.interrupted
    recs = _records(tmp_path)
    assert {k: r["outcome"] for k, r in recs.items()} == {32: "ok", 12: "crashed", 16: "crashed", 11: "timeout",
                                                         13: "crashed"}
    assert len(os.listdir(tmp_path)) - len([f for f in os.listdir(tmp_path) if f.startswith(".")]) == 5
    assert "SIGKILL" in recs[12]["error"]["message"] and "boom" in recs[13]["error"]["stderr_tail"]
    assert f"the {backend.name} task ended without a record" in recs[16]["error"]["message"]
    assert recs[16]["source"] == "traced" and recs[16]["traced"] is None and recs[16]["predicted"]
    again = _run(backend, exps, tmp_path)
    assert again.ran == 0 and again.skipped == 5


@pytest.mark.slow
@pytest.mark.parametrize("backend", LAUNCHERS, indirect=True)
def test_retry_replaces_failure_records_with_the_rerun_ones(backend, tmp_path):
    exps = _exps([32, 13, 16])
    _run(backend, exps, tmp_path)
    stamps = {k: os.stat(record_path(tmp_path, r["spec_hash"])).st_mtime_ns for k, r in _records(tmp_path).items()}
    s = _run(backend, exps, tmp_path, retry=True)
    assert s.ran == 2 and s.skipped == 1 and s.outcomes == {"crashed": 2}
    after = {k: os.stat(record_path(tmp_path, r["spec_hash"])).st_mtime_ns for k, r in _records(tmp_path).items()}
    assert after[32] == stamps[32] and after[13] != stamps[13] and after[16] != stamps[16]


def _standins_running(out):
    """pids of stand-in workers writing to `out`, still alive."""
    pids = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{d}/stat") as f:
                zombie = f.read().split(")")[-1].split()[0] == "Z"
        except (OSError, IndexError):
            continue
        if b"standin_worker.py" in cmd and str(out).encode() in cmd and not zombie:
            pids.append(int(d))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
@pytest.mark.parametrize("backend", LAUNCHERS, indirect=True)
def test_interrupt_cancels_the_tasks_and_keeps_the_records(backend, tmp_path):
    exps = _exps([32]) + expand_sweep({"defaults": {"model": "gpt2", "seq": 11, "timeout_s": 600},
                                       "grid": {"batch": [1, 2]}}, "t.yaml")

    def stop(exp, outcome):
        raise KeyboardInterrupt

    deadline = time.monotonic() + 30
    s = _run(backend, exps, tmp_path, on_record=stop)
    assert s.interrupted and s.signal == "SIGINT" and s.ran == 1
    assert list(_records(tmp_path)) == [32]
    while _standins_running(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _standins_running(tmp_path), "a cancelled task left its worker running"


# ------------------------------------------------------------------ settings and bad input

def test_slurm_task_parameters_from_the_mode_and_the_timeouts(monkeypatch):
    pytest.importorskip("submitit")
    from harness.sweep import backends

    exps = _exps([32], timeout_s=600) + _exps([33], timeout_s=61)
    p = backends.SlurmBackend("measure", cluster="local").parameters(exps)
    assert p["gpus_per_node"] == 1 and p["timeout_min"] == 10 + 5 and p["tasks_per_node"] == 1
    assert backends.SlurmBackend("trace", cluster="local").parameters(exps)["gpus_per_node"] == 0
    monkeypatch.setattr(backends.shutil, "which", lambda name: f"/usr/bin/{name}")  # as if on a Slurm login node
    p = backends.SlurmBackend("trace", partition="gpu", time_min=30, gpus=2).parameters(exps)
    assert p["gpus_per_node"] == 2 and p["timeout_min"] == 30 and p["slurm_partition"] == "gpu"
    (big,) = expand_sweep({"defaults": {"model": "gpt2", "seq": 64, "mode": "train", "gpus": 4, "zero": 3}}, "t.yaml")
    assert backends.SlurmBackend("measure").gpus_for(big) == 4 and backends.task_gpus(big, "trace") == 0


def test_flags_win_over_the_sweep_files_launcher_block(tmp_path):
    pytest.importorskip("yaml")
    from harness.cli import build_parser
    from harness.cli.run import _launcher_settings

    sweep = tmp_path / "s.yaml"
    sweep.write_text("defaults: {model: gpt2, seq: 64}\nlauncher:\n  slurm: {partition: gpu, time_min: 60}\n"
                     "  ray: {address: 'auto'}\n")
    a = build_parser().parse_args(["run", str(sweep), "--launcher", "slurm", "--slurm-time", "9"])
    assert _launcher_settings(a) == {"partition": "gpu", "time_min": 9}
    a = build_parser().parse_args(["run", str(sweep), "--launcher", "ray", "--address", "10.0.0.1:6379"])
    assert _launcher_settings(a) == {"address": "10.0.0.1:6379"}
    assert _launcher_settings(build_parser().parse_args(["run", str(sweep), "--launcher", "ray"])) == {"address": "auto"}


@pytest.mark.parametrize("block,needle", [
    ({"kubernetes": {}}, "launcher: unknown key(s) kubernetes; allowed: ray, slurm"),
    ({"slurm": {"parition": "gpu"}}, "launcher.slurm: unknown key(s) parition"),
    ({"slurm": {"time_min": 0}}, "launcher.slurm.time_min: 0 must be ≥ 1"),
    ({"slurm": {"gpus_per_task": "one"}}, "launcher.slurm.gpus_per_task: 'one' must be a whole number"),
    ({"ray": {"address": ""}}, "launcher.ray.address: '' must be a non-empty string"),
    ("slurm", "launcher: must be a mapping"),
])
def test_a_bad_launcher_block_is_one_line_naming_it(block, needle):
    with pytest.raises(SweepError) as e:
        expand_sweep({"defaults": {"model": "gpt2"}, "launcher": block}, "s.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)


def _one_line(capsys, argv, needles):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1, err
    for n in needles:
        assert n in lines[0]


@pytest.fixture
def sweep_file(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "s.yaml"
    path.write_text("defaults: {model: gpt2, seq: 32}\n")
    return str(path)


@pytest.mark.parametrize("argv,needles", [
    (["--launcher", "ray", "--slurm-time", "5", "--mode", "trace"], ["--slurm-time: only with --launcher slurm"]),
    (["--address", "auto", "--mode", "trace"], ["--address: only with --launcher ray"]),
    (["--launcher", "slurm", "--gpus", "0", "--mode", "trace"], ["--gpus: only with --launcher local"]),
    (["--launcher", "ray"], ["--launcher ray: give --mode explicitly"]),
    (["--launcher", "ray", "--mode", "measure"], ["--out", "every node"]),
])
def test_bad_launcher_flags_are_one_line(sweep_file, capsys, argv, needles):
    _one_line(capsys, ["run", sweep_file, *argv], needles)


def test_a_bad_slurm_time_is_one_line(sweep_file, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's error, one line (harness.cli._Parser)
        main(["run", sweep_file, "--launcher", "slurm", "--slurm-time", "0", "--mode", "trace"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "--slurm-time" in lines[0] and "≥ 1" in lines[0]


def test_no_slurm_here_is_one_line_pointing_to_the_local_cluster(sweep_file, tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "out"
    _one_line(capsys, ["run", sweep_file, "--mode", "trace", "--launcher", "slurm", "--out", str(out)],
              ["Slurm is not here", "--slurm-cluster local"])
    assert not out.exists()


@pytest.mark.parametrize("launcher,package,extra", [("slurm", "submitit", "slurm"), ("ray", "ray", "ray")])
def test_a_missing_launcher_package_is_one_line_naming_the_extra(sweep_file, tmp_path, launcher, package, extra):
    out = tmp_path / "out"
    argv = ["run", sweep_file, "--mode", "trace", "--launcher", launcher, "--out", str(out)]
    code = f"import sys; sys.modules[{package!r}] = None\nfrom harness.cli import main; sys.exit(main({argv!r}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"needs {package}" in lines[0] and f"pip install -e '.[{extra}]'" in lines[0]
    assert not out.exists()


def test_an_array_slurm_refuses_is_one_line(sweep_file, tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: "
                                    "Invalid partition name specified' >&2\nexit 1\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    argv = ["run", sweep_file, "--mode", "trace", "--launcher", "slurm", "--slurm-partition", "nope", "--out",
            str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err  # after the "N experiments → OUT" line every run prints first
    assert err.count("Invalid partition name") == 1 and err.strip().splitlines()[-1] == (
        "vramlab run: --launcher slurm: sbatch: error: Batch job submission failed: Invalid partition name specified")

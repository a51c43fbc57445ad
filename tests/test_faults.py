"""Bad input, on purpose: every way below ends with one clear line and a non-zero exit, or with a right answer.

No traceback, no silent wrong answer, no write outside the chosen folder, no sweep run twice, no
worker left behind. docs/reliability.md says what vramlab promises and what it does not.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.cli import main
from harness.records import iter_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "tests")
STANDIN = [sys.executable, os.path.join(HERE, "standin_worker.py"), "--out"]
LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 1000, "max_position_embeddings": 512}


def one_line(capsys, argv, code=2, needles=()):
    """Run `vramlab argv`; it must exit with `code`, print nothing on stdout and one line on stderr naming needles."""
    try:
        got = main(argv)
    except SystemExit as e:  # argparse
        got = e.code
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert got == code and len(lines) == 1, (got, out.err)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _write(tmp_path, name, text, mode="w"):
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(text)
    else:
        p.write_text(text)
    return str(p)


# ------------------------------------------------------------------ configs

@pytest.mark.parametrize("cfg,needle", [
    ([1, 2], "not a list"), ("gpt2", "not a string"), (None, "not null"),
    ({**LLAMA, "hidden_size": "4096"}, "hidden_size: '4096'"), ({**LLAMA, "hidden_size": None}, "'hidden_size'"),
    ({**LLAMA, "num_attention_heads": 0}, "num_attention_heads: 0"), ({**LLAMA, "hidden_size": -64}, "hidden_size: -64"),
    ({**LLAMA, "hidden_size": 4096.5}, "hidden_size: 4096.5"), ({**LLAMA, "num_key_value_heads": 3}, "multiple"),
])
def test_bad_configs_are_one_line(tmp_path, capsys, cfg, needle):
    path = _write(tmp_path, "config.json", json.dumps(cfg))
    one_line(capsys, ["predict", "--model", path], needles=[needle])


def test_non_utf8_config(tmp_path, capsys):
    path = _write(tmp_path, "config.json", b'{"model_type": "llama\xff"}', "wb")
    one_line(capsys, ["predict", "--model", path], needles=["UTF-8"])


# ------------------------------------------------------------------ flags

@pytest.mark.parametrize("argv,needles", [
    (["predict", "--model", "gpt2", "--seq", str(10**19)], ["--seq", "at most"]),
    (["trace", "--model", "gpt2", "--seq", str(10**19)], ["--seq", "at most"]),
    (["predict", "--model", "gpt2", "--users", "3", "--batch", "5"], ["--users", "--batch"]),
    (["predict", "--model", "gpt2", "--method", "qlora"], ["--method qlora", "--mode train"]),
    (["trace", "--model", "gpt2", "--plot", "x.xyz"], ["--plot x.xyz", ".png"]),
    (["trace", "--model", "gpt2", "--plot", "somewhere"], ["--plot somewhere", ".png"]),
    (["run", "experiments/smoke.yaml", "--gpus", "a,b"], ["--gpus", "'a,b'"]),
    (["plan", "--model", "Llama-3.1-8B", "--gpu", "H100", "--max-gpus", "100000000"], ["--max-gpus", "1,048,576"]),
    (["check", "tests", "tests", "--threshold", "peak_device:-5%"], ["--threshold peak_device:-5%"]),
    (["check", "tests", "tests", "--threshold", "peak_device:nan%"], ["--threshold peak_device:nan%"]),
    (["check", "tests", "tests", "--threshold", "peak_device:3"], ["no unit"]),
])
def test_bad_flags_are_one_line(capsys, argv, needles):
    one_line(capsys, argv, needles=needles)


def test_more_tokens_than_positions_is_a_warning_not_an_error(capsys):
    assert main(["predict", "--model", "gpt2", "--seq", "2000", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["spec"]["seq"] == 2000
    assert out.err.count("\n") == 1 and "warning" in out.err and "1,024 positions" in out.err


def test_plan_answers_quickly_at_the_largest_search(capsys):
    t0 = time.perf_counter()
    assert main(["plan", "--model", "DeepSeek-R1", "--mode", "train", "--seq", "8192", "--gpu", "RTX 3060",
                 "--max-gpus", "1048576", "--json"]) == 0
    assert time.perf_counter() - t0 < 1.0
    fewest = json.loads(capsys.readouterr().out)["fewest"]  # 671B trained in full on 12 GB cards: thousands of them
    assert fewest["gpus"] is None or 1024 <= fewest["gpus"] <= 1048576
    t0 = time.perf_counter()  # a deadline that needs a million GPUs: the speed search stays short too
    assert main(["plan", "--model", "DeepSeek-R1", "--mode", "train", "--method", "lora", "--tokens", "10T",
                 "--deadline", "1h", "--gpu", "H100", "--json"]) == 0
    assert time.perf_counter() - t0 < 1.0
    t = json.loads(capsys.readouterr().out)["time"]  # compute alone needs more GPUs than the search goes to
    assert t["gpus_for_deadline"] is None and t["gpus_for_compute"] > 1_000_000


# ------------------------------------------------------------------ sweeps

SWEEP = "defaults: {model: gpt2, seq: 32}\n"


@pytest.mark.parametrize("text,needles", [
    ("name: ../../../../tmp/x\n" + SWEEP, ["name", "plain name"]),
    ("name: /tmp/x\n" + SWEEP, ["name", "plain name"]),
    ("defaults: {model: gpt2, lora_targets: 5}\n", ["lora_targets: 5"]),
    ("defaults: {model: gpt2, lora_targets: [1, {a: b}]}\n", ["lora_targets"]),
    ("defaults: {model: gpt2, timeout_s: -5}\n", ["timeout_s: -5"]),
    ("defaults: {model: gpt2, steps: -1}\n", ["steps: -1"]),
    ("defaults: {model: gpt2, seq: 32, seq: 64}\n", ["duplicate key 'seq'"]),
    ("defaults: {model: gpt2}\ngrid: {seq: [" + ",".join(map(str, range(1, 101))) + "], batch: ["
     + ",".join(map(str, range(1, 101))) + "], gen: [0, 1]}\n", ["20,000 experiments", "--yes"]),
])
def test_bad_sweeps_are_one_line_and_write_nothing(tmp_path, capsys, text, needles):
    pytest.importorskip("yaml")
    path = _write(tmp_path, "sweep.yaml", text)
    before = set(os.listdir("/tmp"))
    one_line(capsys, ["run", path, "--dry-run"], needles=needles)
    one_line(capsys, ["run", path, "--mode", "trace"], needles=needles)
    assert set(os.listdir("/tmp")) - before <= {"x"} and not os.path.exists("/tmp/x/traced-cpu")


def test_non_utf8_sweep(tmp_path, capsys):
    pytest.importorskip("yaml")
    path = _write(tmp_path, "sweep.yaml", b"defaults: {model: gpt2\xff}\n", "wb")
    one_line(capsys, ["run", path, "--dry-run"], needles=["UTF-8"])


def test_out_that_is_a_file_or_cannot_be_made(tmp_path, capsys):
    pytest.importorskip("yaml")
    path = _write(tmp_path, "sweep.yaml", SWEEP)
    a_file = _write(tmp_path, "not-a-folder", "x")
    one_line(capsys, ["run", path, "--mode", "trace", "--out", a_file], needles=["--out", "is a file"])
    one_line(capsys, ["run", path, "--mode", "trace", "--out", "/proc/vramlab/records"], needles=["--out", "cannot create"])


def test_a_full_disk_while_writing_a_fallback_record_keeps_what_was_written(tmp_path, monkeypatch):
    from harness.records import iter_records
    from harness.sweep import launcher
    from harness.sweep.schema import expand_sweep

    exps = expand_sweep({"defaults": {"model": "gpt2", "timeout_s": 30}, "grid": {"seq": [32, 13, 64]}}, "t.yaml")
    real = launcher.write_record

    def full_disk(out_dir, record):
        if record["outcome"] == "crashed":
            raise OSError(28, "No space left on device")
        return real(out_dir, record)

    monkeypatch.setattr(launcher, "write_record", full_disk)
    with pytest.raises(launcher.OutDirError, match="No space left on device.*records written so far are kept"):
        launcher.run_sweep(exps, str(tmp_path), worker_cmd=STANDIN + [str(tmp_path)], progress=False, poll_s=0.05)
    assert [r["spec"]["seq"] for r in iter_records(str(tmp_path))] == [32]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _standins():
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if b"standin_worker.py" in f.read():
                        pids.append(int(d))
            except OSError:
                continue
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and the parent-death signal")
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_five_sigkills_of_the_launcher_then_a_resume(tmp_path, warm):
    """30 experiments, the launcher SIGKILLed five times, then resumed: 30 records, no experiment run to
    completion twice, no worker left behind."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from harness.sweep.launcher import run_sweep\nfrom harness.sweep.schema import expand_sweep\n"
            "exps = expand_sweep({'defaults': {'model': 'gpt2', 'timeout_s': 60}, "
            "'grid': {'seq': list(range(40, 70))}}, 't.yaml')\n"
            f"run_sweep(exps, {str(tmp_path)!r}, worker_cmd={STANDIN + [str(tmp_path)]!r}, progress=False, "
            f"poll_s=0.02, warm={warm})\n")
    for _ in range(5):
        p = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(1.5)
        p.send_signal(signal.SIGKILL)
        p.wait()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # a worker killed mid-write may leave a .tmp-*.json (docs/reliability.md): never read as a record
    records = [f for f in os.listdir(tmp_path) if f.endswith(".json") and not f.startswith(".tmp-")]
    assert len(records) == len(list(iter_records(str(tmp_path))))
    with open(tmp_path / ".completed") as f:
        completed = f.read().split()
    assert len(records) == 30 and len(set(completed)) == len(completed) == 30
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in _standins()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in _standins() if _alive(p)]


# ------------------------------------------------------------------ records, tables, reports

def _good_record(h="abc123abc123", **over):
    rec = {"schema_version": 2, "spec_hash": h, "outcome": "ok", "source": "measured", "spec": {"model": "gpt2"},
           "predicted": {"peak_allocated_bytes": 900, "peak_device_bytes": 2000, "breakdown": {"weights": 900}},
           "traced": None, "measured": {"peak_allocated_bytes": 1000, "peak_device_bytes": 1500,
                                        "peak_reserved_bytes": 1100, "cuda_context_bytes": 300},
           "env": {}, "error": None}
    rec.update(over)
    return rec


@pytest.mark.parametrize("bad,field", [
    ({"measured": "lots"}, "measured"),
    ({"measured": {"peak_allocated_bytes": "1000"}}, "measured.peak_allocated_bytes"),
    ({"spec": "gpt2"}, "spec"),
    ({"measured": {"peak_allocated_bytes": float("nan")}}, "measured.peak_allocated_bytes"),
    ({"measured": {"peak_allocated_bytes": 0}}, "measured.peak_allocated_bytes"),
    ({"outcome": "great"}, "outcome"),
])
def test_ill_typed_records_are_named_and_skipped(tmp_path, capsys, bad, field):
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    with open(tmp_path / "good.json", "w") as f:
        json.dump(_good_record(), f)
    with open(tmp_path / "bad.json", "w") as f:
        json.dump(_good_record("def456def456", **bad), f)
    assert main(["results", str(tmp_path), "--csv", str(tmp_path / "out.csv")]) == 0
    err = capsys.readouterr().err
    assert f"bad.json: field {field}" in err and "1 records" in err
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    assert f"field {field}" in capsys.readouterr().err


def test_non_utf8_record_is_skipped(tmp_path, capsys):
    pytest.importorskip("pandas")
    (tmp_path / "bad.json").write_bytes(b'{"spec_hash": "\xff"}')
    with open(tmp_path / "good.json", "w") as f:
        json.dump(_good_record(), f)
    assert main(["results", str(tmp_path)]) == 0
    assert "bad.json: not a readable record" in capsys.readouterr().err


def test_markdown_report_is_escaped(tmp_path):
    pytest.importorskip("matplotlib")
    from harness.analysis.report import write_report

    rec = _good_record(env={"gpu": {"name": "Evil | GPU <script>alert(1)</script>"}})
    _, md = write_report([rec], str(tmp_path))
    text = open(md, encoding="utf-8").read()
    assert "<script>" not in text and "&lt;script&gt;" in text and "Evil \\| GPU" in text


def test_calibration_with_negative_overheads_is_refused(tmp_path, capsys):
    table = tmp_path / "cal.csv"
    table.write_text("parameter,value,note\ncuda_context_bytes,-1000000000,\nkernel_images.gemm,0,\nkernel_images.bnb_int8,0,\n"
                     "kernel_images.train,0,\n"
                     "slack_share.inference,0.25,\nslack_share.train,0.25,\n")
    one_line(capsys, ["predict", "--model", "gpt2", "--calibration", str(table)], needles=["context", "≥ 0"])


def test_check_fails_when_the_sets_do_not_overlap(tmp_path, capsys):
    from harness.records import write_record

    for folder, hashes in (("a", ["a1a1a1a1a1a1", "a2a2a2a2a2a2"]), ("b", ["b1b1b1b1b1b1"])):
        for h in hashes:
            write_record(str(tmp_path / folder), _good_record(h, spec={"model": "gpt2", "seq": int(h[1]) * 10}))
    assert main(["check", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "cannot compare: only 0 of the baseline's 2 experiments" in capsys.readouterr().err

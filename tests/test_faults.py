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


# ------------------------------------------------------------------ round 2 (issue 26): one reader of every document

def _deep_json(levels=100_000):
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("text,needle", [
    (_deep_json(), "nested more than 64 levels"), (_deep_json(70), "nested more than 64 levels"),
    ('{"hidden_size": ' + "9" * 40 + "}", "40 digits"),
])
def test_a_deep_or_huge_config_is_one_line(tmp_path, capsys, text, needle):
    path = _write(tmp_path, "config.json", text)
    one_line(capsys, ["predict", "--model", path], needles=[path, needle])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_never_waited_on(tmp_path, capsys):
    """A FIFO named config.json, *.json in a record folder, or a measurement set: refused or skipped with a word."""
    pytest.importorskip("pandas")
    os.mkfifo(tmp_path / "config.json")
    t0 = time.monotonic()
    one_line(capsys, ["predict", "--model", str(tmp_path / "config.json")], needles=["a FIFO, not a file"])
    one_line(capsys, ["predict", "--model", str(tmp_path)], needles=["a FIFO, not a file"])
    records = tmp_path / "records"
    records.mkdir()
    os.mkfifo(records / "abc123abc123.json")
    with open(records / "good.json", "w") as f:
        json.dump(_good_record(), f)
    assert main(["results", str(records)]) == 0
    assert "abc123abc123.json: not a regular file" in capsys.readouterr().err
    sets = tmp_path / "sets"
    sets.mkdir()
    os.mkfifo(sets / "fifo.yaml")
    one_line(capsys, ["import", str(sets / "fifo.yaml"), "--out", str(tmp_path / "out")], needles=["a FIFO"])
    assert time.monotonic() - t0 < 20


def test_yaml_aliases_cannot_blow_up(tmp_path, capsys):
    """A few hundred bytes of nested aliases ("billion laughs") are refused before anything walks them."""
    pytest.importorskip("yaml")
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = "\n".join(lines) + "\n"
    t0 = time.monotonic()
    path = _write(tmp_path, "bomb.yaml", bomb + "set: s\ncitation: *a8\nmeasured: nvml\ngpu: x\ncases: *a8\n")
    one_line(capsys, ["import", path, "--out", str(tmp_path / "out")], needles=["aliases"])
    sweep = _write(tmp_path, "sweep.yaml", "defaults: {model: gpt2}\ngrid: {seq: *a8}\n" + bomb)
    one_line(capsys, ["run", sweep, "--dry-run"], needles=["aliases"])
    assert time.monotonic() - t0 < 20 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ one version parser

@pytest.mark.parametrize("argv,needle", [
    (["predict", "--model", "gpt2", "--transformers", "5.x"], "--transformers 5.x: not a version"),
    (["predict", "--model", "gpt2", "--transformers", ""], "--transformers '': not a version"),
    (["predict", "--model", "gpt2", "--peft", "abc"], "--peft abc: not a version"),
    (["stack", "--torch", "2.x"], "--torch 2.x: not a version"),
    (["predict", "--model", "gpt2", "--engine", "vllm", "--vllm-version", "abc", "--gpu", "H100"],
     "--vllm-version 'abc': not a version"),
])
def test_versions_are_read_one_way(capsys, argv, needle):
    one_line(capsys, argv, needles=[needle])


@pytest.mark.parametrize("stack,needle", [
    ("'transformers=4.40'", "not a mapping of package to version"),
    ("{transformers: 4.40}", "a number: give versions as text"),
    ("{transformers: '5.x'}", "stack.transformers 5.x: not a version"),
    ("{tranformers: '4.40'}", "'tranformers' is not a package"),
])
def test_a_sweep_stack_is_checked_and_named(tmp_path, capsys, stack, needle):
    pytest.importorskip("yaml")
    path = _write(tmp_path, "sweep.yaml", f"defaults: {{model: gpt2, seq: 32, stack: {stack}}}\n")
    one_line(capsys, ["run", path, "--dry-run"], needles=[path, "defaults: stack", needle])


# ------------------------------------------------------------------ records: every number, every part, any schema

@pytest.mark.parametrize("bad,field", [
    ({"measured": {"peak_allocated_bytes": 1000, "breakdown": {"weights": -5}}}, "measured.breakdown.weights"),
    ({"measured": {"peak_allocated_bytes": 1000, "phases": {"load": {"max_allocated_bytes": float("nan")}}}},
     "measured.phases.load.max_allocated_bytes"),
    ({"predicted": {"peak_allocated_bytes": 10**20}}, "predicted.peak_allocated_bytes"),
    ({"spec": {"model": "gpt2", "seq": 10**25}}, "spec.seq"),
    ({"env": {"gpu": "H100"}}, "env.gpu"),
    ({"env": {"packages": ["torch"]}}, "env.packages"),
])
def test_bad_numbers_and_parts_anywhere_in_a_record_are_named_and_skipped(tmp_path, capsys, bad, field):
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    from harness.records import write_record

    recs = tmp_path / "recs"
    write_record(str(recs), _good_record())
    with open(recs / "def456def456.json", "w") as f:
        json.dump(_good_record("def456def456", **bad), f)
    assert main(["results", str(recs), "--csv", str(tmp_path / "out.csv")]) == 0
    err = capsys.readouterr().err
    assert f"def456def456.json: field {field}" in err and "1 records" in err, err
    assert main(["report", str(recs), "--out", str(tmp_path / "rep")]) == 0
    assert f"field {field}" in capsys.readouterr().err
    write_record(str(tmp_path / "base"), _good_record("def456def456"))
    assert main(["check", str(tmp_path / "base"), str(recs)]) == 1  # named not comparable, never compared
    out = capsys.readouterr()
    assert "unreadable      def456def456" in out.out and f"field {field}" in out.err


def test_a_newer_schema_record_is_left_alone_said_and_never_rerun(tmp_path, capsys):
    pytest.importorskip("pandas")
    from harness.sweep.launcher import run_sweep
    from harness.sweep.schema import expand_sweep

    exps = expand_sweep({"defaults": {"model": "gpt2", "timeout_s": 30}, "grid": {"seq": [32, 33]}}, "t.yaml")
    newer = tmp_path / f"{exps[0].spec_hash}.json"
    newer.write_text(json.dumps({**_good_record(exps[0].spec_hash), "schema_version": 4, "something_new": 1}))
    before = newer.read_bytes()
    s = run_sweep(exps, str(tmp_path), worker_cmd=STANDIN + [str(tmp_path)], progress=False, poll_s=0.05)
    assert s.ran == 1 and s.skipped == 1 and s.newer == [str(newer)] and not s.corrupt_moved
    assert newer.read_bytes() == before and not [f for f in os.listdir(tmp_path) if f.startswith(".corrupt-")]
    assert main(["results", str(tmp_path)]) == 0
    assert "written by a newer vramlab (record schema 4" in capsys.readouterr().err


def test_a_symlink_loop_counts_each_record_once(tmp_path, capsys):
    pytest.importorskip("pandas")
    from harness.records import record_files, write_record

    write_record(str(tmp_path / "a"), _good_record("a1a1a1a1a1a1"))
    os.symlink(str(tmp_path), str(tmp_path / "a" / "up"))  # a link back up the tree
    os.symlink(str(tmp_path / "a" / "a1a1a1a1a1a1.json"), str(tmp_path / "same.json"))  # the same file twice
    assert len(record_files(str(tmp_path))) == 1
    assert main(["results", str(tmp_path), "--csv", "-"]) == 0
    assert capsys.readouterr().out.count("a1a1a1a1a1a1") == 1


# ------------------------------------------------------------------ import: replaces exactly its own cases

def _set(name="demo", cases=("a", "b"), extra=""):
    text = (f"set: {name}\ncitation: {{title: T, url: 'https://example.org'}}\nmeasured: allocated\ngpu: A100 80GB\n"
            f"stack: {{transformers: '4.40.0'}}\n{extra}cases:\n")
    for c in cases:
        text += f"  - {{id: {c}, spec: {{model: gpt2, seq: 64}}, published: '1 GB', bytes: 1000000000}}\n"
    return text


def _import(capsys, *argv):
    code = main(["import", *argv, "--quiet"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_an_import_never_deletes_another_sources_records(tmp_path, capsys):
    pytest.importorskip("yaml")
    out = tmp_path / "out"
    first = _write(tmp_path, "first.yaml", _set(cases=("a", "b")))
    second = _write(tmp_path, "second.yaml", _set(cases=("c",)))  # the same `set:` from another file
    assert _import(capsys, first, "--out", str(out))[0] == 0
    assert _import(capsys, second, "--out", str(out))[0] == 0
    assert sorted(f for f in os.listdir(out / "demo") if f.endswith(".json")) == ["a.json", "b.json", "c.json"]
    # the second file may not take a case of the first: refused, both records stay
    clash = _write(tmp_path, "second.yaml", _set(cases=("a", "c")))
    code, _, err = _import(capsys, clash, "--out", str(out))
    assert code == 2 and "a.json holds a record of first.yaml" in err
    assert json.load(open(out / "demo" / "a.json"))["source_file"] == "first.yaml"
    # a case removed from its own file: kept and named; --prune removes it, and only it
    assert _write(tmp_path, "first.yaml", _set(cases=("a",)))
    code, printed, _ = _import(capsys, first, "--out", str(out))
    assert code == 0 and "b.json (--prune removes them)" in printed and (out / "demo" / "b.json").exists()
    code, printed, _ = _import(capsys, first, "--out", str(out), "--prune")
    assert code == 0 and "removed (--prune): b.json" in printed
    assert sorted(f for f in os.listdir(out / "demo") if f.endswith(".json")) == ["a.json", "c.json"]


def test_an_import_into_a_sweeps_folder_leaves_its_records(tmp_path, capsys):
    pytest.importorskip("yaml")
    from harness.records import write_record

    sweep = tmp_path / "runs" / "demo"
    write_record(str(sweep), _good_record("abc123abc123"))
    (sweep / "notes.json").write_text("{}")
    path = _write(tmp_path, "s.yaml", _set(cases=("a",)))
    assert _import(capsys, path, "--out", str(tmp_path / "runs"))[0] == 0
    assert {"abc123abc123.json", "notes.json", "a.json"} <= set(os.listdir(sweep))
    clash = _write(tmp_path, "s.yaml", _set(cases=("abc123abc123",)))
    code, _, err = _import(capsys, clash, "--out", str(tmp_path / "runs"))
    assert code == 2 and "abc123abc123.json holds a record of" in err
    assert json.load(open(sweep / "abc123abc123.json"))["source"] == "measured"


def test_an_import_into_a_folder_another_command_writes_is_refused(tmp_path, capsys):
    pytest.importorskip("yaml")
    from harness.records import lock_folder

    path = _write(tmp_path, "s.yaml", _set())
    (tmp_path / "out" / "demo").mkdir(parents=True)
    fd = lock_folder(str(tmp_path / "out" / "demo"), "import")
    try:
        code, out, err = _import(capsys, path, "--out", str(tmp_path / "out"))
    finally:
        os.close(fd)
    assert code == 2 and f"another vramlab import (pid {os.getpid()})" in err and not out
    assert not [f for f in os.listdir(tmp_path / "out" / "demo") if f.endswith(".json")]


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.replace("measured: allocated", "measured: allocated\nmeasurd: nvml"), "unknown key 'measurd'"),
    (lambda s: s.replace("gpu: A100 80GB", "gpu: A100 80GB\ngpu: H100"), "duplicate key 'gpu'"),
    (lambda s: s.replace("seq: 64}", "seqq: 64}", 1), "'seqq' is not a vramlab spec field (did you mean seq?)"),
    (lambda s: s.replace("seq: 64}", "seq: lots}", 1), "seq: 'lots' must be an integer"),
    (lambda s: s.replace("stack: {transformers: '4.40.0'}", "stack: '4.40'"), "stack: '4.40' is not a mapping"),
    (lambda s: s.replace("stack: {transformers: '4.40.0'}", "stack: {transformers: 4.40}"), "a number"),
    (lambda s: s.replace("stack: {transformers: '4.40.0'}", "stack: {transformers: '4.x'}"), "not a version"),
    (lambda s: s.replace("stack: {transformers: '4.40.0'}", "stack: {pytorch: '2.2.0'}"), "did you mean torch"),
    (lambda s: s.replace("id: a,", "id: \"a\\n\",", 1), "is not a name"),
    (lambda s: s.replace("bytes: 1000000000", "bytes: " + str(10**20), 1), "from 1 to"),
    (lambda s: s.replace("set: demo", "set: \"demo\\n\""), "set: 'demo\\n' is not a name"),
])
def test_a_mistranscribed_set_is_refused_not_recorded(tmp_path, capsys, edit, needle):
    pytest.importorskip("yaml")
    path = _write(tmp_path, "s.yaml", edit(_set()))
    one_line(capsys, ["import", path, "--out", str(tmp_path / "out")], needles=[path, needle])
    assert not (tmp_path / "out").exists()


def test_a_folder_is_checked_whole_before_anything_is_printed_or_written(tmp_path, capsys):
    pytest.importorskip("yaml")
    sets = tmp_path / "sets"
    sets.mkdir()
    _write(sets, "a.yaml", _set("one"))
    _write(sets, "b.yaml", _set("two").replace("seq: 64}", "seqq: 64}", 1))
    (sets / "c.yaml").write_bytes(_set("three").encode() + b"# \xff\n")
    one_line(capsys, ["import", str(sets), "--out", str(tmp_path / "out")], needles=["b.yaml", "seqq"])
    assert not (tmp_path / "out").exists()
    (sets / "b.yaml").unlink()
    one_line(capsys, ["import", str(sets), "--out", str(tmp_path / "out")], needles=["c.yaml", "not UTF-8"])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ flags, run fields and sizes

@pytest.mark.parametrize("argv,needles", [
    (["run", "experiments/smoke.yaml", "--mode", "trace", "--jobs", "0"], ["--jobs", "'0'", "≥ 1"]),
    (["run", "experiments/smoke.yaml", "--mode", "trace", "--jobs", "-1"], ["--jobs", "'-1'", "≥ 1"]),
    (["run", "experiments/smoke.yaml", "--mode", "trace", "--out", ""], ["--out '': give a folder"]),
    (["predict", "--model", "gpt2", "--gpus", "1000000000"], ["--gpus 1,000,000,000", "at most"]),
    (["plan", "--model", "gpt2", "--users", "0", "--gpu", "H100"], ["--users 0"]),
    (["plan", "--model", "gpt2", "--engine", "vllm", "--gpu", "all"], ["--gpu all", "with --engine"]),
])
def test_bad_run_and_plan_flags_are_one_line(capsys, argv, needles):
    pytest.importorskip("yaml")
    one_line(capsys, argv, needles=needles)


@pytest.mark.parametrize("field,needle", [
    ("real_model_dir: /nonexistent/model", "real_model_dir: '/nonexistent/model': no such folder"),
    ("sample_interval_ms: .inf", "sample_interval_ms: inf must be at most"),
    ("sample_interval_ms: .nan", "sample_interval_ms: nan must be ≥"),
    ("timeout_s: 100000000", "timeout_s: 100000000 must be at most"),
])
def test_run_fields_out_of_range_are_one_line(tmp_path, capsys, field, needle):
    pytest.importorskip("yaml")
    path = _write(tmp_path, "sweep.yaml", f"defaults: {{model: gpt2, seq: 32, {field}}}\n")
    one_line(capsys, ["run", path, "--dry-run"], needles=[needle])


def test_a_grid_of_a_trillion_is_refused_before_it_is_built(tmp_path, capsys):
    pytest.importorskip("yaml")
    axis = "[" + ", ".join(str(i) for i in range(1, 1001)) + "]"
    path = _write(tmp_path, "sweep.yaml", f"defaults: {{model: gpt2}}\ngrid: {{seq: {axis}, batch: {axis}, "
                                          f"gen: {axis}, lora_rank: {axis}}}\n")
    t0 = time.monotonic()
    one_line(capsys, ["run", path, "--mode", "trace", "--yes", "--out", str(tmp_path / "out")],
             needles=["1,000,000,000,000 experiments", "even with --yes"])
    assert time.monotonic() - t0 < 20 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ output paths

def test_output_paths_that_are_files_or_unwritable_are_one_line(tmp_path, capsys):
    pytest.importorskip("yaml")
    pytest.importorskip("pandas")
    from harness.records import write_record

    write_record(str(tmp_path / "recs"), _good_record())
    a_file = _write(tmp_path, "a-file", "x")
    one_line(capsys, ["import", _write(tmp_path, "s.yaml", _set()), "--out", a_file], needles=["--out", "is a file"])
    one_line(capsys, ["report", str(tmp_path / "recs"), "--out", a_file], needles=["--out", "is a file"])
    one_line(capsys, ["fit", str(tmp_path / "recs"), "--out", a_file], needles=["--out", "is a file"])
    one_line(capsys, ["results", str(tmp_path / "recs"), "--csv", str(tmp_path)], needles=["--csv", "is a folder"])
    one_line(capsys, ["results", str(tmp_path / "recs"), "--csv", a_file + "/x.csv"], needles=["--csv", "is a file"])
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        one_line(capsys, ["report", str(tmp_path / "recs"), "--out", str(locked)], needles=["not writable"])


def test_fit_never_writes_a_table_its_reader_refuses(tmp_path, capsys, monkeypatch):
    from formulas.overhead import Overheads
    from harness.analysis import calibrate
    from harness.records import write_record

    write_record(str(tmp_path / "recs"), _good_record(env={"gpu": {"name": "H100"}}))
    monkeypatch.setattr(calibrate, "group_by_environment", lambda recs: {"H100|x": recs})
    result = {"overheads": Overheads(cc=(9, 0), cuda_context_bytes=1,
                                     slack_share=(("load", 0.0), ("inference", 12.0), ("train", 0.2))),
              "cc": (9, 0), "heldout": {}, "heldout_rows": [], "environment_key": "H100|x", "fitted_at": "now",
              "fit_quality": {"n_fit": 2, "n_models": 1}, "models": ["gpt2"], "formula_hashes": [],
              "fit_spec_hashes": []}
    monkeypatch.setattr(calibrate, "fit", lambda recs: result)
    assert main(["fit", str(tmp_path / "recs"), "--out", str(tmp_path / "cal")]) == 2
    assert "slack shares must be in [0, 10)" in capsys.readouterr().err
    assert [f for f in os.listdir(tmp_path / "cal") if not f.startswith(".")] == []


# ------------------------------------------------------------------ check: no silent pick among duplicates

def test_check_refuses_two_records_of_one_experiment_in_one_folder(tmp_path, capsys):
    from harness.records import write_record

    write_record(str(tmp_path / "base"), _good_record())
    write_record(str(tmp_path / "new"), _good_record())
    regressed = _good_record(measured={**_good_record()["measured"], "peak_device_bytes": 5 * 1500 * 2**20})
    with open(tmp_path / "new" / "zzz-copy.json", "w") as f:
        json.dump(regressed, f)
    one_line(capsys, ["check", str(tmp_path / "base"), str(tmp_path / "new")],
             needles=["abc123abc123.json and", "zzz-copy.json", "one folder"])


def test_check_fails_on_repeats_that_disagree(tmp_path, capsys):
    from harness.records import write_record

    base = _good_record(measured={**_good_record()["measured"], "peak_device_bytes": 2**30})
    write_record(str(tmp_path / "base"), base)
    write_record(str(tmp_path / "new" / "run1"), base)
    write_record(str(tmp_path / "new" / "run2"), {**base, "measured": {**base["measured"], "peak_device_bytes": 5 * 2**30}})
    assert main(["check", str(tmp_path / "base"), str(tmp_path / "new")]) == 1
    out = capsys.readouterr()
    assert "unstable" in out.out and "2 new records disagree on peak_device" in out.out
    assert "repeated records of 1 experiment(s) disagree" in out.err


# ------------------------------------------------------------------ --weights-from-checkpoint against the config

def test_a_checkpoint_that_is_not_the_configs_is_refused(tmp_path, capsys):
    import struct

    cfg = {**LLAMA, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    def write(tensors):
        header = json.dumps({n: {"dtype": "BF16", "shape": list(s), "data_offsets": [0, 0]} for n, s in tensors})
        (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode())

    write([("model.embed_tokens.weight", (1000, 64))])  # the embedding alone
    one_line(capsys, ["predict", "--model", str(tmp_path), "--weights-from-checkpoint"],
             needles=["stores 0 of the config's 2 decoder layers"])
    layers = [(f"model.layers.{i}.mlp.down_proj.weight", (64, 176 * 40)) for i in range(2)]
    write([("model.embed_tokens.weight", (1000, 64)), ("lm_head.weight", (1000, 64))] + layers)  # 20× too big
    one_line(capsys, ["predict", "--model", str(tmp_path), "--weights-from-checkpoint"],
             needles=["what the config gives at --dtype bf16"])


# ------------------------------------------------------------------ cluster launchers: nothing left, nothing twice

def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _stime(pid):
    """A live process's start time (proc(5) stat field 22), None for one gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return None if fields[0] == b"Z" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _tree(root):
    """{pid: start time} of root's descendants now (Ray's agents overwrite their environment, so a tag misses them)."""
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    kids.setdefault(int(f.read().rsplit(b")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = {}, [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            out[k] = _stime(k)
            todo.append(k)
    return out


def _tagged(tag):
    """PIDs of live processes whose environment carries VRAMLAB_TEST_TAG=tag."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if f"VRAMLAB_TEST_TAG={tag}".encode() in f.read() and _alive(int(d)):
                        pids.append(int(d))
            except OSError:
                continue
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_the_reaper_ends_what_a_killed_submitter_started(tmp_path):
    """Processes of a new session and orphans of orphans (as Ray's agents and submitit's controllers are) end within
    10 s of a SIGKILL of the process that started them; nothing else does."""
    tag = os.urandom(6).hex()
    code = (f"import os, subprocess, sys, time; sys.path.insert(0, {ROOT!r})\n"
            "from harness.sweep.reaper import Reaper\nr = Reaper()\n"
            "subprocess.Popen(['sleep', '1000'])\n"
            "subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
            "subprocess.Popen(['sh', '-c', 'sleep 1000 & sleep 1000'])\n"
            "print('ready', flush=True); time.sleep(1000)\n")
    bystander = subprocess.Popen(["sleep", "1000"], env=dict(os.environ, VRAMLAB_TEST_TAG=tag))
    p = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, VRAMLAB_TEST_TAG=tag),
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        assert len(_tagged(tag)) >= 6  # the bystander, the submitter, four sleeps and a shell
        p.kill()
        p.wait()
        deadline = time.monotonic() + 10
        while set(_tagged(tag)) - {bystander.pid} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(_tagged(tag)) == {bystander.pid}
    finally:
        bystander.kill()
        bystander.wait()


def test_a_resume_never_starts_an_experiment_another_process_is_recording(tmp_path, monkeypatch):
    from harness.sweep import launcher
    from harness.sweep.schema import expand_sweep

    exps = expand_sweep({"defaults": {"model": "gpt2", "timeout_s": 30}, "grid": {"seq": [32, 33]}}, "t.yaml")
    monkeypatch.setattr(launcher, "CLAIM_WAIT_S", 0.3)
    held = launcher.claim(str(tmp_path), exps[0].spec_hash)  # an earlier run's task, still recording it
    try:
        s = launcher.run_sweep(exps, str(tmp_path), worker_cmd=STANDIN + [str(tmp_path)], progress=False,
                               poll_s=0.05)
    finally:
        os.close(held)
    assert s.ran == 1 and s.busy == [f"{exps[0].spec_hash} (pid {os.getpid()} on {os.uname().nodename})"]
    assert sorted(os.listdir(tmp_path / ".claims")) == [exps[0].spec_hash]  # a check makes no claim files
    summary = launcher.SweepSummary(out_dir=str(tmp_path))  # let go of: the next run starts it
    assert launcher.not_busy(str(tmp_path), [exps[0]], False, summary) == [exps[0]] and not summary.busy


def test_a_task_finds_its_experiment_recorded_since_it_was_submitted(tmp_path):
    """A task of a resumed run whose experiment an earlier run's task recorded meanwhile does not run it again."""
    from harness.records import write_record
    from harness.sweep.launcher import record_stamp, run_isolated
    from harness.sweep.schema import expand_sweep

    (exp,) = expand_sweep({"defaults": {"model": "gpt2", "seq": 32, "timeout_s": 30}}, "t.yaml")
    seen = record_stamp(str(tmp_path), exp.spec_hash)
    write_record(str(tmp_path), {**_good_record(exp.spec_hash), "source": "traced",
                                 "traced": {"peak_allocated_bytes": 5}})
    assert run_isolated(exp, str(tmp_path), "trace", STANDIN + [str(tmp_path)], seen) == "ok"
    assert not (tmp_path / ".completed").exists()  # the stand-in never ran


def test_a_ray_address_that_does_not_answer_is_one_line_in_seconds(tmp_path, capsys):
    pytest.importorskip("ray")
    pytest.importorskip("yaml")
    path = _write(tmp_path, "sweep.yaml", SWEEP)
    t0 = time.monotonic()
    one_line(capsys, ["run", path, "--launcher", "ray", "--address", "nowhere:1", "--mode", "trace",
                      "--out", str(tmp_path / "out"), "--no-progress"], needles=["--address nowhere:1"])
    assert time.monotonic() - t0 < 20


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and the parent-death signal")
@pytest.mark.parametrize("launcher,settings", [("slurm", {"cluster": "local"}), ("ray", {})])
def test_sigkills_of_a_cluster_sweep_then_a_resume(tmp_path, launcher, settings):
    """A Slurm (submitit's local executor) or Ray sweep SIGKILLed three times mid-sweep, then resumed: every record
    written exactly once (no experiment run to completion twice), and no process of it left 10 s after each kill."""
    pytest.importorskip({"slurm": "submitit", "ray": "ray"}[launcher])
    n, tag, out = 16, os.urandom(6).hex(), str(tmp_path)
    code = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from harness.sweep.backends import make_backend, run_on\nfrom harness.sweep.schema import expand_sweep\n"
            "exps = expand_sweep({'defaults': {'model': 'gpt2', 'timeout_s': 60}, "
            f"'grid': {{'seq': list(range(40, {40 + n}))}}}}, 't.yaml')\n"
            f"run_on(make_backend({launcher!r}, 'trace', {settings!r}), exps, {out!r}, "
            f"worker_cmd={STANDIN + [out]!r}, progress=False, poll_s=0.05)\n")
    env = dict(os.environ, PYTHONPATH=ROOT, VRAMLAB_TEST_TAG=tag)

    def records():
        return [f for f in os.listdir(out) if f.endswith(".json") and not f.startswith((".tmp-", ".corrupt-"))]

    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
        before, t0 = len(records()), time.monotonic()
        while len(records()) < before + 2 and p.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.05)
        seen = _tree(p.pid)
        p.send_signal(signal.SIGKILL)
        p.wait()

        def left():
            return set(_tagged(tag)) | {q for q, t in seen.items() if t is not None and _stime(q) == t}

        deadline = time.monotonic() + 10
        while left() and time.monotonic() < deadline:
            time.sleep(0.1)
        rest = {q: _cmdline(q)[:80] for q in left()}
        assert not rest, f"processes of the killed {launcher} sweep left after 10 s: {rest}"
    assert len(records()) < n, "the sweep ended before the third SIGKILL: give it more experiments"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, ".completed")) as f:
        completed = f.read().split()
    assert len(records()) == len(list(iter_records(out))) == n
    assert len(completed) == len(set(completed)) == n
    deadline = time.monotonic() + 10
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _tagged(tag)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_sigterm_of_a_local_slurm_sweep_prints_no_tracebacks(tmp_path):
    """submitit's controllers print a traceback each when cancelled: they go to <out>/.slurm/controllers.stderr."""
    pytest.importorskip("submitit")
    out, tag = str(tmp_path), os.urandom(6).hex()
    code = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from harness.sweep.backends import make_backend, run_on\nfrom harness.sweep.schema import expand_sweep\n"
            "exps = expand_sweep({'defaults': {'model': 'gpt2', 'seq': 11, 'timeout_s': 600}, "
            "'grid': {'batch': [1, 2, 3, 4]}}, 't.yaml')\n"
            "s = run_on(make_backend('slurm', 'trace', {'cluster': 'local'}), exps, "
            f"{out!r}, worker_cmd={STANDIN + [out]!r}, progress=False, poll_s=0.05)\n"
            "print('stopped by', s.signal)\n")
    p = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT, VRAMLAB_TEST_TAG=tag),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len([q for q in _tagged(tag) if b"standin_worker.py" in _cmdline(q)]) < 4 \
            and time.monotonic() < deadline:  # every experiment is running (seq 11 hangs)
        time.sleep(0.1)
    assert time.monotonic() < deadline
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out_text, err = p.communicate(timeout=60)
    assert "stopped by SIGTERM" in out_text and "Traceback" not in err, err
    deadline = time.monotonic() + 10
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _tagged(tag)

"""`vramlab import`: published measurement sets → records that results, report and check read."""

import json
import os

import pytest

from formulas.predict import predict
from formulas.spec import Spec
from harness.cli import main
from harness.analysis.published import import_source
from harness.records import iter_records

SET = """
set: demo
citation: {title: "A blog post", url: "https://example.org/post", who: "someone, 2024-04", where: "Table 1"}
measured: nvml
measured_note: "nvidia-smi"
gpu: "A100 80GB"
stack: {transformers: "4.40.0", peft: "0.10.0", torch: "2.2.0", bitsandbytes: "0.43.1", trl: "0.8.6"}
defaults: {mode: train, model: mistralai/Mixtral-8x7B-v0.1}
cases:
  - id: mixtral-qlora
    spec: {method: qlora, dtype: bf16, batch: 4, seq: 4096, grad_ckpt: true, lora_targets: [q_proj, k_proj, v_proj, o_proj]}
    published: "45 GB"
    bytes: 45000000000
  - id: mixtral-qlora-reserved
    measured: reserved
    spec: {method: qlora, dtype: bf16, batch: 1, seq: 1024, grad_ckpt: true}
    published: "30 GB"
    bytes: 30000000000
  - id: kernels
    spec: {method: qlora, dtype: bf16, batch: 2, seq: 2048}
    published: "20 GB"
    bytes: 20000000000
    unsupported: "custom Triton kernels"
  - id: not-in-catalog
    spec: {model: example/Nope-7B, method: lora}
    published: "20 GB"
    bytes: 20000000000
"""


@pytest.fixture
def source(tmp_path):
    p = tmp_path / "demo.yaml"
    p.write_text(SET)
    return str(p)


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_import_writes_one_record_per_case(source, tmp_path):
    done = import_source(source, str(tmp_path / "out"))
    assert [c for c, _, _ in done] == ["mixtral-qlora", "mixtral-qlora-reserved", "kernels", "not-in-catalog"]
    recs = {r["published"]["case"]: r for r in iter_records(str(tmp_path / "out" / "demo"))}
    r = recs["mixtral-qlora"]
    assert r["source"] == "published" and r["outcome"] == "ok"
    assert r["published"]["peak_device_bytes"] == 45_000_000_000 and r["published"]["what"] == "nvml"
    assert r["published"]["as_printed"] == "45 GB" and r["citation"]["url"] == "https://example.org/post"
    # the stack is the set's (packages vramlab models), and the prediction follows it: experts quantized on 4.40
    assert r["spec"]["stack"] == {"transformers": "4.40.0", "peft": "0.10.0", "torch": "2.2.0", "bitsandbytes": "0.43.1"}
    spec = Spec(**{**r["spec"], "lora_targets": tuple(r["spec"]["lora_targets"])})
    assert r["predicted"]["peak_device_bytes"] == predict(spec).peak_device_bytes
    assert r["predicted"]["peak_device_bytes"] < 60e9
    assert recs["mixtral-qlora-reserved"]["published"] == {
        "peak_reserved_bytes": 30_000_000_000, "what": "reserved", "as_printed": "30 GB",
        "case": "mixtral-qlora-reserved", "note": "", "gpu": "A100 80GB"}
    assert recs["kernels"]["outcome"] == "unsupported" and recs["kernels"]["error"]["message"] == "custom Triton kernels"
    assert recs["not-in-catalog"]["outcome"] == "unsupported"
    assert "example/Nope-7B" in recs["not-in-catalog"]["error"]["message"]


def test_cli_import_lists_errors_and_reasons(source, tmp_path, capsys):
    code, out, _ = run(capsys, "import", source, "--out", str(tmp_path / "out"))
    assert code == 0
    assert "4 cases" in out and "2 predicted, 2 not expressible" in out
    assert "demo/kernels: custom Triton kernels" in out and "|error| median" in out


def test_records_work_with_results_report_and_check(source, tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    import_source(source, out_dir)
    code, out, _ = run(capsys, "results", out_dir)
    assert code == 0 and "published device GiB" in out and "published reserved GiB" in out
    code, out, _ = run(capsys, "report", out_dir, "--out", str(tmp_path / "rep"))
    assert code == 0
    md = open(tmp_path / "rep" / "report.md").read()
    assert "published peak device" in md and "published peak reserved" in md
    assert "Published cases not expressible" in md and "custom Triton kernels" in md
    code, out, err = run(capsys, "check", out_dir, out_dir)
    assert code == 0 and "regression" not in err
    code, _, err = run(capsys, "fit", out_dir)
    assert code == 2 and "published" in err and len(err.strip().splitlines()) == 1


def test_fit_reads_published_records_that_state_allocated_and_device(tmp_path, capsys):
    """A set whose cases state the allocated peak and, under `also`, the device figure fits like measured records."""
    cases = "".join(
        f"  - id: c{b}\n    spec: {{batch: {b}, seq: 256}}\n    published: \"x\"\n    bytes: {alloc}\n"
        f"    also: {{nvml: {alloc + 1_400_000_000 + alloc // 50}}}\n"
        for b, alloc in ((1, 16_500_000_000), (2, 17_000_000_000), (4, 18_000_000_000), (8, 20_000_000_000),
                         (16, 24_000_000_000), (32, 32_000_000_000), (3, 17_500_000_000), (6, 19_000_000_000)))
    p = tmp_path / "fitme.yaml"
    p.write_text("set: fitme\ncitation: {title: t, url: u}\nmeasured: allocated\ngpu: \"NVIDIA A100-SXM4-80GB\"\n"
                 "stack: {transformers: \"4.35.2\", torch: \"2.1.1\"}\n"
                 "defaults: {model: meta-llama/Llama-2-7b-hf, dtype: fp16}\ncases:\n" + cases)
    import_source(str(p), str(tmp_path / "out"))
    code, out, err = run(capsys, "fit", str(tmp_path / "out"), "--out", str(tmp_path / "cal"))
    assert code == 0, err
    assert "NVIDIA A100-SXM4-80GB" in out and "4.35.2" in out
    from harness.analysis.calibrate import load_calibration
    from harness.analysis.repredict import repredict
    from harness.records import iter_records

    cal = load_calibration(str(next((tmp_path / "cal").glob("*.csv"))))  # (the folder also holds the writers' .lock)
    # one figure beside the allocated peak: the slack rule stands and the context takes the rest — the planted
    # 1.4 GB and the 2 % the set adds, less what the rules put under slack and kernel images
    assert 1_400_000_000 < cal.overheads.cuda_context_bytes < 2_000_000_000
    for rec in iter_records(str(tmp_path / "out")):  # what the device holds beyond the allocated peak, as the set has it
        pred, device = repredict(rec, cal.overheads)
        pub = rec["published"]
        overhead = pub["peak_device_bytes"] - pub["peak_allocated_bytes"]
        assert abs((device - pred.peak_allocated_bytes) - overhead) < 0.2 * overhead


@pytest.mark.parametrize("edit,field", [
    (lambda s: s.replace("measured: nvml", "measured: smi"), "measured"),
    (lambda s: s.replace("bytes: 45000000000", "bytes: 45 GB"), "bytes"),
    (lambda s: s.replace("id: kernels", "id: mixtral-qlora"), "id"),
    (lambda s: s.replace('url: "https://example.org/post", ', ""), "citation"),
    (lambda s: s.replace("    published: \"45 GB\"\n", "    publishd: \"45 GB\"\n"), "publishd"),
    (lambda s: "cases: [", "invalid YAML"),
])
def test_a_bad_set_is_one_line_naming_the_field_and_writes_nothing(tmp_path, capsys, edit, field):
    p = tmp_path / "bad.yaml"
    p.write_text(edit(SET))
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "import", str(p), "--out", str(out_dir))
    assert code == 2 and len(err.strip().splitlines()) == 1 and field in err and str(p) in err
    assert not out_dir.exists()


def test_a_case_removed_from_the_set_is_kept_until_pruned(source, tmp_path):
    out_dir = str(tmp_path / "out")
    import_source(source, out_dir)
    with open(source) as f:
        text = f.read()
    cut = text.index("  - id: not-in-catalog")
    with open(source, "w") as f:
        f.write(text[:cut])
    import_source(source, out_dir)  # the record of the case no longer in the set stays (and the CLI names it)
    assert "not-in-catalog.json" in os.listdir(os.path.join(out_dir, "demo"))
    import_source(source, out_dir, prune=True)
    assert sorted(os.listdir(os.path.join(out_dir, "demo"))) == [".lock", "kernels.json", "mixtral-qlora-reserved.json",
                                                                 "mixtral-qlora.json"]
    for f in os.listdir(os.path.join(out_dir, "demo")):
        if f.endswith(".json"):
            json.load(open(os.path.join(out_dir, "demo", f)))


SOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "published", "sources")
RECORDS = os.path.join(os.path.dirname(SOURCES), "records")


def test_the_corpus_every_case_predicted_or_listed_and_the_allocated_bars(tmp_path):
    """The published corpus, imported afresh: every case either predicted or unsupported with its reason; on
    figures of torch's allocated peak, median |error| ≤ 3 % and p90 ≤ 12 % (docs/stack.md has the device-level
    figures, which also hold the authors' CUDA context and allocator pool)."""
    from harness.analysis.published import corpus_summary

    records = []
    for f in sorted(os.listdir(SOURCES)):
        if f.endswith(".yaml"):
            for _, outcome, path in import_source(os.path.join(SOURCES, f), str(tmp_path)):
                records.append(json.load(open(path)))
    assert len(records) > 300
    for r in records:
        assert r["source"] == "published" and r["citation"]["url"]
        assert r["outcome"] == "ok" or (r["outcome"] == "unsupported" and r["error"]["message"].strip())
    s = corpus_summary(records)
    assert s["allocated"]["n"] >= 200
    assert s["allocated"]["median"] <= 0.03 and s["allocated"]["p90"] <= 0.12, s


def test_the_committed_records_are_the_sources_imported():
    """results/published/records holds one record per case of every set (rerun `vramlab import
    results/published/sources` after editing a set)."""
    import yaml

    for f in sorted(os.listdir(SOURCES)):
        if not f.endswith(".yaml"):
            continue
        d = yaml.safe_load(open(os.path.join(SOURCES, f)))
        folder = os.path.join(RECORDS, d["set"])
        assert os.path.isdir(folder), f"{folder}: run vramlab import {os.path.join(SOURCES, f)}"
        assert sorted(f for f in os.listdir(folder) if not f.startswith(".")) == \
            sorted(f"{c['id']}.json" for c in d["cases"]), f

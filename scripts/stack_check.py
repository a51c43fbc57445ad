"""Traced vs predicted, per software-stack behaviour, under the transformers this Python has.

    python3 scripts/stack_check.py                      # this Python's stack (system: transformers 5.24)
    .stacks/venv-transformers-4.40.2/bin/python scripts/stack_check.py
    python3 scripts/stack_check.py --stacks 4.40.2,5.24.0   # each in its venv (scripts/stack_venvs.sh), side by side
    ... --json                                           # the same as JSON

Behaviours (tiny models from tests/tiny_configs.py, written to a temporary config.json; nothing is
downloaded):
  loss       tiny Llama, full fine-tuning, bf16, --precision pure, batch 2 × seq 64: weights, peak
             allocated, the logits bytes at the forward peak, and the loss's fp32 tensors alive there
             (4.x: the forward's `logits.float()` copy and the loss's `shift_logits ... .contiguous()`).
  moe_lora   tiny Mixtral, LoRA all-linear: trainable parameters (and how many sit in the experts),
             weights, peak allocated.
  moe_full   tiny Mixtral, full fine-tuning: weights, peak allocated.
  moe_4bit   tiny Mixtral on the meta device through transformers' own replace_with_bnb_linear
             (BitsAndBytesConfig(load_in_4bit=True), the modules the 4-bit quantizer skips): elements
             that would be 4-bit and left in the compute dtype; weights bytes (nf4: 2 elements a byte,
             the rest bf16) against `predict --mode inference --dtype nf4`.

Predictions: `vramlab predict ... --transformers V --peft V --json` with this Python's versions; if
the predictor refuses those flags it is asked without them (and says so). A row passes within 1%
(weights, trainable parameters, element counts) or 5% (peaks, loss bytes).
"""

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

TIGHT, LOOSE = 0.01, 0.05
BASE = ["--mode", "train", "--precision", "pure", "--dtype", "bf16", "--seq", "64", "--batch", "2"]
WORKLOADS = {
    "loss": ("llama", BASE + ["--method", "full"]),
    "moe_lora": ("mixtral", BASE + ["--method", "lora", "--lora-targets", "all-linear"]),
    "moe_full": ("mixtral", BASE + ["--method", "full"]),
}
QUANT = ("mixtral", ["--mode", "inference", "--dtype", "nf4", "--seq", "64", "--batch", "2"])


def _predict(model_args, vers):
    """(predict JSON, how it was asked): with --transformers/--peft first, without them if refused."""
    from harness.cli import main

    flags = []
    for p in ("transformers", "peft"):
        if vers.get(p):
            flags += [f"--{p}", vers[p].split("+")[0]]
    for extra, how in ((flags, "with " + " ".join(flags)), ([], "without stack flags (the predictor refused them)")):
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(["predict", *model_args, *extra, "--json"])
        except SystemExit as e:
            rc = e.code
        if rc == 0:
            return json.loads(out.getvalue()), how
    raise RuntimeError(f"predict failed: {err.getvalue().strip()[-300:]}")


def _trainable_from_notes(pred):
    """Trainable parameters the prediction states: a key if it has one, else its LoRA note."""
    for key in ("trainable_params", "n_trainable"):
        if isinstance(pred.get(key), int):
            return pred[key]
    for n in pred.get("notes", []):
        m = re.search(r"([\d,]+) trainable parameters", n)
        if m:
            return int(m.group(1).replace(",", ""))
    return None


def _loss_tensors(trace):
    """The fp32 logits-sized tensors alive at the forward peak, named by what made them."""
    names = {"_to_copy": "fp32 logits copy (logits.float())", "clone": "shift copy (shift_logits.contiguous())",
             "_log_softmax": "log_softmax", "nll_loss_backward": "nll_loss grad",
             "_log_softmax_backward_data": "log_softmax grad", "mm": "logits (lm_head)"}
    out = []
    for ph in ("forward", "backward"):
        for t in trace.get("phase_tensors", {}).get(ph, []):
            if t["category"] == "logits" and t["bytes"] >= 1024:
                out.append({"phase": ph, "what": names.get(t["op"], t["op"]), "op": t["op"], "shape": t["shape"],
                            "dtype": t["dtype"], "bytes": t["bytes"]})
    return out


def _row(what, traced, predicted, tol):
    ok = None
    if isinstance(traced, (int, float)) and isinstance(predicted, (int, float)) and tol is not None:
        ok = abs(traced - predicted) <= tol * max(abs(traced), 1)
    return {"what": what, "traced": traced, "predicted": predicted, "tolerance": tol, "pass": ok}


def check_here(workdir):
    """Every behaviour under this Python's stack: {'versions', 'behaviours': {name: {rows, ...}}}."""
    import warnings

    import stack_trace as st
    from tiny_configs import write

    warnings.filterwarnings("ignore")
    import pathlib

    vers = st.versions()
    cfg = {n: write(pathlib.Path(workdir), n) for n in ("llama", "mixtral")}
    result = {"versions": vers, "behaviours": {}, "predict_asked": None}

    for name, (model, args) in WORKLOADS.items():
        margs = ["--model", cfg[model], *args]
        trace = st.cmd_trace(margs)
        pred, how = _predict(margs, vers)
        result["predict_asked"] = how
        rows = [_row("weights bytes", trace["breakdown"]["weights"], pred["breakdown"]["weights"], TIGHT),
                _row("peak allocated bytes", trace["peak_allocated_bytes"], pred["peak_allocated_bytes"], LOOSE),
                # no verdict: 4.x registers RoPE cos/sin caches in every attention layer, which no behaviour models yet
                _row("buffers bytes (info)", trace["breakdown"]["buffers"], pred["breakdown"]["buffers"], None)]
        b = {"model": model, "flags": " ".join(args), "traced_peak_phase": trace["peak_phase"],
             "predicted_peak_phase": pred["peak_phase"], "notes": [n for n in trace["notes"] if "4.x" in n]}
        if name == "loss":
            tf, pf = trace["phases"].get("forward", {}), pred["phases"].get("forward", {})
            rows.append(_row("logits bytes at the forward peak", tf.get("logits"), pf.get("logits"), LOOSE))
            rows.append(_row("forward peak bytes", sum(tf.values()), sum(pf.values()), LOOSE))
            rows.append(_row("logits bytes at the overall peak", trace["breakdown"]["logits"],
                             pred["breakdown"]["logits"], LOOSE))
            b["loss_tensors"] = _loss_tensors(trace)
        if name == "moe_lora":
            tr = st.cmd_trainable(margs)
            rows.insert(0, _row("trainable parameters", tr["trainable_params"], _trainable_from_notes(pred), TIGHT))
            b["trainable_in_experts"] = tr["trainable_params_in_experts"]
            b["lora_targets"] = tr["lora_targets"]
        b["rows"] = rows
        result["behaviours"][name] = b

    model, args = QUANT
    margs = ["--model", cfg[model], *args]
    q = st.cmd_quant(margs)
    pred, how = _predict(margs, vers)
    n = pred["n_params"]
    w = pred["breakdown"]["weights"]
    pq = round((2 * n - w) / 1.5)  # weights = q/2 + 2(n - q) bytes: nf4 elements packed two a byte, the rest bf16
    result["behaviours"]["moe_4bit"] = {
        "model": model, "flags": " ".join(args),
        "rows": [_row("4-bit elements", q["quantized_elements"], pq, TIGHT),
                 _row("compute-dtype elements", q["unquantized_elements"], n - pq, TIGHT),
                 _row("weights bytes (nf4 + bf16)", q["weights_bytes"], w, TIGHT)],
        "quantized_modules": q["quantized_modules"], "unquantized_by_tensor": q["unquantized_by_tensor"],
        "modules_not_converted": q["modules_not_converted"],
        "note": "predicted element counts are derived from its weights bytes and n_params"}
    return result


def _fmt(v):
    if v is None:
        return "—"
    return f"{v:,}" if isinstance(v, int) else str(v)


def render(results):
    """One table per behaviour, a column pair per stack."""
    lines = []
    stacks = list(results)
    names = list(results[stacks[0]]["behaviours"])
    for r in results.values():
        v = r["versions"]
        lines.append(f"stack {v['transformers']}: transformers {v['transformers']} · peft {v['peft']} · torch "
                     f"{v['torch']} · bitsandbytes {v['bitsandbytes']}; predict asked {r['predict_asked']}")
    for name in names:
        b0 = results[stacks[0]]["behaviours"][name]
        lines.append("")
        lines.append(f"{name}: tiny {b0['model']} {b0['flags']}")
        head = f"  {'':34}" + "".join(f"{'traced ' + s:>20}{'predicted':>14}{'':>6}" for s in stacks)
        lines.append(head)
        for i, row in enumerate(b0["rows"]):
            cells = ""
            for s in stacks:
                rw = results[s]["behaviours"][name]["rows"][i]
                mark = {True: "ok", False: "FAIL", None: ""}[rw["pass"]]
                cells += f"{_fmt(rw['traced']):>20}{_fmt(rw['predicted']):>14}{mark:>6}"
            lines.append(f"  {row['what']:<34}{cells}")
        for s in stacks:
            b = results[s]["behaviours"][name]
            if "traced_peak_phase" in b:
                lines.append(f"  [{s}] peak phase traced {b['traced_peak_phase']}, predicted {b['predicted_peak_phase']}")
            if "loss_tensors" in b:
                for t in b["loss_tensors"]:
                    lines.append(f"  [{s}] at the {t['phase']} peak: {t['what']:<40} {t['dtype']:>8} "
                                 f"{t['shape']!s:<16} {t['bytes']:>10,} B")
            if "trainable_in_experts" in b:
                lines.append(f"  [{s}] trainable in experts: {b['trainable_in_experts']:,}; LoRA on: "
                             f"{', '.join(b['lora_targets'])}")
            if "quantized_modules" in b:
                lines.append(f"  [{s}] 4-bit: {', '.join(f'{k}×{v}' for k, v in b['quantized_modules'].items())}; "
                             f"kept: {', '.join(f'{k} {v:,}' for k, v in b['unquantized_by_tensor'].items())}")
            for n in b.get("notes", []):
                lines.append(f"  [{s}] note: {n}")
    fails = [(s, n, rw["what"]) for s, r in results.items() for n, b in r["behaviours"].items() for rw in b["rows"]
             if rw["pass"] is False]
    lines.append("")
    lines.append("all rows within tolerance" if not fails else
                 "outside tolerance: " + "; ".join(f"[{s}] {n}: {w}" for s, n, w in fails))
    return "\n".join(lines)


def venv_python(version):
    return os.path.join(ROOT, ".stacks", f"venv-transformers-{version}", "bin", "python")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stacks", help="comma list of transformers versions, each run in its venv "
                                     "(.stacks/venv-transformers-V, from scripts/stack_venvs.sh); default: this Python")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # one stack's JSON, for --stacks
    a = ap.parse_args(argv)
    results = {}
    if a.stacks:
        for ver in [v.strip() for v in a.stacks.split(",") if v.strip()]:
            py = venv_python(ver)
            if not os.path.exists(py):
                print(f"stack_check: no venv for transformers {ver} ({py}); run scripts/stack_venvs.sh {ver}",
                      file=sys.stderr)
                return 2
            p = subprocess.run([py, os.path.abspath(__file__), "--raw"], check=False, capture_output=True, text=True,
                               cwd=ROOT)
            if p.returncode:
                print(f"stack_check: transformers {ver}: exited {p.returncode}:\n{p.stderr[-3000:]}", file=sys.stderr)
                return 1
            results[ver] = json.loads(p.stdout)
    else:
        with tempfile.TemporaryDirectory(prefix="stack_check_") as d:
            r = check_here(d)
        if a.raw:
            print(json.dumps(r))
            return 0
        results[r["versions"]["transformers"]] = r
    print(json.dumps(results, indent=1) if a.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`vramlab fit`: fit the device overheads per environment from measured records (logic in analysis/calibrate.py)."""

import os
import sys

from formulas.units import MiB

from .common import load_records_for


def _pct(v):
    return "n/a" if v is None else f"{v:.1%}"


def cmd_fit(a):
    from ..analysis.calibrate import CALIBRATION_DIR, group_by_environment
    from ..paths import prepare_folder
    from ..records import lock_folder

    out = prepare_folder(a.out if a.out is not None else CALIBRATION_DIR, "--out", create=False)
    recs = load_records_for("fit", a.records, empty_ok=True)  # "no usable measured records" below says more
    if recs is None:
        return 2
    groups = group_by_environment(recs)
    if a.env:
        groups = {k: v for k, v in groups.items() if a.env.lower() in k.lower()}
    if not groups:
        published = sum(1 for r in recs if r.get("source") == "published" and r.get("outcome") == "ok")
        if published:
            print(f"vramlab fit: {published} published records under {a.records}, none with both an allocated and a "
                  "device peak of its own (a published set states one figure per case); fit needs both to separate "
                  "the device overheads — `vramlab report` and `vramlab check` score them", file=sys.stderr)
            return 2
        print(f"vramlab fit: no usable measured records under {a.records}"
              + (f" for --env {a.env}" if a.env else "") + " (need outcome ok, source measured, device peaks)",
              file=sys.stderr)
        return 2
    lock = lock_folder(prepare_folder(out, "--out"), "fit")  # the same lock as run and import: one writer per folder
    try:
        return _fit_groups(a, groups, out)
    finally:
        os.close(lock)


def _fit_groups(a, groups, out):
    from ..analysis.calibrate import CalibrationError, fit, write_calibration

    code = 0
    for key, rs in sorted(groups.items()):
        try:
            res = fit(rs)
            path = write_calibration(res, out, records_path=a.records)
        except CalibrationError as e:  # no fit, or a table its own reader would refuse: nothing written
            print(f"vramlab fit: {key}: {e}", file=sys.stderr)
            code = 2
            continue
        except OSError as e:
            raise ValueError(f"--out {out}: cannot write the table ({e.strerror or e})") from None
        ov, q = res["overheads"], res["fit_quality"]
        print(f"{key}: {q['n_fit']} records of {q['n_models']} models → {path}")
        images = " · ".join(f"{f} {v / MiB:,.0f} MiB" for f, v in ov.kernel_images)
        shares = " · ".join(f"{m} {v:.1%}" for m, v in ov.slack_share if m != "load")
        print(f"  cuda context {ov.cuda_context_bytes / MiB:,.0f} MiB at init · kernel images: {images}")
        print(f"  allocator slack, share of the transient bytes: {shares}")
        if not res["heldout"]:
            print("  one model only: the error held out by model is not measured")
        for metric, s in sorted(res["heldout"].items()):
            print(f"  held out by model, {metric:<9} uncalibrated: median {_pct(s['median_before'])} p95 "
                  f"{_pct(s['p95_before'])} worst {s['worst_before']:+.1%} · calibrated: median "
                  f"{_pct(s['median_after'])} p95 {_pct(s['p95_after'])} worst {s['worst_after']:+.1%} (n={s['n']})")
    return code


def add_parsers(sub):
    """Register `fit`."""
    p = sub.add_parser("fit", help="fit what the environment adds (CUDA context, kernel images, allocator slack)",
                       description="Fit what the predictor cannot know about one environment — the CUDA context at "
                                   "init, the kernel images lazy loading brings in, the allocator slack's share — from "
                                   "its measured records, one environment at a time; report the error held out by "
                                   "model (each model scored by a table fitted on the others) before and after; "
                                   "write results/calibration/<environment>.csv, which predict and plan then use.")
    p.add_argument("records", help="a record file or a folder of records")
    p.add_argument("--out", default=None, help="folder for the tables (default results/calibration)")
    p.add_argument("--env", default=None, help="fit only the environment whose key contains this text")
    p.set_defaults(func=cmd_fit)

"""`vramlab fit | check | report`: argument parsing and rendering (logic in calibrate.py, check.py, report.py).

Bad input is one line on stderr naming the problem, exit status 2; `check` exits 1 on a regression.
"""

import sys

from formulas.units import MiB


def add_calibration_parsers(subparsers):
    """Register `fit`, `check` and `report` on an argparse subparsers object."""
    pf = subparsers.add_parser("fit", help="fit device overheads (context, workspace, slack, corrections) per environment",
                               description="Fit the overheads the predictor leaves open from measured records, one "
                                           "environment at a time; report held-out error before and after; write "
                                           "results/calibration/<environment>.csv.")
    pf.add_argument("records", help="a record file or a folder of records")
    pf.add_argument("--out", default=None, help="folder for the tables (default results/calibration)")
    pf.add_argument("--env", default=None, help="fit only the environment whose key contains this text")
    pf.set_defaults(func=cmd_fit)
    pc = subparsers.add_parser("check", help="compare new records with a baseline; exit 1 on a regression",
                               description="Compare experiment by experiment; a change counts only if it exceeds every "
                                           "threshold of its metric and the run-to-run spread.")
    pc.add_argument("baseline", help="baseline record file or folder")
    pc.add_argument("new", help="new record file or folder")
    pc.add_argument("--threshold", action="append", default=None,
                    help="METRIC:VALUE, repeatable, e.g. peak_device:3%% peak_device:256MiB "
                         "(metrics: peak_device, peak_allocated, peak_reserved, cuda_context; default 3%% and 256MiB each)")
    pc.add_argument("--all", action="store_true", help="list unchanged experiments too")
    pc.set_defaults(func=cmd_check)
    pr = subparsers.add_parser("report", help="HTML + Markdown report with plots: predicted vs measured, rules of thumb",
                               description="Self-contained HTML (PNGs embedded) and Markdown report of records.")
    pr.add_argument("records", help="a record file or a folder of records")
    pr.add_argument("--out", default="results/report", help="output folder (default results/report)")
    pr.set_defaults(func=cmd_report)


def _pct(v):
    return "n/a" if v is None else f"{v:.1%}"


def cmd_fit(a):
    from .calibrate import CALIBRATION_DIR, CalibrationError, fit, group_by_environment, write_calibration
    from .records import load_records_for

    recs = load_records_for("fit", a.records, empty_ok=True)  # "no usable measured records" below says more
    groups = group_by_environment(recs)
    if a.env:
        groups = {k: v for k, v in groups.items() if a.env.lower() in k.lower()}
    if not groups:
        print(f"vramlab fit: no usable measured records under {a.records}"
              + (f" for --env {a.env}" if a.env else "") + " (need outcome ok, source measured, device peaks)",
              file=sys.stderr)
        return 2
    code = 0
    for key, rs in sorted(groups.items()):
        try:
            res = fit(rs)
        except CalibrationError as e:
            print(f"vramlab fit: {key}: {e}", file=sys.stderr)
            code = 2
            continue
        path = write_calibration(res, a.out or CALIBRATION_DIR, records_path=a.records)
        ov, q = res["overheads"], res["fit_quality"]
        print(f"{key}: {q['n_fit']} fitting + {q['n_heldout']} held-out records → {path}")
        print(f"  cuda context {ov.cuda_context_bytes / MiB:,.0f} MiB · workspace {ov.workspace_bytes / MiB:,.0f} MiB · "
              f"allocator slack {ov.allocator_slack_fraction:.2%} of allocated · residual MAD {q['residual_mad_bytes'] / MiB:,.1f} MiB")
        for c, f in sorted(res["corrections"].items()):
            print(f"  correction {c} × {f:.4f}")
        if not res["heldout"]:
            print("  no held-out records: error not measured")
        for metric, s in sorted(res["heldout"].items()):
            print(f"  held-out {metric:<9} before: median {_pct(s['median_before'])} p95 {_pct(s['p95_before'])} "
                  f"worst {s['worst_before']:+.1%} · after: median {_pct(s['median_after'])} p95 {_pct(s['p95_after'])} "
                  f"worst {s['worst_after']:+.1%}")
    return code


def cmd_check(a):
    from .check import CheckError, check, is_regression, summarize

    try:
        comps = check(a.baseline, a.new, a.threshold)
    except CheckError as e:
        print(f"vramlab check: {e}", file=sys.stderr)
        return 2
    for c in comps:
        if a.all or c.status != "unchanged":
            print(c.line())
    for line in summarize(comps):
        print(line)
    if is_regression(comps):
        print("vramlab check: regression", file=sys.stderr)
        return 1
    return 0


def cmd_report(a):
    from .records import load_records_for
    from .report import write_report

    recs = load_records_for("report", a.records)
    if recs is None:
        return 2
    html, md = write_report(recs, a.out)
    print(f"{len(recs)} records → {html}, {md}")
    return 0

"""`vramlab check`: compare new records with a baseline; exit 1 on a regression (logic in analysis/check.py)."""

import sys


def cmd_check(a):
    from ..analysis.check import check, coverage_problem, is_regression, summarize

    comps = check(a.baseline, a.new, a.threshold)
    for c in comps:
        if a.all or c.status != "unchanged":
            print(c.line())
    for line in summarize(comps):
        print(line)
    unreadable = [c for c in comps if c.status == "unreadable"]
    if unreadable:
        print(f"vramlab check: cannot compare: {len(unreadable)} record file(s) cannot be read, the first "
              f"{unreadable[0].detail}", file=sys.stderr)
        return 1
    problem = coverage_problem(comps)
    if problem:
        print(f"vramlab check: cannot compare: {problem}", file=sys.stderr)
        return 1
    if is_regression(comps):
        print("vramlab check: regression", file=sys.stderr)
        return 1
    unstable = [c.spec_hash for c in comps if c.status == "unstable"]
    if unstable:
        print(f"vramlab check: cannot compare: the repeated records of {len(unstable)} experiment(s) disagree by more "
              f"than the thresholds ({', '.join(unstable[:5])})", file=sys.stderr)
        return 1
    return 0


def add_parsers(sub):
    """Register `check`."""
    p = sub.add_parser("check", help="compare new records with a baseline; exit 1 on a regression",
                       description="Compare experiment by experiment; a change counts only if it exceeds every "
                                   "threshold of its metric and the run-to-run spread.")
    p.add_argument("baseline", help="baseline record file or folder")
    p.add_argument("new", help="new record file or folder")
    p.add_argument("--threshold", action="append", default=None,
                   help="METRIC:VALUE, repeatable, e.g. peak_device:3%% peak_device:256MiB "
                        "(metrics: peak_device, peak_allocated, peak_reserved, cuda_context; default 3%% and 256MiB each)")
    p.add_argument("--all", action="store_true", help="list unchanged experiments too")
    p.set_defaults(func=cmd_check)

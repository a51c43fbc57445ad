"""`vramlab show`: one measured experiment explained — measured vs predicted per category and phase, and its memory
timeline as PNG and HTML (logic in analysis/show.py)."""

import os

from .common import load_records_for


def cmd_show(a):
    from ..analysis.show import explain, write_show

    path = a.record
    if not os.path.exists(path) and a.records and os.path.isdir(a.records):
        path = os.path.join(a.records, path if path.endswith(".json") else path + ".json")
    recs = load_records_for("show", path)
    if recs is None:
        return 2
    if len(recs) != 1:
        raise ValueError(f"{a.record}: {len(recs)} records; give one record file, or a spec hash with --records DIR")
    rec = recs[0]
    siblings = load_records_for("show", os.path.dirname(os.path.abspath(path)), empty_ok=True) or []
    ex = explain(rec, [r for r in siblings if r.get("spec_hash") != rec.get("spec_hash")])
    print("\n".join(ex["lines"]))
    if a.out:
        png, page = write_show(rec, ex, a.out)
        print(f"→ {png}, {page}")
    return 0


def add_parsers(sub):
    """Register `show`."""
    p = sub.add_parser("show", help="one measured record explained: measured vs predicted per category and phase, "
                                    "its memory timeline",
                       description="Explain one measured experiment: the tracked categories and the device levels "
                                   "(allocated, allocator slack, outside the allocator, device) against the current "
                                   "formulas' prediction in the record's environment, per phase; with --out, the "
                                   "memory timeline (NVML samples, phases, measured and predicted levels) as PNG "
                                   "and HTML.")
    p.add_argument("record", help="a record file, or a spec hash with --records")
    p.add_argument("--records", default=None, help="the folder holding the record (when RECORD is a spec hash)")
    p.add_argument("--out", default=None, help="write <spec_hash>.png and .html into this folder")
    p.set_defaults(func=cmd_show)

"""`vramlab report`: HTML and Markdown report of records (logic in analysis/report.py)."""

from .common import load_records_for


def cmd_report(a):
    from ..analysis.report import PCT, _table_md, boundary_table, category_table, write_report
    from ..paths import prepare_folder

    prepare_folder(a.out, "--out", create=False)
    recs = load_records_for("report", a.records)
    if recs is None:
        return 2
    if a.table:  # one table as Markdown on stdout (README tables), no files
        rows = category_table(recs) if a.table == "categories" else boundary_table(recs)
        print(_table_md(rows, PCT), end="")
        return 0
    try:
        html, md = write_report(recs, a.out)
    except OSError as e:
        raise ValueError(f"--out {a.out}: cannot write the report ({e.strerror or e})") from None
    print(f"{len(recs)} records → {html}, {md}")
    return 0


def add_parsers(sub):
    """Register `report`."""
    p = sub.add_parser("report", help="HTML + Markdown report with plots: predicted vs measured or traced, rules of thumb",
                       description="Self-contained HTML (PNGs embedded) and Markdown report of records: every "
                                   "prediction scored against what was measured or traced, beside rules of thumb.")
    p.add_argument("records", help="a record file or a folder of records")
    p.add_argument("--out", default="results/report", help="output folder (default results/report)")
    p.add_argument("--table", choices=("categories", "boundary"), default=None,
                   help="print one table as Markdown and write nothing: categories (measured vs predicted by "
                        "category, mode and environment) or boundary (the fit boundary searches beside vramlab plan)")
    p.set_defaults(func=cmd_report)

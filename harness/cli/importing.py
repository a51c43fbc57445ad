"""`vramlab import`: published measurement sets (results/published/sources/*.yaml) → records (harness/analysis/published.py)."""

import os
import sys

from formulas.units import GiB

from ..paths import ROOT

DEFAULT_OUT = os.path.join(ROOT, "results", "published", "records")


def _sources(paths):
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith((".yaml", ".yml")))
        elif os.path.exists(p):
            out.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    if not out:
        raise ValueError(f"{', '.join(paths)}: no measurement sets (.yaml) there")
    return out


def corpus_lines(records):
    """The corpus in one table: per ok case the published figure, the prediction and the error; the summary
    (harness.published.corpus_summary); every unsupported case with its reason."""
    from ..analysis.published import corpus_summary, observed_for_prediction

    lines, unsupported = [], []
    for r in records:
        pub = r.get("published") or {}
        name = f"{r.get('group', '')}/{pub.get('case', r['spec_hash'])}"
        if r["outcome"] != "ok":
            unsupported.append(f"  {name}: {(r.get('error') or {}).get('message', r['outcome'])}")
            continue
        o = observed_for_prediction(r)
        if o is None:
            unsupported.append(f"  {name}: no prediction")
            continue
        quantity, observed, predicted = o
        e = (predicted - observed) / observed
        lines.append(f"  {name:<58} {quantity:<9} {observed / GiB:8.2f} {predicted / GiB:10.2f} {e:+8.1%}")
    head = [f"  {'case':<58} {'against':<9} {'pub GiB':>8} {'pred GiB':>10} {'error':>8}"]
    s = corpus_summary(records)
    summary = [f"{s['all']['n']} cases predicted, {s['not_expressible']} not expressible"]
    for key, label in (("allocated", "peak allocated (allocated, trainer: what the stack's tensors take)"),
                       ("device", "device level (reserved, NVML, allocated + context: also the authors' CUDA context "
                                  "and allocator pool, which vramlab calibrates per environment)"),
                       ("all", "all")):
        t = s[key]
        if t["n"]:
            summary.append(f"  {label}: {t['n']} cases · |error| median {t['median']:.1%} · p90 {t['p90']:.1%} · "
                           f"mean {t['mean']:+.1%} · worst {t['worst']:+.1%}")
    return head + lines + ([""] + ["not expressible (listed with the reason):"] + unsupported if unsupported else []) + \
        [""] + summary


def cmd_import(a):
    from ..analysis.published import import_source
    from ..records import read_record

    files = _sources(a.sources)
    records = []
    for path in files:
        def progress(i, n, cid, rec, path=path):
            if a.verbose:
                print(f"  [{i}/{n}] {cid}: {rec['outcome']}", file=sys.stderr)
        done = import_source(path, a.out, progress=progress)
        ok = sum(1 for _, o, _ in done if o == "ok")
        print(f"{path}: {len(done)} cases → {os.path.dirname(done[0][2])} ({ok} predicted, {len(done) - ok} not expressible)")
        records += [read_record(p) for _, _, p in done]
    if not a.quiet:
        print("")
        print("\n".join(corpus_lines(records)))
    return 0


def add_parsers(sub):
    """Register `import`."""
    p = sub.add_parser("import", help="turn published measurement sets into records (source: published)",
                       description="Read measurement sets transcribed from published sources (YAML, see "
                                   "results/published/README.md) and write one record per case with source "
                                   "`published`, the citation, the stack and what was measured; print each case's "
                                   "error against the prediction. fit, check, report and results read the records.")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="measurement-set .yaml files or folders of them")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="folder for the records, one subfolder per set (default results/published/records)")
    p.add_argument("--quiet", action="store_true", help="only the one line per set")
    p.add_argument("--verbose", action="store_true", help="progress per case on stderr")
    p.set_defaults(func=cmd_import)

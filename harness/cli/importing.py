"""`vramlab import`: published measurement sets (results/published/sources/*.yaml) → records (harness/analysis/published.py)."""

import os
import sys

from formulas.units import GiB

from ..paths import ROOT

DEFAULT_OUT = os.path.join(ROOT, "results", "published", "records")


def _sources(paths):
    """The measurement-set files named (a folder: its .yaml/.yml files), and what a folder holds under such a name
    that is no file (skipped, with a word)."""
    out, skipped = [], []
    for p in paths:
        if os.path.isdir(p):
            for f in sorted(os.listdir(p)):
                full = os.path.join(p, f)
                if f.endswith((".yaml", ".yml")):
                    (out if os.path.isfile(full) else skipped).append(full)
        elif os.path.lexists(p):
            out.append(p)  # named: read as asked, and refused in one line if it is no file
        else:
            raise ValueError(f"{p}: no such file or folder")
    if not out:
        raise ValueError(f"{', '.join(paths)}: no measurement sets (.yaml) there")
    return out, skipped


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
    """Check every set first (nothing is printed or written while one is bad), then write each set's records holding its
    folder's lock, then print."""
    from ..analysis.published import ImportPlan, PublishedError
    from ..paths import prepare_folder
    from ..records import lock_folder, read_record

    files, skipped = _sources(a.sources)
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise ValueError(f"--out {a.out}: is a file, not a folder")
    plans = [ImportPlan(path, a.out) for path in files]
    taken = {}
    for plan in plans:
        for cid, _, target in plan.cases:
            if target in taken:
                raise PublishedError(f"{plan.path}: case {cid}: {taken[target]} has a case {cid} in set {plan.set} too; "
                                     "one record cannot be both")
            taken[target] = plan.path
    prepare_folder(a.out, "--out")
    locks = []
    try:
        for folder in sorted({p.out_dir for p in plans}):
            prepare_folder(folder, "--out")
            locks.append(lock_folder(folder, "import"))
        for f in skipped:
            print(f"vramlab import: skipped {f}: not a file", file=sys.stderr)
        records = []
        for plan in plans:
            def progress(i, n, cid, rec):
                if a.verbose:
                    print(f"  [{i}/{n}] {cid}: {rec['outcome']}", file=sys.stderr)
            try:
                done = plan.write(prune=a.prune, progress=progress)
            except OSError as e:
                raise ValueError(f"--out {a.out}: cannot write the records of {plan.path} ({e.strerror or e}); those "
                                 "written so far are kept") from None
            ok = sum(1 for _, o, _ in done if o == "ok")
            print(f"{plan.path}: {len(done)} cases → {plan.out_dir} ({ok} predicted, {len(done) - ok} not expressible)")
            if plan.stale:
                names = ", ".join(os.path.basename(p) for p in plan.stale)
                print(f"  {len(plan.stale)} record(s) of cases no longer in {plan.source_file} "
                      + (f"removed (--prune): {names}" if a.prune else f"kept: {names} (--prune removes them)"))
            records += [read_record(p) for _, _, p in done]
    finally:
        for fd in locks:
            os.close(fd)
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
    p.add_argument("--prune", action="store_true",
                   help="remove the set's records of cases no longer in its file (without it they are kept and listed); "
                        "records of other sets and sources are never touched")
    p.add_argument("--quiet", action="store_true", help="only the one line per set")
    p.add_argument("--verbose", action="store_true", help="progress per case on stderr")
    p.set_defaults(func=cmd_import)

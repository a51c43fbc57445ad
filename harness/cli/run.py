"""`vramlab run` and `vramlab results`: run a sweep (measure on GPUs, or trace without one) and read its records."""

import argparse
import os
import signal
import sys

from formulas.units import GiB

from .common import load_records_for


def _shard(text):
    try:
        k, n = (int(x) for x in text.split("/"))
        if not 1 <= k <= n:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected K/N with 1 ≤ K ≤ N, e.g. 2/3") from None
    return k, n


def _gpu_indices(text):
    try:
        gpus = [int(x) for x in text.split(",")]
        if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct GPU indices, e.g. 0,1") from None
    return gpus


def _at_least(minimum):
    def parse(text):
        try:
            value = int(text)
            if value < minimum:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number ≥ {minimum}") from None
        return value
    return parse


# The flags that belong to one launcher: (flag, attribute, launcher).
_LAUNCHER_FLAGS = (("--slurm-partition", "slurm_partition", "slurm"), ("--slurm-time", "slurm_time", "slurm"),
                   ("--slurm-gpus-per-task", "slurm_gpus_per_task", "slurm"),
                   ("--slurm-cluster", "slurm_cluster", "slurm"), ("--address", "address", "ray"),
                   ("--gpus", "gpus", "local"), ("--jobs", "jobs", "local"))


def _launcher_settings(a):
    """The settings of `--launcher slurm|ray`: its flags over the sweep file's `launcher:` block."""
    from ..sweep.schema import load_launcher_settings

    for flag, attr, launcher in _LAUNCHER_FLAGS:
        if getattr(a, attr) is not None and launcher != a.launcher:
            raise ValueError(f"{flag}: only with --launcher {launcher}" + (" (Slurm and Ray place the experiments)"
                                                                           if launcher == "local" else ""))
    if a.launcher == "local":
        return {}
    flags = {"partition": a.slurm_partition, "time_min": a.slurm_time, "gpus_per_task": a.slurm_gpus_per_task,
             "cluster": a.slurm_cluster} if a.launcher == "slurm" else {"address": a.address}
    settings = load_launcher_settings(a.sweep).get(a.launcher, {})
    return {**settings, **{k: v for k, v in flags.items() if v is not None}}


def _only(text):
    """--only FIELD=VALUE → (field, value as written)."""
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD=VALUE, e.g. mode=train or alloc_conf= (empty: "
                                         "the default)")
    return field.strip(), value.strip()


def select(exps, only):
    """The experiments whose fields match every (field, value) of --only: a spec field, a run field or group;
    values compared as written (true/false for flags, '' for an empty field); several values of one field: any."""
    from dataclasses import fields as dc_fields

    from formulas.spec import Spec

    from ..sweep.schema import RUN_FIELDS

    known = {f.name for f in dc_fields(Spec)} | set(RUN_FIELDS) | {"group"}
    wanted = {}
    for field, value in only:
        if field not in known:
            raise ValueError(f"--only {field}={value}: {field!r} is not a field of an experiment (a spec field, a run "
                             "field such as alloc_conf or cap_gpu, or group)")
        wanted.setdefault(field, set()).add(value)

    def text(v):
        return str(v).lower() if isinstance(v, bool) else ",".join(v) if isinstance(v, tuple) else str(v)

    def get(e, field):
        return getattr(e.spec, field) if hasattr(e.spec, field) else getattr(e, field)

    return [e for e in exps if all(text(get(e, f)) in vs for f, vs in wanted.items())]


def cmd_run(a):
    from ..gpu import nvml
    from ..records import check_unlocked
    from ..sweep.launcher import (
        default_out_dir,
        measured_elsewhere,
        order_experiments,
        prepare_out_dir,
        run_sweep,
    )
    from ..sweep.schema import MAX_EXPERIMENTS, load_sweep

    name, exps = load_sweep(a.sweep, limit=None if a.yes else MAX_EXPERIMENTS)
    searches = exps.searches
    settings = _launcher_settings(a)
    if a.only:
        exps = select(exps, a.only)
        searches = [s for s in searches if select([s.base], a.only)]
    if a.shard:
        k, n = a.shard
        exps = exps[k - 1::n]
        searches = searches[k - 1::n]
    mode = a.mode
    if mode == "auto" and a.launcher != "local" and not a.dry_run:
        raise ValueError(f"--launcher {a.launcher}: give --mode explicitly "
                         "(auto looks for a GPU here, but the experiments run on the cluster's nodes)")
    if mode == "auto":
        mode = "measure" if nvml.device_count() > 0 else "trace"
        if mode == "trace" and not a.dry_run:
            print("vramlab run: no NVIDIA GPU found — tracing the experiments on fake tensors instead of measuring",
                  file=sys.stderr)
    if searches:  # each search starts from `vramlab plan --gpu CAP`'s answer, with the overheads plan would use
        from ..analysis.calibrate import overheads_for

        for sr in searches:
            sr.overheads = overheads_for(sr.base.cap_gpu) if sr.base.cap_gpu else None
    out = a.out if a.out is not None else default_out_dir(name, mode)
    if a.order != "file":
        exps = order_experiments(exps, a.order, measured_elsewhere(os.path.dirname(os.path.abspath(out)), skip=out))
    if a.dry_run:
        from formulas.predict import predict

        print(f"{name}: {len(exps)} experiments ({mode})" + (f" and {len(searches)} boundary searches" if searches else ""))
        for e in exps:
            p = predict(e.spec)
            print(f"{e.spec_hash}  {e.label():70s} {p.peak_allocated_bytes / GiB:8.2f} GiB predicted allocated "
                  f"{p.peak_device_bytes / GiB:8.2f} GiB predicted device  {p.peak_phase}")
        for sr in searches:
            print(f"search  {sr.label()}: vramlab plan says {sr.predicted()}, first probe {sr.next_value()}")
        return 0
    backend = None
    if a.launcher == "local":
        if mode == "measure" and not nvml.available():
            raise ValueError("--mode measure: needs an NVIDIA GPU and driver (NVML not available)")
        if mode == "rehearse" and a.gpus:
            raise ValueError("--gpus with --mode rehearse: a rehearsal runs on the CPU; give --jobs (CPU workers) instead")
    else:
        from ..sweep.backends import make_backend, run_on

        if searches:
            raise ValueError(f"--launcher {a.launcher}: the sweep's search groups probe one value after another; run "
                             "them with the local launcher (or leave them out: --only group=NAME)")
        if mode == "measure" and a.out is None:
            raise ValueError(f"--launcher {a.launcher} --mode measure: give --out, a folder every node can write "
                             "(the default is named after this machine's GPU)")
        backend = make_backend(a.launcher, mode, settings, job_name=f"vramlab-{name}")  # its package, its cluster
    prepare_out_dir(out)
    check_unlocked(out)  # another writer: one line, before anything is printed
    print(f"{name}: {len(exps)} experiments" + (f" and {len(searches)} boundary searches" if searches else "")
          + f" → {out}", file=sys.stderr)
    if backend is None:
        s = run_sweep(exps, out, gpus=a.gpus, mode=mode, retry=a.retry, progress=not a.no_progress,
                      warm=a.process == "warm", jobs=a.jobs or min(4, os.cpu_count() or 1), searches=searches)
    else:
        s = run_on(backend, exps, out, mode=mode, retry=a.retry, progress=not a.no_progress)
    parts = ", ".join(f"{k} {v}" for k, v in sorted(s.outcomes.items()))
    print(f"{name}: ran {s.ran}, skipped {s.skipped} already recorded" + (f" ({parts})" if parts else "")
          + (f"; {s.fresh_processes} warm reset(s) fell back to a fresh process" if s.fresh_processes else "")
          + (f"; moved {len(s.corrupt_moved)} unreadable record(s) aside" if s.corrupt_moved else "")
          + (f"; left {len(s.newer)} record(s) written by a newer vramlab as they are (not rerun)" if s.newer else ""))
    if s.busy:
        print(f"vramlab run: {len(s.busy)} experiment(s) still being recorded by a process of an earlier run, not "
              f"started: {', '.join(s.busy[:5])}{' …' if len(s.busy) > 5 else ''}; run the same command again once "
              "they finish", file=sys.stderr)
    for sr in searches:
        r = sr.result()
        state = ("settled" if r["done"] else r["stopped"] or "not finished: run the same command to go on")
        print(f"  search {sr.label()}: largest that ran {r['largest_ok']}, smallest out of memory {r['smallest_oom']} "
              f"({r['probes']} probes; {state})")
    if s.interrupted:
        print(f"vramlab run: stopped by {s.signal} — records written so far are kept; run the same command to resume",
              file=sys.stderr)
        return 128 + getattr(signal, s.signal, signal.SIGINT)
    return 0


# The table `vramlab results` prints: (column, heading); byte columns are shown in GiB.
RESULT_COLUMNS = (("spec_hash", "spec_hash"), ("model", "model"), ("mode", "mode"), ("method", "method"),
                  ("dtype", "dtype"), ("batch", "batch"), ("seq", "seq"), ("gpus", "gpus"), ("source", "source"),
                  ("outcome", "outcome"),
                  ("predicted_peak_allocated_bytes", "predicted alloc GiB"),
                  ("traced_peak_allocated_bytes", "traced alloc GiB"),
                  ("rehearsed_peak_allocated_bytes", "rehearsed alloc GiB"),
                  ("measured_peak_allocated_bytes", "measured alloc GiB"),
                  ("published_peak_allocated_bytes", "published alloc GiB"),
                  ("published_peak_reserved_bytes", "published reserved GiB"),
                  ("predicted_peak_device_bytes", "predicted device GiB"),
                  ("calibrated_peak_device_bytes", "calibrated device GiB"),
                  ("measured_peak_device_bytes", "measured device GiB"),
                  ("published_peak_device_bytes", "published device GiB"),
                  ("published_peak_allocated_context_bytes", "published alloc+context GiB"))


def cmd_results(a):
    import pandas as pd

    from ..analysis.calibrate import calibration_for_environment, load_calibration
    from ..analysis.frame import records_frame

    if a.csv and a.csv != "-":
        from ..paths import check_output_file

        check_output_file(a.csv, "--csv")
    lookup = calibration_for_environment
    if a.calibration:
        cal = load_calibration(a.calibration)
        lookup = lambda key: cal  # noqa: E731  (one table for every record)
    recs = load_records_for("results", a.path)
    if recs is None:
        return 2
    df = records_frame(recs, lookup)
    if a.csv:
        try:
            df.to_csv(a.csv if a.csv != "-" else sys.stdout, index=False)
        except OSError as e:
            raise ValueError(f"--csv {a.csv}: cannot write it ({e.strerror or e})") from None
        if a.csv != "-":
            print(f"{len(df)} records → {a.csv}", file=sys.stderr)
        return 0
    cols = [c for c, _ in RESULT_COLUMNS if not c.endswith("_bytes") or df[c].notna().any()]
    view = df[cols].copy()
    for c in cols:
        if c.endswith("_bytes"):
            view[c] = view[c].map(lambda v: "" if pd.isna(v) else f"{v / GiB:.2f}")
    view.columns = [dict(RESULT_COLUMNS)[c] for c in cols]
    print(view.to_string(index=False))
    return 0


def add_parsers(sub):
    """Register `run` and `results`."""
    p = sub.add_parser("run", help="run a sweep: measure on GPUs, or trace without one",
                       description="Run every experiment of a sweep file not yet recorded, one process per experiment; "
                                   "rerun the same command to resume.")
    p.add_argument("sweep", help="experiments/NAME.yaml")
    p.add_argument("--gpus", type=_gpu_indices, default=None,
                   help="comma list of GPU indices to run on in parallel (default: GPU 0); an experiment of "
                        "`gpus: N` takes N of them at once")
    p.add_argument("--out", default=None, help="record folder (default results/runs/<sweep>/<gpu-driver>)")
    p.add_argument("--mode", default="auto", choices=("auto", "measure", "trace", "rehearse"),
                   help="measure on an NVIDIA GPU, trace on fake tensors (CPU), rehearse on real CPU tensors "
                        "(multi-GPU experiments as gloo ranks; figures under `rehearsed`), or auto: measure where a "
                        "GPU is found, else trace")
    p.add_argument("--process", default="warm", choices=("warm", "cold"),
                   help="warm: one long-lived worker per GPU, reset and checked between experiments (default); "
                        "cold: a fresh process per experiment")
    p.add_argument("--jobs", type=_at_least(1), default=None,
                   help="tracing or rehearsing: CPU workers at once (default: the CPU count, at most 4); a "
                        "rehearsed experiment of N ranks takes N of them (all, if fewer)")
    p.add_argument("--launcher", default="local", choices=("local", "slurm", "ray"),
                   help="local: worker processes on this machine (default); slurm: a Slurm job array through "
                        "submitit; ray: Ray tasks. With slurm and ray each experiment is a task of its own, in a "
                        "fresh process (--process does not apply); settings also come from the sweep file's "
                        "`launcher:` block, and flags win")
    p.add_argument("--slurm-partition", default=None, help="--launcher slurm: the partition (default: Slurm's)")
    p.add_argument("--slurm-time", type=_at_least(1), default=None, metavar="MIN",
                   help="--launcher slurm: each task's time limit in minutes (default: the longest experiment "
                        "timeout + 5)")
    p.add_argument("--slurm-gpus-per-task", type=_at_least(0), default=None, metavar="N",
                   help="--launcher slurm: GPUs per task (default: the experiment's `gpus` when measuring, "
                        "else 0)")
    p.add_argument("--slurm-cluster", default=None, choices=("auto", "slurm", "local"),
                   help="--launcher slurm: auto (Slurm, where sbatch is on PATH; default), or local: the same jobs "
                        "as processes on this machine (submitit's local executor)")
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="--launcher ray: a running cluster's address, or auto (default: start a local one)")
    p.add_argument("--dry-run", action="store_true", help="list the experiments and their predictions; run nothing")
    p.add_argument("--shard", type=_shard, default=None,
                   help="run every N-th experiment (and boundary search) starting at K (K/N)")
    p.add_argument("--only", type=_only, action="append", default=None, metavar="FIELD=VALUE",
                   help="run only the experiments whose FIELD has VALUE (a spec field, a run field or group; "
                        "repeatable: every field must match, several values of one field any), e.g. mode=train, "
                        "alloc_conf= (the default allocator) or alloc_conf=expandable_segments:True")
    p.add_argument("--order", default="file", choices=("file", "unmeasured"),
                   help="file: the sweep file's order (default); unmeasured: experiments no environment has measured "
                        "yet first (ok records in the sweep's other folders beside --out), training before "
                        "inference — for a short GPU window")
    p.add_argument("--retry", action="store_true", help="rerun experiments whose record is an error/timeout/crash")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--yes", action="store_true", help="run a sweep of more than 10,000 experiments")
    p.set_defaults(func=cmd_run)
    r = sub.add_parser("results", help="records as a table or CSV, every figure named by its source",
                       description="One row per experiment: predicted_*, calibrated_*, traced_* and measured_* "
                                   "figures, empty where that source has none.")
    r.add_argument("path", help="a record file or a folder of records")
    r.add_argument("--csv", default=None, help="write CSV to this file (- for stdout)")
    r.add_argument("--calibration", default=None,
                   help="table for the calibrated_* columns (default: the one fitted in each record's environment)")
    r.set_defaults(func=cmd_results)

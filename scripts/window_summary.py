"""What one GPU window measured, from the records it wrote: for scripts/gpu_calibration.sh's summary.txt.

    python3 scripts/window_summary.py RUNS ENV_FOLDER SINCE_EPOCH

Per sweep folder RUNS/<sweep>/<ENV_FOLDER>: the records written since SINCE_EPOCH by outcome and mode, and over
the ok measured ones of the warm mode the median seconds per experiment (the record's own total_s), workload,
build and tracker replay, the sampler's overhead (its CPU time over the workload) and the ops the tracker counted.
First experiments of a process (imports, CUDA start, first model class) are counted apart: the window pays them
once per worker.
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.records import iter_records, record_files  # noqa: E402


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def summarize(runs, env_folder, since):
    lines, fresh_all, warm_all = [], [], []
    for sweep in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        folder = os.path.join(runs, sweep, env_folder)
        if not os.path.isdir(folder):
            continue
        new = {f for f in record_files(folder) if os.path.getmtime(f) >= since}
        recs = [r for r in iter_records(folder) if os.path.join(folder, f"{r['spec_hash']}.json") in new]
        if not recs:
            continue
        counts = {}
        for r in recs:
            key = f"{(r.get('spec') or {}).get('mode', '?')} {r['outcome']}"
            counts[key] = counts.get(key, 0) + 1
        probes = sum(1 for r in recs if r.get("search"))
        twins = sum(1 for r in recs if r.get("alloc_conf"))
        lines.append(f"{sweep}: {len(recs)} new records ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}"
                     f"; {probes} boundary probes, {twins} with an alloc_conf)")
        for r in recs:
            m = r.get("measured") or r.get("traced") or {}
            proc = m.get("process") or {}
            if r["outcome"] != "ok":
                continue
            (fresh_all if proc.get("experiment_in_process", 1) == 1 else warm_all).append(r)
    for name, recs in (("warm", warm_all), ("first in a process", fresh_all)):
        if not recs:
            continue
        t = [r.get("timings") or {} for r in recs]
        m = [r.get("measured") or {} for r in recs]
        lines.append(
            f"{name}: {len(recs)} ok records, median total {_fmt(_median(x.get('total_s') for x in t), '.2f')} s "
            f"(workload {_fmt(_median(x.get('workload_s') for x in t), '.2f')} s, build "
            f"{_fmt(_median(x.get('build_s') for x in t), '.2f')} s, replay {_fmt(_median(x.get('replay_s') for x in t), '.2f')} s), "
            f"sampler overhead {_fmt(_median((x.get('sampler') or {}).get('overhead_fraction') for x in m), '.2%')}, "
            f"tracked ops {_fmt(_median((x.get('tracked') or {}).get('n_ops') for x in m), ',.0f')}")
    return lines or ["no new records"]


if __name__ == "__main__":
    runs, env_folder, since = sys.argv[1], sys.argv[2], float(sys.argv[3])
    print("\n".join(summarize(runs, env_folder, since)))

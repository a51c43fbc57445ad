"""Experiments in a process of their own → one record file each.

    python -m harness.sweep.worker --out DIR --mode measure|trace|rehearse '<experiment JSON>'   # cold: one experiment
    python -m harness.sweep.worker --out DIR --mode measure|trace|rehearse --warm                 # warm: many, one per line

measure: on an NVIDIA GPU (harness.gpu.measure), figures under the record's `measured`;
trace: fake tensors on the CPU (harness.tracing), figures under `traced`; rehearse: real tensors
on the CPU counted by the category tracker, a multi-GPU experiment's ranks as processes over gloo,
figures under `rehearsed` (never `measured`: no GPU was involved). An experiment with `gpus` > 1 is
measured or rehearsed by its ranks under torchrun (harness.sweep.ranks), in a cold worker of its own
that holds all its GPUs. An out-of-memory error is a result (outcome `oom`, with what was measured
before it), not a crash.

Cold: the experiment is the last argument; the exit code is its status (0 ok, 10 oom, 11 error,
12 unsupported; 13 timeout and 14 crashed, of a multi-rank experiment's ranks). Warm: the launcher
writes one JSON message per line on stdin,
{"experiment": {...}, "fallback": why a fresh process was started, or null}, and the worker
answers each on its protocol stream (the original stdout; everything printed goes to stderr)
with {"spec_hash", "outcome"} after writing the record. Before every experiment but the first it
frees the last one's memory and checks the GPU is back where it began
(`harness.gpu.measure.reset_between_experiments`); if not, it answers {"spec_hash", "restart":
true, "reason"} and exits, and the launcher runs the experiment in a fresh process, saying so
in the record. Either way the worker dies with its launcher (Linux: PR_SET_PDEATHSIG).
"""

import argparse
import gc
import json
import os
import sys
import time
import traceback

from ..env import fingerprint
from ..records import new_record, write_record
from .ranks import RanksFailed, die_with, run_ranks
from .schema import Experiment

EXIT = {"ok": 0, "oom": 10, "error": 11, "unsupported": 12, "timeout": 13, "crashed": 14}
SOURCE = {"measure": "measured", "trace": "traced", "rehearse": "rehearsed"}  # the mode → the record key of its figures


class Unsupported(Exception):
    """This experiment cannot run in this mode (e.g. bitsandbytes layers under fake tensors)."""


def die_with_launcher():
    """Ask the kernel to SIGKILL this process when the launcher that started it dies; exit now if it
    already has. The launcher names itself in VRAMLAB_LAUNCHER_PID; without it, nothing is done."""
    parent = os.environ.get("VRAMLAB_LAUNCHER_PID")
    if parent:
        die_with(int(parent))


def run_one(exp, mode, process):
    """The figures of one experiment in this mode (the record's `traced`, `measured` or `rehearsed` part)."""
    if getattr(exp, "engine", ""):  # an inference engine, run on the CPU whatever the mode (harness/engines)
        from ..engines.llamacpp import run_experiment

        try:
            return run_experiment(exp)
        except (ImportError, NotImplementedError) as e:
            raise Unsupported(f"engine {exp.engine}: {e}") from e
    if mode == "rehearse" or (mode == "measure" and exp.spec.gpus > 1):
        from formulas.spec import SpecError

        try:
            return run_ranks(exp, mode, process)
        except (NotImplementedError, SpecError) as e:
            raise Unsupported(str(e)) from e
    if mode == "measure" and os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") != exp.alloc_conf:
        # the allocator reads its settings once per process: measuring under others would mislabel the record
        raise RuntimeError(f"alloc_conf: the experiment asks PYTORCH_CUDA_ALLOC_CONF={exp.alloc_conf!r}, this worker "
                           f"runs with {os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r} (run it with `vramlab run`, "
                           "which starts the worker with the experiment's setting)")
    if mode == "trace":
        from ..tracing.tracer import trace

        try:
            result = trace(exp.spec)
        except (ValueError, NotImplementedError) as e:
            raise Unsupported(str(e)) from e
        d = result.to_dict()
        keep = ("peak_allocated_bytes", "peak_phase", "breakdown", "phases", "estimated_reserved_bytes",
                "estimated_max_allocated_bytes", "device_breakdown", "n_params", "seconds")
        return {**{k: d[k] for k in keep}, "process": process}
    from ..gpu.measure import measure

    try:
        return measure(exp, process)
    except NotImplementedError as e:
        raise Unsupported(str(e)) from e


def run_and_record(exp, out, mode, process):
    """Run one experiment and write its record; returns the outcome."""
    from ..gpu.measure import MeasuredOOM, is_oom, oom_details

    t0 = time.perf_counter()
    source = SOURCE[mode]
    record = new_record(exp, source)
    figures = error = None
    try:
        figures, outcome = run_one(exp, mode, process), "ok"
    except Unsupported as e:
        outcome, error = "unsupported", {"type": "Unsupported", "message": str(e)}
    except MeasuredOOM as e:  # what was measured before the OOM is kept
        outcome, figures, error = "oom", e.measured, e.details
    except RanksFailed as e:  # a multi-rank experiment: the error names the rank; what the others measured is kept
        outcome, figures, error = e.outcome, e.figures, e.error
    except Exception as e:  # any other error is recorded too
        if is_oom(e):
            outcome, error = "oom", oom_details(e)
        else:
            outcome, error = "error", {
                "type": type(e).__name__, "message": str(e)[:2000], "traceback": traceback.format_exc()[-4000:]}
    env = fingerprint(_nvml_index(mode))
    if mode == "rehearse":  # whatever GPU the machine has, this ran on the CPU
        env.update(gpu=None, device="cpu")
    if getattr(exp, "engine", ""):  # the engine's logged buffers, measured on the CPU: under `engine`, never `measured`
        record["engine"], record["source"], figures = figures, "engine", None
        env.update(gpu=None, device="cpu")
    record.update({source: figures, "outcome": outcome, "error": error,
                   "timings": {"total_s": round(time.perf_counter() - t0, 3), **((figures or {}).get("timings") or {})},
                   "env": env})
    write_record(out, record)
    return outcome


def _nvml_index(mode):
    """The NVML index the measurement used (corrected by UUID where it had to be), else the launcher's."""
    if mode != "measure":
        return 0
    from ..gpu.measure import _PROCESS, nvml_index

    return _PROCESS.get("index", nvml_index())


def _process(mode_name, n, fallback=None, reset=None):
    """Which process ran an experiment: cold or warm, its place in the process, why it is a fresh one."""
    p = {"pid": os.getpid(), "mode": mode_name, "experiment_in_process": n, "fallback": fallback, "reset": reset}
    if n == 1 and os.environ.get("VRAMLAB_IDLE"):  # the launcher's wait for an idle GPU before starting it
        p["idle"] = json.loads(os.environ["VRAMLAB_IDLE"])
    return p


def serve(out, mode, requests, replies):
    """Warm: run the experiments read from `requests` one by one, answering each on `replies`."""
    n = 0
    dirty = None  # why the next experiment cannot run in this process
    for line in requests:
        if not line.strip():
            continue
        msg = json.loads(line)
        exp = Experiment.from_dict(msg["experiment"])
        reset = None
        if n and not dirty:
            gc.collect()
            if mode == "measure":
                try:
                    from ..gpu.measure import reset_between_experiments

                    reset = reset_between_experiments()
                except Exception as e:  # a CUDA error left by the last experiment: this one starts afresh
                    dirty = f"the reset after {n} experiment(s) failed: {type(e).__name__}: {str(e)[:200]}"
                else:
                    if not reset["clean"]:
                        dirty = (f"after {n} experiment(s) the caching allocator still held "
                                 f"{reset['allocated_bytes']:,} bytes allocated, {reset['reserved_bytes']:,} reserved")
        if dirty:
            replies.write(json.dumps({"spec_hash": exp.spec_hash, "restart": True, "reason": dirty}) + "\n")
            replies.flush()
            return 0
        n += 1
        outcome = run_and_record(exp, out, mode, _process("warm", n, msg.get("fallback"), reset))
        if mode == "measure" and exp.spec.mode == "train" and exp.spec.optimizer == "paged_adamw8bit":
            # bitsandbytes keeps paged state in CUDA managed memory for the life of the process
            # (GlobalPageManager), outside the caching allocator: the next experiment needs a fresh process.
            dirty = "the previous experiment's paged optimizer state (CUDA managed memory) stays until the process ends"
        replies.write(json.dumps({"spec_hash": exp.spec_hash, "outcome": outcome}) + "\n")
        replies.flush()
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="harness.sweep.worker")
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=tuple(SOURCE), required=True)
    ap.add_argument("--warm", action="store_true", help="run the experiments sent on stdin, one JSON per line")
    ap.add_argument("experiment", nargs="?", help="cold: the experiment as JSON")
    a = ap.parse_args(argv)
    die_with_launcher()
    if a.warm:
        replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # the protocol keeps stdout; prints go to stderr
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        sys.stdout = sys.stderr
        return serve(a.out, a.mode, sys.stdin, replies)
    if not a.experiment:
        ap.error("give the experiment as JSON, or --warm")
    exp = Experiment.from_dict(json.loads(a.experiment))
    return EXIT[run_and_record(exp, a.out, a.mode, _process("cold", 1))]


if __name__ == "__main__":
    sys.exit(main())

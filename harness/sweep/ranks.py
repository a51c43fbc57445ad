"""Multi-rank experiments: one process per rank under torchrun, one record for the experiment.

An experiment with `gpus: N` (DDP, ZeRO-1, FSDP2 or tensor parallelism: harness.workload.parallel)
runs as N processes. The worker (harness.sweep.worker) starts, in a session of its own,

    python -m harness.sweep.ranks agent --standalone --nproc-per-node N --module harness.sweep.ranks \\
        rank --dir D --device cuda|cpu '<experiment JSON>'

`agent` is torchrun (`torch.distributed.run`, a standalone rendezvous on a free port) made to die with
the worker; each `rank` process builds the model, applies the spec's strategy and runs the workload
with the measurement one GPU gets (harness.gpu.measure, NCCL) — or, rehearsing on the CPU
(`vramlab run --mode rehearse`), the category tracker on real CPU tensors over gloo — and writes
`rank<r>.json` into the temporary folder D. The worker combines the files into the record's figures
(`combine`): every rank's under `ranks`, and at the top level those of the rank that needs the most
(peak device bytes where every rank has them, else peak allocated), so fit, check, report and
results read a multi-GPU record as they read any other.

Failures: a rank that raises writes `rank<r>.error.json` and exits non-zero; torchrun stops the
others (SIGTERM), and the agent writes the exit status of every rank that failed (`failures.json`).
The worker then kills torchrun's process group and every rank's (torchrun starts each rank in a
session of its own) and raises RanksFailed naming the rank that failed first: `crashed` for one
killed by a signal other than torchrun's SIGTERM (the root cause whenever there is one: its peers'
errors follow from it), else `oom`, `unsupported` or `error` for the first that raised; `timeout`
when the ranks outlive the experiment's timeout. Every process dies with its parent
(PR_SET_PDEATHSIG): rank → agent → worker → launcher.

Test hook: VRAMLAB_TEST_RANK_FAULT="<rank>:<phase>:kill|raise" makes that rank SIGKILL itself, or
raise, as that phase begins (CPU rehearsal only).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from ..paths import ROOT

GRACE_S = 3.0  # the ranks are stopped this long before the experiment's timeout, to kill them and write the record
TAIL_CHARS = 4000
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
BNB_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "lion")
# What each rank keeps under the record's `ranks` (the top level has the peak rank's full figures).
RANK_FIELDS = ("rank", "device", "pid", "nvml_index", "peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes",
               "peak_phase", "cuda_context_bytes", "device_figures_flagged", "breakdown", "device_breakdown", "phases",
               "estimated_reserved_bytes")


class RanksFailed(Exception):
    """A multi-rank experiment that did not finish: its outcome, the error naming the rank, what the ranks measured."""

    def __init__(self, outcome, error, figures=None):
        super().__init__(error["message"])
        self.outcome, self.error, self.figures = outcome, error, figures


# ------------------------------------------------------------------ the worker's side

def check_runnable(spec, device):
    """NotImplementedError or SpecError (one line) for what a multi-rank run cannot build, before a process starts."""
    from formulas.catalog import get_shape
    from formulas.spec import is_quantized

    from ..workload.parallel import strategy_of

    if spec.layer_split:
        why = ("a CPU rehearsal has one device" if device == "cpu" else
               "one process over several GPUs (accelerate device_map) is not measured yet")
        raise NotImplementedError(f"layer_split over {spec.gpus} GPUs: {why}")
    strategy_of(spec)  # SpecError for what harness.workload.parallel does not build
    if spec.precision == "master" and spec.zero < 2:
        raise NotImplementedError(f"precision master with zero {spec.zero}: fp32 master weights are built with FSDP2 "
                                  "(zero 2 or 3); give precision: amp or pure")
    kv = get_shape(spec.model).n_kv_heads
    if spec.tp > 1 and kv % spec.tp:
        raise NotImplementedError(f"tp {spec.tp}: transformers' plan splits the {kv} KV heads column-wise; tp must "
                                  "divide them")
    if spec.gpus > 1 and spec.optimizer in BNB_OPTIMIZERS:
        raise NotImplementedError(f"optimizer {spec.optimizer}: multi-rank runs build torch's optimizers "
                                  "(adamw, sgd, sgd_momentum, adafactor)")
    if device == "cpu" and (spec.method == "qlora" or is_quantized(spec.dtype) or spec.optimizer in BNB_OPTIMIZERS):
        what = f"optimizer {spec.optimizer}" if spec.optimizer in BNB_OPTIMIZERS else f"dtype {spec.dtype}"
        raise NotImplementedError(f"{what}: a CPU rehearsal runs float dtypes and torch optimizers "
                                  "(bitsandbytes and quantized kernels need a GPU)")


def run_ranks(exp, mode, process):
    """The figures of a multi-rank experiment (the record's `measured` or `rehearsed`); RanksFailed if it did not finish.

    mode `measure`: N ranks on the N GPUs in CUDA_VISIBLE_DEVICES, NCCL; `rehearse`: N ranks on the CPU,
    gloo (one rank runs in this process, without torchrun)."""
    from formulas.catalog import get_shape
    from formulas.spec import validate

    device = "cuda" if mode == "measure" else "cpu"
    spec = validate(exp.spec, get_shape(exp.spec.model))
    check_runnable(spec, device)
    if spec.gpus == 1:
        return combine([{"rank": 0, **rank_figures(exp, device, 0)}], spec, device, process)
    tmp = tempfile.mkdtemp(prefix=f"vramlab-ranks-{exp.spec_hash}-")
    try:
        proc = _start(exp, device, tmp)
        try:
            timed_out = _wait(proc, _deadline(exp, process))
        finally:
            _kill_all(proc, tmp)
        return _collect(exp, spec, device, process, tmp, proc.returncode, timed_out)
    finally:
        _echo_logs(tmp, spec.gpus)
        shutil.rmtree(tmp, ignore_errors=True)


def _start(exp, device, tmp):
    cmd = [sys.executable, "-m", "harness.sweep.ranks", "agent", "--standalone", f"--nproc-per-node={exp.spec.gpus}",
           "--module", "harness.sweep.ranks", "rank", "--dir", tmp, "--device", device, json.dumps(exp.to_dict())]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               VRAMLAB_RANKS_DIR=tmp, VRAMLAB_RANKS_PARENT_PID=str(os.getpid()))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a rehearsal never touches a GPU
    with open(os.path.join(tmp, "torchrun.log"), "ab") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)


def _deadline(exp, process):
    """When the ranks are stopped: GRACE_S before the launcher would kill this worker (its launch, or the start of a
    warm worker's later experiment, + the timeout)."""
    first = (process or {}).get("experiment_in_process", 1) == 1
    launched = float(os.environ.get("VRAMLAB_LAUNCHED_AT", "0") or 0) if first else 0
    return (launched or time.time()) + exp.timeout_s - GRACE_S


def _wait(proc, deadline, poll_s=0.1):
    """Wait for torchrun to exit; True if the deadline came first."""
    while proc.poll() is None:
        if time.time() >= deadline:
            return True
        time.sleep(poll_s)
    return False


def _rank_pids(tmp):
    """Pids of this experiment's ranks that are still running (their cmdline names the folder)."""
    pids = []
    for name in os.listdir(tmp):
        if name.endswith(".pid"):
            try:
                with open(os.path.join(tmp, name)) as f:
                    pid = int(f.read())
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if tmp.encode() in f.read():
                        pids.append(pid)
            except (OSError, ValueError):
                continue
    return pids


def _kill_all(proc, tmp):
    """SIGKILL torchrun's process group and each rank's (every rank leads a session of its own), and reap torchrun."""
    for pid in [proc.pid] + _rank_pids(tmp):
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait()


def _read_json(path):
    """A rank's result file (formulas.documents: a regular file, bounded), or None when it is missing or unreadable."""
    from formulas.documents import DocumentError, load_json

    try:
        return load_json(path)
    except DocumentError:
        return None


def _tail(path, n=TAIL_CHARS):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _echo_logs(tmp, world):
    """Every rank's output, and torchrun's, onto this worker's stderr (the launcher keeps it in <out>/.logs)."""
    for name in ["torchrun.log"] + [f"rank{r}.log" for r in range(world)]:
        text = _tail(os.path.join(tmp, name), 20_000)
        if text:
            sys.stderr.write(f"----- {name} -----\n{text}\n")
    sys.stderr.flush()


def _collect(exp, spec, device, process, tmp, returncode, timed_out):
    """The combined figures if every rank wrote its own; else RanksFailed naming the rank that failed first."""
    world = spec.gpus
    results = {r: _read_json(os.path.join(tmp, f"rank{r}.json")) for r in range(world)}
    results = {r: v for r, v in results.items() if v is not None}
    if len(results) == world and not timed_out:
        return combine(list(results.values()), spec, device, process)
    errors = {r: e for r in range(world) if (e := _read_json(os.path.join(tmp, f"rank{r}.error.json"))) is not None}
    failed = {int(r): f for r, f in ((_read_json(os.path.join(tmp, "failures.json")) or {}).get("ranks") or {}).items()}
    partial = [errors[r]["measured"] for r in errors if errors[r].get("measured")] + list(results.values())
    figures = combine(partial, spec, device, process) if partial else None
    ranks = {str(r): {"exitcode": f.get("exitcode"), "signal": f.get("signal")} for r, f in failed.items()}
    for r, e in errors.items():
        ranks.setdefault(str(r), {}).update(outcome=e["outcome"], message=e["message"][:300])
    # SIGTERM is how torchrun stops the other ranks once one has failed: never the root cause.
    signalled = [r for r, f in failed.items() if f.get("signal") not in (None, "SIGTERM") and r not in errors]
    if timed_out:
        missing = [r for r in range(world) if r not in results]
        rank, outcome = missing[0], "timeout"
        message = (f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} still running after "
                   f"{exp.timeout_s - GRACE_S:g} s (timeout_s {exp.timeout_s}); every rank was killed")
    elif signalled:
        rank = min(signalled, key=lambda r: failed[r].get("time") or 0)
        outcome, message = "crashed", f"rank {rank} was killed by {failed[rank]['signal']} before writing its figures"
    elif errors:
        rank = min(errors, key=lambda r: errors[r]["time"])
        e = errors[rank]
        outcome, message = e["outcome"], f"rank {rank}: {e['type']}: {e['message']}"
    elif failed:
        rank = min(failed, key=lambda r: failed[r].get("time") or 0)
        outcome, message = "crashed", f"rank {rank} exited with status {failed[rank].get('exitcode')} without its figures"
    else:
        rank, outcome = None, "crashed"
        message = f"torchrun exited with status {returncode} before every rank wrote its figures"
    error = {"message": message, "rank": rank, "ranks": ranks, "returncode": returncode,
             "stderr_tail": _tail(os.path.join(tmp, f"rank{rank}.log" if rank is not None else "torchrun.log"))}
    if rank in errors:
        error.update({k: v for k, v in errors[rank].items() if k not in ("measured", "message", "outcome", "time")})
    raise RanksFailed(outcome, error, figures)


def combine(figures, spec, device, process):
    """The record's figures of a multi-rank run: each rank's under `ranks`, and at the top level the full figures
    of the rank that needs the most — peak device bytes where every rank has them, else peak allocated."""
    from ..workload.parallel import strategy_of

    figures = sorted(figures, key=lambda f: f["rank"])
    by = "peak_device_bytes" if all(f.get("peak_device_bytes") is not None for f in figures) else "peak_allocated_bytes"
    top = max(figures, key=lambda f: f.get(by) or 0)
    return {**{k: v for k, v in top.items() if k != "rank"},
            "device": device, "backend": None if spec.gpus == 1 else "nccl" if device == "cuda" else "gloo",
            "world_size": spec.gpus,
            "strategy": strategy_of(spec) or "single", "peak_rank": top["rank"], "peak_rank_by": by,
            "ranks": [{k: f[k] for k in RANK_FIELDS if k in f} for f in figures],
            "process": {"pid": os.getpid(), "mode": "cold", **(process or {}), "rank_pids": [f.get("pid") for f in figures]}}


# ------------------------------------------------------------------ a rank's side

def die_with(parent_pid):
    """SIGKILL this process when its parent dies (PR_SET_PDEATHSIG, Linux); exit now if it already has."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: whoever started this process still kills it
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _fault_hook(rank):
    """VRAMLAB_TEST_RANK_FAULT='<rank>:<phase>:kill|raise' for this rank, as a phase callback (else None)."""
    hook = os.environ.get("VRAMLAB_TEST_RANK_FAULT", "")
    if not hook:
        return None
    r, phase, action = hook.split(":")
    if int(r) != rank:
        return None

    def fault(p):
        if p == phase:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"VRAMLAB_TEST_RANK_FAULT: rank {rank} raised as {phase} began")

    return fault


def rehearse(exp, fault=None):
    """One rank's figures on the CPU: the spec's model on real CPU tensors, its strategy over the process group (if
    any), the workload, and the category tracker counting every CPU storage — no allocator, no device figures."""
    from formulas.catalog import get_shape
    from formulas.spec import validate

    from ..gpu.build import build_on_device
    from ..tracing.tracker import DDP_BUCKETS, CategoryTracker
    from ..workload.parallel import make_parallel_optimizer, replicate, shard
    from ..workload.steps import run_inference, run_training

    spec = validate(exp.spec, get_shape(exp.spec.model))
    t0 = time.perf_counter()
    model = shard(build_on_device(spec, exp.real_model_dir, device="cpu"), spec, "cpu")
    t_built = time.perf_counter()
    tracker = CategoryTracker(model, spec, get_shape(spec.model).vocab, device_type="cpu")

    def mark(phase):
        if fault is not None:
            fault(phase)
        tracker.mark(phase)

    with tracker:
        with tracker.labelled(DDP_BUCKETS):  # DDP allocates its gradient buckets when it wraps the model
            model = replicate(model, spec)
        if spec.mode == "inference":
            run_inference(model, spec, mark=mark, device="cpu")
        else:
            run_training(model, spec, mark=mark, device="cpu", steps=exp.steps,
                         optimizer=make_parallel_optimizer(model, spec))
    t_done = time.perf_counter()
    mem = tracker.result()
    return {"device": "cpu", "pid": os.getpid(), "peak_allocated_bytes": mem.peak_allocated_bytes,
            "peak_phase": mem.peak_phase, "breakdown": mem.breakdown, "phases": mem.phases,
            "estimated_reserved_bytes": mem.estimated_reserved_bytes,
            "estimated_max_allocated_bytes": mem.estimated_max_allocated_bytes, "n_ops": mem.n_ops,
            "peak_tensors": mem.peak_tensors,
            "timings": {"build_s": round(t_built - t0, 3), "workload_s": round(t_done - t_built, 3)}}


def rank_figures(exp, device, rank, local_rank=0):
    """This rank's figures: measured on its GPU (harness.gpu.measure), or rehearsed on the CPU."""
    if device == "cpu":
        return rehearse(exp, _fault_hook(rank))
    from ..gpu.measure import measure, nvml_index

    figures = measure(exp, {"mode": "rank", "rank": rank}, local_rank=local_rank)
    return {**figures, "device": f"cuda:{local_rank}", "pid": os.getpid(), "nvml_index": nvml_index()}


def _classify(e):
    """(outcome, details) of a rank's exception, as the worker classifies one experiment's."""
    from formulas.spec import SpecError

    from ..gpu.measure import MeasuredOOM, is_oom, oom_details

    if isinstance(e, MeasuredOOM):
        return "oom", {**e.details, "measured": e.measured}
    if is_oom(e):
        return "oom", oom_details(e)
    d = {"type": type(e).__name__, "message": str(e)[:2000], "traceback": traceback.format_exc()[-4000:]}
    return ("unsupported" if isinstance(e, (NotImplementedError, SpecError)) else "error"), d


def _write_json(path, data):
    """Atomically: the worker reads either nothing or the whole file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def rank_main(argv):
    """One rank under torchrun: its output to <dir>/rank<r>.log, its figures to rank<r>.json (or rank<r>.error.json)."""
    from .schema import Experiment

    ap = argparse.ArgumentParser(prog="harness.sweep.ranks rank")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), required=True)
    ap.add_argument("experiment")
    a = ap.parse_args(argv)
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    log = os.open(os.path.join(a.dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    with open(os.path.join(a.dir, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    die_with(int(os.environ["VRAMLAB_RANKS_AGENT_PID"]))
    exp = Experiment.from_dict(json.loads(a.experiment))
    import torch.distributed as dist

    try:
        if a.device == "cuda":  # its own GPU, which measure() selects before CUDA makes a context anywhere
            gpus = os.environ.get("VRAMLAB_NVML_INDEX", "").split(",")
            os.environ["VRAMLAB_NVML_INDEX"] = gpus[local] if len(gpus) > local and gpus[local] else str(local)
        dist.init_process_group("nccl" if a.device == "cuda" else "gloo")  # NCCL makes its communicator lazily
        figures = rank_figures(exp, a.device, rank, local)
    except BaseException as e:
        outcome, details = _classify(e)
        if details.get("measured"):  # what an out-of-memory rank measured before it
            where = "cpu" if a.device == "cpu" else f"cuda:{local}"
            details["measured"] = {"rank": rank, **details["measured"], "device": where, "pid": os.getpid()}
        _write_json(os.path.join(a.dir, f"rank{rank}.error.json"),
                    {"outcome": outcome, "time": time.time(), "message": str(e)[:2000] or type(e).__name__,
                     "type": type(e).__name__, **details})
        traceback.print_exc()
        return 1
    _write_json(os.path.join(a.dir, f"rank{rank}.json"), {"rank": rank, **figures})
    try:  # a peer that failed after its own figures is the worker's to report, not this rank's
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        pass
    return 0


def agent_main(argv):
    """torchrun, dying with the worker that started it; the ranks that failed on their own go to failures.json."""
    die_with(int(os.environ["VRAMLAB_RANKS_PARENT_PID"]))
    os.environ["VRAMLAB_RANKS_AGENT_PID"] = str(os.getpid())  # the ranks die with this process
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as e:
        ranks = {str(r): {"exitcode": f.exitcode, "signal": f.signal_name() if f.exitcode < 0 else None,
                          "time": f.timestamp} for r, f in e.failures.items()}
        _write_json(os.path.join(os.environ["VRAMLAB_RANKS_DIR"], "failures.json"), {"ranks": ranks})
        return 1
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agent"]:
        return agent_main(argv[1:])
    if argv[:1] == ["rank"]:
        return rank_main(argv[1:])
    print("usage: python -m harness.sweep.ranks agent TORCHRUN-ARGS | rank --dir D --device cuda|cpu EXPERIMENT",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

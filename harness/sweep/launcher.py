"""Run a sweep: worker processes on GPUs (or the CPU), one record per experiment, resumable.

Two ways to run (`process`): cold — one fresh process per experiment, whose exit code is its
status; warm — one long-lived worker per GPU that runs experiment after experiment and checks
the GPU is back where it began before each (see harness.sweep.worker). A warm worker that cannot
reset is replaced by a fresh one, and the record says why.

Every experiment ends with exactly one record. The worker writes its own atomically; if it dies
without one (SIGKILL, segfault, hang past its timeout) the launcher writes one for it (outcome
`crashed` or `timeout`, with the exit status and the tail of its stderr), so a rerun skips it.
Ctrl-C, SIGTERM or SIGHUP kill the running workers and stop; SIGKILL of the launcher takes them
down too (they die with it). Every record already written stays, and the next run resumes.

One launcher per output folder: a lock (`<out>/.lock`, flock) that dies with its holder. Before a
new worker process starts on a GPU, the launcher waits (up to IDLE_TIMEOUT_S) for the GPU's memory
to come back to what it was when the sweep began, so a killed worker's memory still being released
does not shift the next baseline; the record carries what the wait found.

Multi-GPU experiments (`gpus: N`, harness.sweep.ranks) are packed onto the slots with the others: one
takes N free slots at once — their warm workers stopped first — for a cold worker that starts its
ranks on those GPUs (rehearsing, N CPU slots, or all of them if fewer). The queue runs the experiments
needing the most GPUs first; one that cannot start yet lets smaller ones past only while a running
experiment at least its size will free enough slots for it (`next_to_start`), so none waits forever.
An experiment needing more GPUs than the run has is recorded `unsupported` at once, and runs when a
later run has enough.

Boundary searches (`search:` groups, harness/sweep/search.py) run beside the grid: each has one probe in
the queue at a time, ahead of the grid experiments, and the next one is queued when its record is in;
probes already recorded are read, not run, so a rerun resumes a search where it stopped.

An experiment's `alloc_conf` is its worker's PYTORCH_CUDA_ALLOC_CONF: a warm worker runs the experiments
of one setting, the queue keeps those of a setting together (the default first), and a worker is
replaced where the setting changes.
"""

import fcntl
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from ..gpu import nvml
from ..paths import ROOT, RUNS_DIR, OutDirError, prepare_folder  # noqa: F401  (OutDirError re-exported)
from ..records import (
    OUTCOMES,
    NewerSchemaError,
    RecordError,
    RecordsLocked,
    lock_folder,
    new_record,
    read_record,
    record_path,
    write_record,
)
from .worker import SOURCE

IDLE_TOLERANCE_BYTES = 64 * 2**20  # "back where it began": within this of the GPU's memory at sweep start
IDLE_TIMEOUT_S = 30.0


SweepLocked = RecordsLocked  # another vramlab command is writing to the same output folder


def prepare_out_dir(out_dir, flag="--out"):
    """Create the record folder if needed; OutDirError (one line) when it cannot be written."""
    prepare_folder(out_dir, flag)


class _Stop(BaseException):
    """SIGTERM or SIGHUP: stop like Ctrl-C."""


@dataclass
class SweepSummary:
    """What a run did."""

    out_dir: str
    total: int = 0
    skipped: int = 0  # already recorded
    ran: int = 0
    outcomes: dict = field(default_factory=dict)
    interrupted: bool = False
    signal: str = ""  # the signal that stopped it, if one did
    corrupt_moved: list = field(default_factory=list)
    newer: list = field(default_factory=list)  # records written by a newer vramlab: left alone, not rerun
    busy: list = field(default_factory=list)  # experiments an earlier run's process is still recording: not started
    fresh_processes: int = 0  # warm workers replaced because a reset left memory behind


def worker_command(out_dir, mode):
    """The default worker: `python -m harness.sweep.worker` from this checkout."""
    return [sys.executable, "-m", "harness.sweep.worker", "--out", out_dir, "--mode", mode]


def is_done(out_dir, exp, retry=False, moved=None, slots=None, newer=None):
    """True if a readable record exists (with retry, only an ok/oom/unsupported record counts).

    An unreadable record (or a FIFO, a folder, … in its place) is moved aside (`.corrupt-<hash>.json`) and the
    experiment reruns; so does one recorded unsupported for want of GPUs when this run has `slots` enough. A record
    written by a newer vramlab is left as it is and counts as done (its path goes to `newer`)."""
    path = record_path(out_dir, exp.spec_hash)
    if not os.path.lexists(path):
        return False
    try:
        rec = read_record(path)
    except NewerSchemaError:
        if newer is not None:
            newer.append(path)
        return True
    except RecordError:
        aside = os.path.join(out_dir, f".corrupt-{exp.spec_hash}-{int(time.time())}.json")
        os.replace(path, aside)
        if moved is not None:
            moved.append(aside)
        return False
    if retry and rec["outcome"] not in ("ok", "oom", "unsupported"):
        return False
    wanted = (rec.get("error") or {}).get("gpus_needed") if rec["outcome"] == "unsupported" else None
    if wanted is not None and slots is not None and wanted <= slots:
        return False
    return rec["outcome"] in OUTCOMES


def slots_needed(exp, mode, n_slots):
    """Slots an experiment holds: one per GPU when measuring; rehearsing, one per rank up to all of them (CPU
    ranks can share cores); tracing, one (the tracer plays any rank in one process)."""
    if mode == "measure":
        return exp.spec.gpus
    return min(exp.spec.gpus, n_slots) if mode == "rehearse" else 1


def next_to_start(needs, free, running):
    """Index in `needs` (slots per waiting experiment, in queue order) of the next to start on `free` slots, or None.

    `running`: the slots each running experiment holds. A waiting experiment that does not fit lets later,
    smaller ones past only while a running one at least its size will free enough slots for it; otherwise
    nothing starts until enough slots drain."""
    blocked = False
    for i, n in enumerate(needs):
        if n <= free:
            return i
        if not blocked:
            if not any(r >= n for r in running):
                return None
            blocked = True
    return None


def _unsupported_record(exp, slots, source):
    """The record of an experiment that needs more GPUs than the run has."""
    from ..env import fingerprint

    n = exp.spec.gpus
    record = new_record(exp, source)
    record.update({"outcome": "unsupported", "timings": {"total_s": 0.0}, "env": fingerprint(),
                   "error": {"type": "Unsupported", "gpus_needed": n,
                             "message": f"needs {n} GPUs; this run has {slots} (--gpus): give --gpus with at least {n}"}})
    return record


def _fallback_record(exp, outcome, returncode, stderr_tail, seconds, source):
    """The record of a worker that died without writing one."""
    from ..env import fingerprint

    sig = -returncode if returncode is not None and returncode < 0 else None
    record = new_record(exp, source)
    record.update({
        "outcome": outcome,
        "error": {
            "message": f"worker {'timed out after %ss' % exp.timeout_s if outcome == 'timeout' else 'died without a record'}"
                       + (f" (signal {signal.Signals(sig).name})" if sig else f" (exit {returncode})"),
            "returncode": returncode,
            "stderr_tail": stderr_tail,
        },
        "timings": {"total_s": round(seconds, 3)},
        "env": fingerprint(),
    })
    return record


def set_alloc_conf(env, alloc_conf):
    """Give a worker's environment the experiment's PYTORCH_CUDA_ALLOC_CONF ('' = torch's defaults: unset)."""
    if alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf
    else:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)


def measured_elsewhere(sweep_dir, skip=None):
    """Spec hashes with an ok measured record in any environment's folder of a sweep (results/runs/<sweep>/*/)."""
    from ..records import iter_records

    seen = set()
    if not os.path.isdir(sweep_dir):
        return seen
    for name in sorted(os.listdir(sweep_dir)):
        folder = os.path.join(sweep_dir, name)
        if not os.path.isdir(folder) or (skip and os.path.abspath(folder) == os.path.abspath(skip)):
            continue
        seen |= {r["spec_hash"] for r in iter_records(folder)
                 if r.get("outcome") == "ok" and r.get("source") == "measured"}
    return seen


ORDERS = ("file", "unmeasured")


def order_experiments(experiments, order="file", measured=frozenset()):
    """The experiments in the order a time-boxed window should run them.

    file: as the sweep file lists them. unmeasured: those with no ok measured record in any environment
    (`measured`: their spec hashes) first, then the rest; within each, training before inference (it holds
    most of what the predictor models: gradients, optimizer states, checkpointed activations, adapters),
    then file order. Either way the default allocator's experiments come before those of an `alloc_conf`, so
    a warm worker changes its setting once."""
    if order not in ORDERS:
        raise ValueError(f"--order {order}: expected one of {', '.join(ORDERS)}")
    index = {id(e): i for i, e in enumerate(experiments)}

    def key(e):
        first = (e.spec_hash in measured, e.spec.mode != "train") if order == "unmeasured" else ()
        return (bool(e.alloc_conf), *first, index[id(e)])

    return sorted(experiments, key=key)


def record_stamp(out_dir, spec_hash):
    """(inode, mtime) of the experiment's record file, or None: a rerun's record is a new file (write_record)."""
    try:
        st = os.stat(record_path(out_dir, spec_hash))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def recorded_outcome(out_dir, spec_hash, stale=None):
    """The outcome of the experiment's readable record, else None; with `stale` (the stamp of the record a
    retry replaces), that record is not this run's and counts as none."""
    if stale is not None and record_stamp(out_dir, spec_hash) == stale:
        return None
    path = record_path(out_dir, spec_hash)
    try:
        return read_record(path)["outcome"] if os.path.exists(path) else None
    except RecordError:
        return None


# ------------------------------------------------------------------ claims: one process records an experiment

CLAIM_WAIT_S = 5.0  # how long a run waits for an earlier run's processes (being ended) to let go of an experiment
_UNSEEN = object()


def _claim_path(out_dir, spec_hash):
    return os.path.join(out_dir, ".claims", spec_hash)


def claim(out_dir, spec_hash):
    """Hold the experiment's claim (`<out>/.claims/<hash>`, flock) for this process, waiting while another holds it;
    the fd. A worker given the fd (pass_fds) holds it too, so the claim lasts until the last of them is gone."""
    os.makedirs(os.path.join(out_dir, ".claims"), exist_ok=True)
    fd = os.open(_claim_path(out_dir, spec_hash), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {os.uname().nodename}\n".encode(), 0)
    return fd


def claimed_by(out_dir, spec_hash):
    """'pid N on HOST' of the process recording the experiment now, or None (nothing is made on disk)."""
    try:
        fd = os.open(_claim_path(out_dir, spec_hash), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        who = os.pread(fd, 200, 0).decode(errors="replace").split()
        return f"pid {who[0]} on {who[1]}" if len(who) > 1 else "another process"
    finally:
        os.close(fd)


def not_busy(out_dir, experiments, retry, summary, wait_s=None, slots=None):
    """The experiments to start: those still claimed by a process of an earlier run (a Slurm or Ray task being
    ended, or one on another node) after up to wait_s are left out and named in summary.busy; one that such a
    process recorded meanwhile counts as done."""
    held = [e for e in experiments if claimed_by(out_dir, e.spec_hash)] if os.path.isdir(
        os.path.join(out_dir, ".claims")) else []
    waited = {e.spec_hash for e in held}
    deadline = time.monotonic() + (CLAIM_WAIT_S if wait_s is None else wait_s)
    while held and time.monotonic() < deadline:
        time.sleep(0.1)
        held = [e for e in held if claimed_by(out_dir, e.spec_hash)]
    held = {e.spec_hash: who for e in held if (who := claimed_by(out_dir, e.spec_hash))}
    summary.busy += [f"{h} ({who})" for h, who in held.items()]
    out = []
    for e in experiments:
        if e.spec_hash in held:
            continue
        if e.spec_hash in waited and is_done(out_dir, e, retry, summary.corrupt_moved, slots, summary.newer):
            summary.skipped += 1  # recorded while we waited
            continue
        out.append(e)
    return out


def run_isolated(exp, out_dir, mode, worker_cmd=None, seen=_UNSEEN):
    """Run one experiment in a fresh cold worker, waiting up to its timeout; returns its outcome.

    What a Slurm or Ray task runs (harness.sweep.backends): the worker writes the record; if it dies
    without one (killed, crashed, past its timeout) this writes the fallback record, as the local
    launcher does. If the task itself is stopped (scancel, ray.cancel) the worker goes with it (it dies
    with this process) and no record is written: the experiment is not done.

    The task holds the experiment's claim while it runs (shared with its worker), and first waits for any
    other process that holds it. `seen`: the record's stamp when the experiment was submitted; a record
    written since (by a task of an earlier run) is the experiment's, and it is not run again."""
    logs = os.path.join(out_dir, ".logs")
    os.makedirs(logs, exist_ok=True)
    held = claim(out_dir, exp.spec_hash)
    try:
        stale = record_stamp(out_dir, exp.spec_hash)
        if seen is not _UNSEEN and stale != seen:
            recorded = recorded_outcome(out_dir, exp.spec_hash)
            if recorded:
                return recorded
        return _run_claimed(exp, out_dir, mode, worker_cmd, stale, held, logs)
    finally:
        os.close(held)


def _run_claimed(exp, out_dir, mode, worker_cmd, stale, held, logs):
    err_path = os.path.join(logs, f"{exp.spec_hash}.stderr")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               VRAMLAB_LAUNCHER_PID=str(os.getpid()), VRAMLAB_LAUNCHED_AT=repr(time.time()))
    set_alloc_conf(env, exp.alloc_conf)
    t0 = time.monotonic()
    with open(err_path, "ab") as err:
        proc = subprocess.Popen((worker_cmd or worker_command(out_dir, mode)) + [json.dumps(exp.to_dict())], cwd=ROOT,
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True, pass_fds=(held,))
    outcome = "crashed"
    try:
        rc = proc.wait(timeout=exp.timeout_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        outcome, rc = "timeout", -signal.SIGKILL
    except BaseException:
        _kill(proc)
        raise
    recorded = recorded_outcome(out_dir, exp.spec_hash, stale)  # one written just before a timeout is the experiment's
    if recorded:
        return recorded
    write_record(out_dir, _fallback_record(exp, outcome, rc, _tail(err_path), time.monotonic() - t0, SOURCE[mode]))
    return outcome


def _tail(path, n=4000):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _kill(proc):
    """Kill the worker and its process group, and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _progress(total):
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="exp", dynamic_ncols=True, file=sys.stderr)
    except ImportError:
        return None


def lock_out_dir(out_dir):
    """Hold `<out>/.lock` for this run (harness.records.lock_folder); SweepLocked if another command holds it."""
    return lock_folder(out_dir, "run")


def wait_for_idle(index, baseline, timeout_s=IDLE_TIMEOUT_S, tolerance=IDLE_TOLERANCE_BYTES, poll_s=0.2,
                  used_bytes=None, sleep=time.sleep, clock=time.monotonic):
    """Wait until NVML device `index` uses at most `baseline` + `tolerance`; what the wait found, for the record."""
    used_bytes = used_bytes or nvml.used_bytes
    t0 = clock()
    used = used_bytes(index)
    while used is not None and baseline is not None and used > baseline + tolerance and clock() - t0 < timeout_s:
        sleep(poll_s)
        used = used_bytes(index)
    idle = used is None or baseline is None or used <= baseline + tolerance
    return {"idle": idle, "waited_s": round(clock() - t0, 3), "used_bytes": used, "baseline_bytes": baseline}


class _Slot:
    """One GPU (or the CPU, gpu None) and the worker process on it."""

    def __init__(self, gpu, name):
        self.gpu, self.name = gpu, name  # name: gpu<i> or cpu<j>, for log files
        self.proc = None
        self.alloc_conf = None  # the PYTORCH_CUDA_ALLOC_CONF its warm worker runs with
        self.exp = None  # the experiment running now
        self.started = 0.0
        self.err_path = ""
        self.replies = None  # warm: parsed reply lines from the worker
        self.workers = 0  # processes started on this slot
        self.group = []  # the slots the running experiment holds, this one first (a multi-GPU experiment's are several)
        self.held_by = None  # the slot running the multi-GPU experiment that holds this one
        self.cold = False  # the running experiment has a process of its own (always, for a multi-GPU one)

    def busy(self):
        return self.exp is not None or self.held_by is not None


class _Launcher:
    def __init__(self, out_dir, mode, cmd, warm, logs):
        self.out_dir, self.mode, self.cmd, self.warm, self.logs = out_dir, mode, cmd, warm, logs
        self.source = SOURCE[mode]
        self.baseline = {}  # GPU → NVML device-used when the sweep began

    def env(self, slot, alloc_conf=""):
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env["VRAMLAB_LAUNCHER_PID"] = str(os.getpid())
        set_alloc_conf(env, alloc_conf)
        gpus = [s.gpu for s in slot.group or [slot] if s.gpu is not None]
        if gpus:
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA numbers the GPUs as NVML does
            env["CUDA_VISIBLE_DEVICES"] = env["VRAMLAB_NVML_INDEX"] = ",".join(map(str, gpus))
            if self.mode == "measure":
                waits = [wait_for_idle(g, self.baseline.get(g)) for g in gpus]
                env["VRAMLAB_IDLE"] = json.dumps(waits[0] if len(waits) == 1 else waits)
        env["VRAMLAB_LAUNCHED_AT"] = repr(time.time())  # after the wait: launch_to_measure_s is the process's own
        return env

    def spawn(self, slot, args, err_name, pipes, alloc_conf=""):
        slot.err_path = os.path.join(self.logs, err_name)
        slot.alloc_conf = alloc_conf
        with open(slot.err_path, "ab") as err:
            slot.proc = subprocess.Popen(self.cmd + args, cwd=ROOT, env=self.env(slot, alloc_conf), stderr=err,
                                         stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                                         stdout=subprocess.PIPE if pipes else subprocess.DEVNULL,
                                         start_new_session=True, text=pipes)
        slot.workers += 1

    def start(self, slot, exp, fallback=None):
        slot.exp, slot.started, slot.group, slot.cold = exp, time.monotonic(), [slot], not self.warm
        if not self.warm:
            self.spawn(slot, [json.dumps(exp.to_dict())], f"{exp.spec_hash}.stderr", pipes=False,
                       alloc_conf=exp.alloc_conf)
            return
        if slot.proc is not None and slot.proc.poll() is None and slot.alloc_conf != exp.alloc_conf:
            self.stop_worker(slot)  # the allocator's settings are read once per process
        if slot.proc is None or slot.proc.poll() is not None:
            self.spawn(slot, ["--warm"], f"worker-{slot.name}-{slot.workers + 1}.stderr", pipes=True,
                       alloc_conf=exp.alloc_conf)
            slot.replies = queue.Queue()
            threading.Thread(target=_read_replies, args=(slot.proc.stdout, slot.replies), daemon=True).start()
        try:
            slot.proc.stdin.write(json.dumps({"experiment": exp.to_dict(), "fallback": fallback}) + "\n")
            slot.proc.stdin.flush()
        except (BrokenPipeError, OSError):  # it died between experiments: the poll below records the crash
            pass

    def start_ranks(self, slots, exp):
        """A multi-GPU experiment: one cold worker holding all `slots` (their warm workers stopped first)."""
        lead = slots[0]
        for s in slots:
            self.stop_worker(s)
            s.held_by = lead if s is not lead else None
        lead.exp, lead.started, lead.group, lead.cold = exp, time.monotonic(), list(slots), True
        self.spawn(lead, [json.dumps(exp.to_dict())], f"{exp.spec_hash}.stderr", pipes=False,
                   alloc_conf=exp.alloc_conf)

    def release(self, slot):
        """The experiment on `slot` is done: the slots it held are free again."""
        for s in slot.group:
            s.held_by = None
        slot.exp, slot.group = None, []

    def stop_worker(self, slot):
        if slot.proc is not None:
            if slot.proc.stdin:
                try:
                    slot.proc.stdin.close()
                except OSError:
                    pass
            _kill(slot.proc)
        slot.proc, slot.replies = None, None

    def poll(self, slot):
        """None while the experiment runs; else (outcome or None, restart reason or None)."""
        exp = slot.exp
        elapsed = time.monotonic() - slot.started
        if not slot.cold:
            try:
                reply = slot.replies.get_nowait()
            except queue.Empty:
                reply = None
            if reply is not None:
                if reply.get("restart"):
                    self.stop_worker(slot)
                    return None, reply.get("reason") or "the warm worker could not reset"
                return self.recorded(exp) or self.fallback(slot, "crashed", elapsed), None
        rc = slot.proc.poll()
        if rc is None and elapsed <= exp.timeout_s:
            return None
        if rc is None:  # past its timeout; a record written just before is the experiment's, not a timeout
            self.stop_worker(slot)
            return self.recorded(exp) or self.fallback(slot, "timeout", elapsed, -signal.SIGKILL), None
        if not slot.cold:
            time.sleep(0.05)  # a reply written just before the exit
            if not slot.replies.empty():
                return self.poll(slot)
            slot.proc = None
            return self.fallback(slot, "crashed", elapsed, rc), None
        slot.proc = None
        return self.recorded(exp) or self.fallback(slot, "crashed", elapsed, rc), None

    def recorded(self, exp):
        return recorded_outcome(self.out_dir, exp.spec_hash)

    def fallback(self, slot, outcome, elapsed, rc=None):
        rc = slot.proc.returncode if rc is None and slot.proc is not None else rc
        try:
            write_record(self.out_dir, _fallback_record(slot.exp, outcome, rc, _tail(slot.err_path), elapsed, self.source))
        except OSError as e:  # a full disk, a folder made read-only under us
            raise OutDirError(f"{self.out_dir}: cannot write the record of {slot.exp.spec_hash} ({e.strerror or e}); "
                              "the records written so far are kept") from None
        return outcome


def _read_replies(stream, replies):
    for line in stream:
        try:
            replies.put(json.loads(line))
        except json.JSONDecodeError:
            continue


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def run_sweep(experiments, out_dir, gpus=None, mode="trace", worker_cmd=None, retry=False, progress=True,
              poll_s=0.2, on_record=None, warm=False, jobs=1, searches=()):
    """Run every experiment not yet recorded under out_dir; returns a SweepSummary.

    gpus: GPU indices to run on in parallel (one experiment per GPU, N for an experiment of `gpus: N`); None =
    GPU 0 when measuring. jobs: tracing or rehearsing, how many CPU workers run at once. warm: one long-lived
    worker per GPU (or CPU job) instead of a process per experiment (a multi-GPU experiment is always cold).
    worker_cmd: the command that runs experiments (tests pass a stand-in); cold workers get the
    experiment's JSON as the last argument, warm ones `--warm` and the experiments on stdin. searches:
    BoundarySearches (harness/sweep/search.py), probed one at a time ahead of the experiments."""
    prepare_out_dir(out_dir)
    lock = lock_out_dir(out_dir)
    summary = SweepSummary(out_dir=out_dir, total=len(experiments))
    if gpus or mode == "measure":
        slots = [_Slot(g, f"gpu{g}") for g in (gpus or [0])]
    else:
        slots = [_Slot(None, f"cpu{j}") for j in range(max(1, jobs))]
    todo, too_big = [], []
    waiting = []
    for e in experiments:
        if is_done(out_dir, e, retry, summary.corrupt_moved, len(slots), summary.newer):
            summary.skipped += 1
        else:
            waiting.append(e)
    for e in not_busy(out_dir, waiting, retry, summary, slots=len(slots)):
        if slots_needed(e, mode, len(slots)) > len(slots):
            too_big.append(e)
        else:
            todo.append((e, None))
    # the most GPUs first, else the given order with the default allocator's experiments before the others'
    todo.sort(key=lambda t: (-slots_needed(t[0], mode, len(slots)), bool(t[0].alloc_conf)))
    probing = {}  # spec hash of a queued probe → its search

    def next_probe(search):
        """Queue the search's next probe, reading the outcomes of those already recorded (a rerun resumes)."""
        while (value := search.next_value()) is not None:
            exp = search.probe(value)
            if is_done(out_dir, exp, retry, summary.corrupt_moved, len(slots)):
                search.feed(value, read_record(record_path(out_dir, exp.spec_hash))["outcome"])
                continue
            for i, (e, _) in enumerate(todo):  # a grid experiment that is this probe runs as the probe
                if e.spec_hash == exp.spec_hash:
                    del todo[i]
                    summary.total -= 1
                    break
            todo.insert(0, (exp, None))
            probing[exp.spec_hash] = (search, value)
            summary.total += 1
            return

    for search in searches:
        next_probe(search)
    logs = os.path.join(out_dir, ".logs")
    os.makedirs(logs, exist_ok=True)
    launcher = _Launcher(out_dir, mode, worker_cmd or worker_command(out_dir, mode), warm, logs)
    if mode == "measure":
        launcher.baseline = {s.gpu: nvml.used_bytes(s.gpu) for s in slots}
    bar = _progress(len(todo) + len(too_big)) if progress else None
    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)} if main_thread else {}

    def finished(exp, outcome):
        summary.ran += 1
        summary.outcomes[outcome] = summary.outcomes.get(outcome, 0) + 1
        if on_record:
            on_record(exp, outcome)
        if bar is not None:
            bar.update(1)
        if exp.spec_hash in probing:
            search, value = probing.pop(exp.spec_hash)
            search.feed(value, outcome)
            next_probe(search)
            if bar is not None:
                bar.total = summary.total

    try:
        for exp in too_big:
            write_record(out_dir, _unsupported_record(exp, len(slots), launcher.source))
            finished(exp, "unsupported")
        while todo or any(s.busy() for s in slots):
            while todo:
                free = [s for s in slots if not s.busy()]
                needs = [slots_needed(e, mode, len(slots)) for e, _ in todo]
                i = next_to_start(needs, len(free), [len(s.group) for s in slots if s.exp is not None])
                if i is None:
                    break
                exp, fallback = todo.pop(i)
                if exp.spec.gpus > 1 and mode != "trace":  # its ranks: a cold worker on all its slots
                    launcher.start_ranks(free[:needs[i]], exp)
                else:  # a slot whose warm worker is alive first
                    launcher.start(min(free, key=lambda s: s.proc is None), exp, fallback)
                if bar is not None:
                    bar.set_postfix_str(exp.label()[:60])
            time.sleep(poll_s)
            for slot in slots:
                if slot.exp is None:
                    continue
                done = launcher.poll(slot)
                if done is None:
                    continue
                outcome, restart = done
                exp = slot.exp
                launcher.release(slot)
                if restart:  # run it again in a fresh process, first in line
                    summary.fresh_processes += 1
                    todo.insert(0, (exp, restart))
                    continue
                finished(exp, outcome)
    except (KeyboardInterrupt, _Stop) as e:
        summary.interrupted = True
        summary.signal = str(e) if isinstance(e, _Stop) else "SIGINT"
        # A worker killed mid-write leaves only its temp file; no partial record is kept.
    finally:
        for slot in slots:
            launcher.stop_worker(slot)
        for s, h in old.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()
        os.close(lock)
    return summary


def default_out_dir(sweep, mode):
    """results/runs/<sweep>/<gpu-slug or 'traced-cpu'>: one folder per sweep and environment."""
    info = nvml.device_info(0) if mode == "measure" else None
    if info:
        slug = f"{info['name']}-{info.get('driver', 'driver')}".lower()
        slug = "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in slug)
    else:
        slug = f"{SOURCE[mode]}-cpu"  # traced-cpu, rehearsed-cpu
    return os.path.join(RUNS_DIR, sweep, slug)

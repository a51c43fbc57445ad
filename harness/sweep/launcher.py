"""Run a sweep: one subprocess per experiment, one GPU per running experiment, resumable.

The child writes its own record atomically and its exit code is its status. If it dies
without a record (SIGKILL, segfault, hang past its timeout), the launcher writes one for
it (outcome `crashed` or `timeout`, with the exit status and the tail of its stderr), so
every experiment ends with exactly one record and a rerun skips it. Ctrl-C kills the
running children and stops; every record already written stays, and the next run resumes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from ..gpu import nvml
from ..paths import ROOT, RUNS_DIR
from ..records import OUTCOMES, RecordError, new_record, read_record, record_path, write_record
from .worker import SOURCE


@dataclass
class SweepSummary:
    """What a run did."""

    out_dir: str
    total: int = 0
    skipped: int = 0  # already recorded
    ran: int = 0
    outcomes: dict = field(default_factory=dict)
    interrupted: bool = False
    corrupt_moved: list = field(default_factory=list)


def worker_command(out_dir, mode):
    """The default worker: `python -m harness.sweep.worker` from this checkout."""
    return [sys.executable, "-m", "harness.sweep.worker", "--out", out_dir, "--mode", mode]


def is_done(out_dir, exp, retry=False, moved=None):
    """True if a readable record exists (with retry, only an ok/oom record counts).

    An unreadable record is moved aside (`.corrupt-<hash>.json`) and the experiment reruns."""
    path = record_path(out_dir, exp.spec_hash)
    if not os.path.exists(path):
        return False
    try:
        rec = read_record(path)
    except RecordError:
        aside = os.path.join(out_dir, f".corrupt-{exp.spec_hash}-{int(time.time())}.json")
        os.replace(path, aside)
        if moved is not None:
            moved.append(aside)
        return False
    if retry and rec["outcome"] not in ("ok", "oom", "unsupported"):
        return False
    return rec["outcome"] in OUTCOMES


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


class _Running:
    def __init__(self, exp, proc, slot, started, err_path):
        self.exp, self.proc, self.slot, self.started, self.err_path = exp, proc, slot, started, err_path


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


def run_sweep(experiments, out_dir, gpus=None, mode="trace", worker_cmd=None, retry=False, progress=True,
              poll_s=0.2, on_record=None):
    """Run every experiment not yet recorded under out_dir; returns a SweepSummary.

    gpus: device indices to run on in parallel (one experiment per GPU); None = one at a time.
    worker_cmd: the command that runs one experiment (tests pass a stand-in); the experiment's
    JSON is appended as the last argument."""
    os.makedirs(out_dir, exist_ok=True)
    summary = SweepSummary(out_dir=out_dir, total=len(experiments))
    todo = []
    for e in experiments:
        if is_done(out_dir, e, retry, summary.corrupt_moved):
            summary.skipped += 1
        else:
            todo.append(e)
    slots = list(gpus) if gpus else [None]
    free = list(slots)
    running = []
    cmd = worker_cmd or worker_command(out_dir, mode)
    bar = _progress(len(todo)) if progress else None
    logs = os.path.join(out_dir, ".logs")
    os.makedirs(logs, exist_ok=True)
    source = SOURCE[mode]
    try:
        while todo or running:
            while todo and free:
                exp = todo.pop(0)
                slot = free.pop(0)
                env = dict(os.environ)
                env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot)
                env["VRAMLAB_LAUNCHED_AT"] = repr(time.time())
                err_path = os.path.join(logs, f"{exp.spec_hash}.stderr")
                with open(err_path, "wb") as err:
                    proc = subprocess.Popen(cmd + [json.dumps(exp.to_dict())], cwd=ROOT, env=env,
                                            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
                running.append(_Running(exp, proc, slot, time.monotonic(), err_path))
                if bar is not None:
                    bar.set_postfix_str(exp.label()[:60])
            time.sleep(poll_s)
            for r in list(running):
                elapsed = time.monotonic() - r.started
                rc = r.proc.poll()
                timed_out = rc is None and elapsed > r.exp.timeout_s
                if rc is None and not timed_out:
                    continue
                if timed_out:
                    _kill(r.proc)
                    rc = r.proc.returncode
                running.remove(r)
                free.append(r.slot)
                path = record_path(out_dir, r.exp.spec_hash)
                outcome = None
                if os.path.exists(path) and not timed_out:
                    try:
                        outcome = read_record(path)["outcome"]
                    except RecordError:
                        outcome = None
                if outcome is None:
                    outcome = "timeout" if timed_out else "crashed"
                    write_record(out_dir, _fallback_record(r.exp, outcome, rc, _tail(r.err_path), elapsed, source))
                summary.ran += 1
                summary.outcomes[outcome] = summary.outcomes.get(outcome, 0) + 1
                if on_record:
                    on_record(r.exp, outcome)
                if bar is not None:
                    bar.update(1)
    except KeyboardInterrupt:
        summary.interrupted = True
        for r in running:
            _kill(r.proc)
            # A child killed mid-write leaves only its temp file; no partial record is kept.
    finally:
        if bar is not None:
            bar.close()
    return summary


def default_out_dir(sweep, mode):
    """results/runs/<sweep>/<gpu-slug or 'traced-cpu'>: one folder per sweep and environment."""
    info = nvml.device_info(0) if mode == "measure" else None
    if info:
        slug = f"{info['name']}-{info.get('driver', 'driver')}".lower()
        slug = "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in slug)
    else:
        slug = "traced-cpu"
    return os.path.join(RUNS_DIR, sweep, slug)

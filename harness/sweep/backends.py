"""Sweeps on a Slurm cluster (through submitit) or a Ray cluster: one task per experiment, one record each.

`vramlab run --launcher slurm|ray`. The submitting process does what the local launcher does around
the runs: it holds the output folder's lock, skips what is recorded (with `--retry`, reruns errors,
timeouts and crashes), shows progress as tasks finish, and on Ctrl-C, SIGTERM or SIGHUP cancels what
it submitted and keeps the records already written. Each task runs one experiment in a fresh worker
process (`launcher.run_isolated`) that writes its record into the output folder — which every node
must see — or the fallback record when the worker dies without one. A task that dies itself (its time
limit, a lost node, a cancel from outside) gets its fallback record from the submitting process, so
every submitted experiment ends with exactly one record.

Nothing outlives a killed submitting process: a reaper (harness/sweep/reaper.py) ends every process it started on
this machine and `scancel`s its arrays on a real cluster. A task holds its experiment's claim while it runs
(launcher.claim); a resume never starts an experiment still claimed, and a task finding its experiment recorded
since it was submitted does not run it again: each experiment is recorded once.

Slurm: job arrays (submitit's map_array, one per GPU count), one task per experiment; submitit keeps
its scripts, pickles and logs under <out>/.slurm/. Ray: one task per experiment (num_cpus=1), on a
running cluster (an address) or on a local one started here and shut down after. A task asks for the
experiment's GPUs when measuring (`gpus`, 1 unless a multi-GPU experiment), none to trace or rehearse.
"""

import contextlib
import io
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

from ..paths import ROOT
from ..records import write_record
from .launcher import (
    OutDirError,
    SweepSummary,
    _fallback_record,
    _progress,
    _raise_stop,
    _Stop,
    _tail,
    is_done,
    lock_out_dir,
    not_busy,
    prepare_out_dir,
    record_stamp,
    recorded_outcome,
    run_isolated,
)
from .reaper import Reaper
from .worker import SOURCE

# A Slurm task's time beyond the longest experiment timeout: the worker's start-up, and submitit's
# signal 90 s before the limit (slurm_signal_delay_s) must not come before the experiment's own timeout.
SLURM_MARGIN_MIN = 5


class LauncherError(ValueError):
    """A launcher that cannot run as asked: no Slurm here, no Ray cluster at the address."""


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def task_gpus(exp, mode):
    """GPUs one experiment's task needs: its `gpus` when measuring; none to trace or rehearse (CPU)."""
    return exp.spec.gpus if mode == "measure" else 0


class _Task:
    """One submitted experiment: its Slurm job or Ray object ref, and the record a retry replaces."""

    def __init__(self, exp, handle, stale):
        self.exp, self.handle, self.stale = exp, handle, stale
        self.submitted = time.monotonic()
        self.error = ""  # Ray: why the task failed, if it did


# A task that returned, yet the submitting process finds no record: the task wrote it somewhere else.
NO_RECORD_HERE = "it returned, but its record is not in the output folder (is --out on a filesystem the nodes share?)"


class SlurmBackend:
    """A job array through submitit: on Slurm, or with cluster='local' as local processes (for tests)."""

    name = "Slurm"

    def __init__(self, mode, cluster="auto", partition=None, time_min=None, gpus=None, job_name="vramlab"):
        import submitit

        if cluster != "local" and shutil.which("sbatch") is None:
            raise LauncherError("--launcher slurm: Slurm is not here (no sbatch on PATH); "
                                "--slurm-cluster local runs the same jobs on this machine")
        self.submitit, self.cluster, self.mode = submitit, "local" if cluster == "local" else "slurm", mode
        self.partition, self.time_min, self.job_name, self.gpus = partition, time_min, job_name, gpus

    def start(self, log_dir=None):
        pass

    def gpus_for(self, exp):
        """GPUs a task of this experiment asks for: --slurm-gpus-per-task, else the experiment's when measuring."""
        return self.gpus if self.gpus is not None else task_gpus(exp, self.mode)

    def parameters(self, exps):
        """submitit's parameters for the tasks of one array (experiments that need as many GPUs)."""
        longest = max(e.timeout_s for e in exps)
        return {"name": self.job_name, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": self.gpus_for(exps[0]),
                "timeout_min": self.time_min or math.ceil(longest / 60) + SLURM_MARGIN_MIN,
                "slurm_partition": self.partition}

    def submit(self, exps, out_dir, worker_cmd, reaper=None):
        # The task unpickles run_isolated: this checkout is importable there, installed or not.
        path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        python = f"env PYTHONPATH={shlex.quote(path)} {shlex.quote(sys.executable)}"
        folder = os.path.abspath(os.path.join(out_dir, ".slurm"))
        tasks = []
        try:
            executor = self.submitit.AutoExecutor(folder=folder, cluster=self.cluster,
                                                  **{f"{self.cluster}_python": python})
            for gpus in sorted({self.gpus_for(e) for e in exps}):  # one array per GPU count
                group = [e for e in exps if self.gpus_for(e) == gpus]
                executor.update_parameters(**self.parameters(group))
                stale = [record_stamp(out_dir, e.spec_hash) for e in group]
                with contextlib.redirect_stderr(io.StringIO()), _stderr_to(os.path.join(folder, "controllers.stderr")
                                                                           if self.cluster == "local" else None):
                    # submitit echoes sbatch's refusal (the error has it); local controllers print their tracebacks
                    # when cancelled (SIGINT) to the stderr they inherit: their log, not the terminal
                    jobs = executor.map_array(run_isolated, group, [out_dir] * len(group), [self.mode] * len(group),
                                              [worker_cmd] * len(group), stale)
                tasks += [_Task(e, j, s) for e, j, s in zip(group, jobs, stale)]
                if reaper is not None and self.cluster == "slurm":  # if this process dies, its arrays go with it
                    reaper.on_death(["scancel", *sorted({j.job_id.split("_")[0] for j in jobs})])
        except RuntimeError as e:  # sbatch refused an array (a partition or GPU count it lacks), or no srun
            self.cancel(tasks)
            raise LauncherError(f"--launcher slurm: {_first_line(e)}") from None
        return tasks

    def finished(self, pending, poll_s):
        time.sleep(poll_s)
        return [t for t in pending if t.handle.done()]

    def lost(self, task):
        """(why, outcome, stderr tail) of a task that ended without a record: its job's state (TIMEOUT,
        CANCELLED, NODE_FAIL, …) or the error it raised."""
        job = task.handle
        state = job.state
        if job.paths.result_pickle.exists():  # it returned or raised (job.exception() would wait for the file)
            error = job.exception()
            why = f"job {job.job_id} failed: {_first_line(error)}" if error else NO_RECORD_HERE
        else:
            why = f"job {job.job_id} ended {state} without a result"
        try:
            tail = (job.stderr() or "")[-4000:]
        except OSError:
            tail = ""
        return why, "timeout" if "TIMEOUT" in state else "crashed", tail

    def cancel(self, pending):
        if self.cluster == "slurm":  # one scancel per array, not one per task
            arrays = sorted({t.handle.job_id.split("_")[0] for t in pending})
            if arrays:
                subprocess.run(["scancel", *arrays], check=False, capture_output=True)
        else:
            for t in pending:
                t.handle.cancel(check=False)

    def close(self):
        pass


class RayBackend:
    """One Ray task per experiment on the cluster at `address`, or on a local one started for the sweep."""

    name = "Ray"

    def __init__(self, mode, address=None):
        import ray

        reachable(address)  # before anything is written: an address that does not answer is one line in seconds
        self.ray, self.mode, self.address = ray, mode, address
        self.started = False

    def start(self, log_dir=None):
        """Join the cluster at the address (checked first: one that does not answer is refused in seconds), or start a
        local one. Ray's own messages (its C++ core retrying an address that is no cluster) go to log_dir/ray.stderr."""
        if self.ray.is_initialized():  # a caller (a test) that holds a cluster already
            return
        self.started = True  # set first: close() shuts down what an interrupted init left
        joining = self.address not in (None, "", "auto", "local")
        saved = os.environ.get(GCS_WAIT_VAR)
        if joining and saved is None:  # Ray retries an address for NUM_REDIS_GET_RETRIES (20) seconds by default
            os.environ[GCS_WAIT_VAR] = str(GCS_WAIT_S)
        try:
            with _stderr_to(os.path.join(log_dir, "ray.stderr") if log_dir else None):
                self.ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                              logging_level=logging.WARNING)
        except ConnectionError as e:
            raise LauncherError(f"--address {self.address}: {_first_line(e)}") from None
        finally:
            if joining and saved is None:
                os.environ.pop(GCS_WAIT_VAR, None)

    def submit(self, exps, out_dir, worker_cmd, reaper=None):
        remote = self.ray.remote(run_isolated)
        most = max(1, int(self.ray.cluster_resources().get("CPU", 1)))  # more would wait forever
        tasks = []
        for e in exps:  # max_retries=0: a task whose process died gets a fallback record, never a second run
            cpus = min(e.spec.gpus, most) if self.mode == "rehearse" else 1  # a CPU rehearsal: a process per rank
            stamp = record_stamp(out_dir, e.spec_hash)
            ref = remote.options(num_cpus=cpus, num_gpus=task_gpus(e, self.mode), max_retries=0).remote(
                e, out_dir, self.mode, worker_cmd, stamp)
            tasks.append(_Task(e, ref, stamp))
        return tasks

    def finished(self, pending, poll_s):
        refs = {t.handle: t for t in pending}
        try:
            ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=poll_s)
        except SystemError as e:  # SIGTERM/SIGHUP's _Stop, raised while in Ray's C++ code, comes back wrapped
            if isinstance(e.__cause__, _Stop):
                raise e.__cause__ from None
            raise
        for ref in ready:
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayError as e:  # its process died, or run_isolated raised (e.cause)
                cause = getattr(e, "cause", None)
                refs[ref].error = _first_line(f"{type(cause).__name__}: {cause}" if cause else e)
        return [refs[ref] for ref in ready]

    def lost(self, task):
        """(why, outcome, stderr tail) of a task that ended without a record."""
        return (f"Ray task: {task.error}" if task.error else NO_RECORD_HERE), "crashed", ""

    def cancel(self, pending):
        for t in pending:  # force: the task's process dies, and its worker with it
            self.ray.cancel(t.handle, force=True)

    def close(self):
        if self.started:
            self.ray.shutdown()
            self.started = False


ADDRESS_TIMEOUT_S = 5.0  # a Ray address that does not accept a connection, or answer it, in this long is not a cluster
# The HTTP/2 client connection preface and an empty SETTINGS frame (RFC 9113 §3.4, §6.5): a gRPC server answers with
# its own SETTINGS frame (frame type 0x4, the fourth byte of the 9-byte frame header).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# ray/_private/node.py (2.60) Node._init_gcs_client: tries to reach the GCS once a second for
# RAY_gcs_server_port_wait_time_s attempts when set, else NUM_REDIS_GET_RETRIES (20).
GCS_WAIT_VAR, GCS_WAIT_S = "RAY_gcs_server_port_wait_time_s", 8


def reachable(address):
    """Refuse (LauncherError, in seconds) a Ray address whose host does not resolve or whose port does not accept a
    connection: ray.init retries such an address for minutes. None, 'auto' and 'local' are Ray's to find."""
    import socket

    if address in (None, "", "auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise LauncherError(f"--address {address}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        conn = socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_S)
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise LauncherError(f"--address {address}: no Ray cluster answers there ({why})") from None
    try:  # Ray's GCS (and its client server) speak gRPC: HTTP/2 answers a client's preface with a SETTINGS frame
        conn.settimeout(ADDRESS_TIMEOUT_S)
        conn.sendall(_HTTP2_PREFACE)
        reply = conn.recv(9)
    except OSError:
        reply = b""
    finally:
        conn.close()
    if len(reply) < 4 or reply[3] != 0x4:
        raise LauncherError(f"--address {address}: it accepts connections but does not answer as a Ray cluster does "
                            f"(gRPC) within {ADDRESS_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def _stderr_to(path):
    """File descriptor 2 goes to `path` (appended) for what starts inside, then back; nothing when path is None."""
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stderr.flush()
    saved, fd = os.dup(2), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def make_backend(launcher, mode, settings, job_name="vramlab"):
    """The backend of `--launcher`, from the merged flags and sweep-file settings; fails fast (one line) when
    its package or cluster is missing, before anything is written."""
    if launcher == "slurm":
        return SlurmBackend(mode, settings.get("cluster", "auto"), settings.get("partition"), settings.get("time_min"),
                            settings.get("gpus_per_task"), job_name)
    return RayBackend(mode, settings.get("address"))


def _lost(out_dir, task, mode, backend):
    """The fallback record of a task that ended without writing one; its outcome."""
    exp = task.exp
    why, outcome, tail = backend.lost(task)
    tail = tail or _tail(os.path.join(out_dir, ".logs", f"{exp.spec_hash}.stderr"))
    record = _fallback_record(exp, outcome, None, tail, time.monotonic() - task.submitted, SOURCE[mode])
    record["error"]["message"] = f"the {backend.name} task ended without a record ({why})"
    try:
        write_record(out_dir, record)
    except OSError as e:
        raise OutDirError(f"{out_dir}: cannot write the record of {exp.spec_hash} ({e.strerror or e}); "
                          "the records written so far are kept") from None
    return outcome


def run_on(backend, experiments, out_dir, mode="trace", retry=False, progress=True, poll_s=0.5, on_record=None,
           worker_cmd=None):
    """Run every experiment not yet recorded under out_dir as one task each on `backend`; a SweepSummary.

    worker_cmd: the command each task runs an experiment with (tests pass a stand-in), as run_sweep's."""
    prepare_out_dir(out_dir)
    lock = lock_out_dir(out_dir)
    summary = SweepSummary(out_dir=out_dir, total=len(experiments))
    # every task gets the GPUs it asks for: a record left "unsupported" for want of GPUs by a local run reruns here
    todo = [e for e in experiments if not is_done(out_dir, e, retry, summary.corrupt_moved, math.inf, summary.newer)]
    summary.skipped = len(experiments) - len(todo)
    todo = not_busy(out_dir, todo, retry, summary, slots=math.inf)
    main_thread = threading.current_thread() is threading.main_thread()
    pending, old, bar, reaper = [], {}, None, None
    try:
        if todo:
            reaper = Reaper()  # first: what starts from here on ends with this process (harness/sweep/reaper.py)
            backend.start(os.path.join(out_dir, ".logs"))
        if main_thread:  # after ray.init, whose own SIGTERM handler would end this process without cancelling
            old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
        if todo:
            pending = backend.submit(todo, out_dir, worker_cmd, reaper)
        bar = _progress(len(todo)) if progress else None
        while pending:
            for task in backend.finished(pending, poll_s):
                pending.remove(task)
                outcome = (recorded_outcome(out_dir, task.exp.spec_hash, task.stale)
                           or _lost(out_dir, task, mode, backend))
                summary.ran += 1
                summary.outcomes[outcome] = summary.outcomes.get(outcome, 0) + 1
                if on_record:
                    on_record(task.exp, outcome)
                if bar is not None:
                    bar.set_postfix_str(task.exp.label()[:60])
                    bar.update(1)
    except (KeyboardInterrupt, _Stop) as e:
        summary.interrupted = True
        summary.signal = str(e) if isinstance(e, _Stop) else "SIGINT"
        backend.cancel(pending)
    finally:
        try:
            backend.close()
        finally:
            if reaper is not None:
                reaper.close()
        for s, h in old.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # None: a handler set outside Python (Ray's)
        if bar is not None:
            bar.close()
        os.close(lock)
    return summary

"""Ends every process a Slurm or Ray sweep started on this machine once the submitting process is gone.

`vramlab run --launcher slurm --slurm-cluster local` starts submitit's job controllers, which start
the tasks, which start the workers; `--launcher ray` without --address starts a Ray cluster (GCS,
raylet, agents, workers). A worker dies with its task (PR_SET_PDEATHSIG), but the controllers and
Ray's agents and workers are started to outlive whoever started them: after a SIGKILL of the
submitting process they went on running experiments and writing records, and a resume ran those
experiments a second time.

So before it starts anything, the submitting process starts this one: a small process of its own
session (a Ctrl-C or a group kill of the terminal's job does not reach it first) that reads a pipe
from the submitting process. It knows the sweep's processes two ways, because each alone misses some:

- it follows the submitting process's tree of descendants every POLL_S (/proc/<pid>/task/<tid>/children),
  remembering each process with its start time — an orphan whose parent died (Ray's agents, when the
  raylet goes) is reparented to init and no longer in the tree, but it is remembered;
- the submitting process marks its environment with VRAMLAB_SWEEP_TOKEN=<token>, which everything it
  starts inherits (controllers, tasks, Ray's daemons and workers, the experiments' workers), so one
  started in the last POLL_S is found too — unless it overwrote its environment block with a process
  title (Ray's agents do: setproctitle reuses that memory), which the tree covers.

When the pipe closes — the submitting process ended, however it ended: the kernel closes the pipe —
this process SIGKILLs every process remembered (its start time unchanged, so never a reused PID) and
every process of this user whose environment carries the token, round after round until three rounds
find none (ESCAPE_S at most), and, unless the submitting process said `done` first, runs the commands
it was given (`scancel` of a real Slurm cluster's job arrays, whose tasks run on other machines).

    python -m harness.sweep.reaper TOKEN PID      # stdin: lines `cancel <json list of argv>` and `done`

Source: proc(5) for /proc/<pid>/environ (the environment a process started with, in its own memory)
and /proc/<pid>/task/<tid>/children (Linux ≥ 3.5); Ray's daemons and workers and submitit's
controllers copy their parent's environment (ray/_private/services.py start_ray_process; submitit
local/local.py start_controller `env = dict(os.environ)`); Ray's agents set their title with
setproctitle (ray/_private/utils.py), which may overwrite the environment block.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

TOKEN_VAR = "VRAMLAB_SWEEP_TOKEN"
POLL_S = 0.2  # how often the submitting process's tree of descendants is followed
ESCAPE_S = 8.0  # how long the rounds of SIGKILL go on at most while marked processes keep appearing


def marked_processes(token, exclude=()):
    """PIDs of this user's processes whose environment carries TOKEN_VAR=token (Linux /proc; [] elsewhere)."""
    needle = f"{TOKEN_VAR}={token}".encode()
    uid, out = os.getuid(), []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone, or not ours to read
            continue
        if needle + b"\0" in env or env.endswith(needle):
            out.append(int(name))
    return out


def start_time(pid):
    """The process's start time in clock ticks since boot (proc(5) stat field 22), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid):
    """PIDs of every live descendant of `pid` (through every thread's children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


class Tree:
    """The submitting process's descendants started since the reaper (what the sweep started), each remembered with
    its start time once seen."""

    def __init__(self, root):
        self.root, self.seen, self.lock = root, {}, threading.Lock()
        self.since = start_time(os.getpid()) or 0

    def follow(self):
        for pid in descendants(self.root):
            t = start_time(pid)
            if t is not None and t >= self.since and pid != os.getpid():
                with self.lock:
                    self.seen.setdefault(pid, t)

    def alive(self):
        """Remembered processes still running as themselves (a reused PID has another start time)."""
        with self.lock:
            seen = dict(self.seen)
        live = [pid for pid, t in seen.items() if start_time(pid) == t]
        return live + [k for pid in live for k in descendants(pid)]


def end_marked(token, exclude=(), escape_s=ESCAPE_S, tree=None):
    """SIGKILL every marked process (and every process of `tree`), again and again until three rounds in a row find
    none (at most escape_s); how many."""
    killed, deadline, quiet = set(), time.monotonic() + escape_s, 0
    exclude = set(exclude) | {os.getpid()}
    while quiet < 3 and time.monotonic() < deadline:  # three rounds in a row that find none: a child being started
        pids = marked_processes(token, exclude)       # as its parent died shows up in one of them
        pids += [p for p in (tree.alive() if tree else ()) if p not in exclude]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:
                pass
        quiet = 0 if pids else quiet + 1
        time.sleep(0.05)
    return len(killed)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    token, root = argv[0], int(argv[1]) if len(argv) > 1 else os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is the submitting process's to handle
    tree, stop = Tree(root), threading.Event()

    def follow():
        while not stop.is_set():
            tree.follow()
            stop.wait(POLL_S)

    threading.Thread(target=follow, daemon=True).start()
    cancels, done = [], False
    for line in sys.stdin:
        word, _, rest = line.strip().partition(" ")
        if word == "cancel":
            cancels.append(json.loads(rest))
        elif word == "done":
            done = True
    stop.set()
    # done: the submitting process lives on (a test calling run_on) and so may processes of its own that descend from
    # it; only the marked ones are the sweep's. Otherwise everything the sweep started goes.
    end_marked(token, tree=None if done else tree)
    if not done:
        for argv_ in cancels:
            try:
                subprocess.run(argv_, check=False, capture_output=True, timeout=30)
            except (OSError, subprocess.SubprocessError):
                pass
    return 0


class Reaper:
    """The submitting side: starts the reaper, marks this process's environment, and says `done` when it ends."""

    def __init__(self):
        self.token = secrets.token_hex(8)
        from ..paths import ROOT

        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop(TOKEN_VAR, None)
        self.proc = subprocess.Popen([sys.executable, "-m", "harness.sweep.reaper", self.token, str(os.getpid())],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env,
                                     start_new_session=True, text=True)
        self.before = os.environ.get(TOKEN_VAR)
        os.environ[TOKEN_VAR] = self.token

    def on_death(self, argv):
        """Run `argv` (e.g. scancel of the submitted arrays) if this process dies before close()."""
        try:
            self.proc.stdin.write(f"cancel {json.dumps(list(argv))}\n")
            self.proc.stdin.flush()
        except OSError:
            pass

    def close(self, timeout_s=ESCAPE_S + 5):
        """This process ends the sweep itself: end whatever it left on this machine, and wait for that."""
        if self.before is None:
            os.environ.pop(TOKEN_VAR, None)
        else:
            os.environ[TOKEN_VAR] = self.before
        try:
            self.proc.stdin.write("done\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    sys.exit(main())

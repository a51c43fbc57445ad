"""Ends every process a Slurm or Ray sweep started on this machine once the submitting process is gone.

`vramlab run --launcher slurm --slurm-cluster local` starts submitit's job controllers, which start
the tasks, which start the workers; `--launcher ray` without --address starts a Ray cluster (GCS,
raylet, agents, workers). A worker dies with its task (PR_SET_PDEATHSIG), but the controllers and
Ray's agents and workers are started to outlive whoever started them: after a SIGKILL of the
submitting process they went on running experiments and writing records, and a resume ran those
experiments a second time.

So before it starts anything, the submitting process starts this one: a small process of its own
session (a Ctrl-C or a group kill of the terminal's job does not reach it first) that reads a pipe
from the submitting process. The submitting process then marks its environment with
VRAMLAB_SWEEP_TOKEN=<token>, which everything it starts inherits (controllers, tasks, Ray's
daemons and workers, the experiments' workers). When the pipe closes — the submitting process
ended, however it ended, the kernel closes the pipe — this process SIGKILLs every process of this
user whose environment carries the token, round after round until none is left (ESCAPE_S at most),
and, unless the submitting process said `done` first, runs the commands it was given (`scancel` of
a real Slurm cluster's job arrays, whose tasks run on other machines).

    python -m harness.sweep.reaper TOKEN          # stdin: lines `cancel <json list of argv>` and `done`

Source for the environment: /proc/<pid>/environ is the environment a process started with
(proc(5)); Ray's daemons and workers and submitit's controllers copy their parent's environment
(ray/_private/services.py start_ray_process; submitit/local/local.py start_controller `env =
dict(os.environ)`).
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import time

TOKEN_VAR = "VRAMLAB_SWEEP_TOKEN"
ESCAPE_S = 10.0  # how long the rounds of SIGKILL go on while marked processes keep appearing


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


def end_marked(token, exclude=(), escape_s=ESCAPE_S):
    """SIGKILL every marked process, again and again until a round finds none (at most escape_s); how many."""
    killed, deadline = set(), time.monotonic() + escape_s
    exclude = set(exclude) | {os.getpid()}
    while True:
        pids = marked_processes(token, exclude)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:
                pass
        if not pids or time.monotonic() > deadline:
            return len(killed)
        time.sleep(0.05)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    token = argv[0]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is the submitting process's to handle
    cancels, done = [], False
    for line in sys.stdin:
        word, _, rest = line.strip().partition(" ")
        if word == "cancel":
            cancels.append(json.loads(rest))
        elif word == "done":
            done = True
    end_marked(token)
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
        self.proc = subprocess.Popen([sys.executable, "-m", "harness.sweep.reaper", self.token], stdin=subprocess.PIPE,
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

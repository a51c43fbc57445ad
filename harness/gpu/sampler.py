"""A background thread that samples NVML memory on a drift-free schedule, per phase.

Measurement wraps the workload: the workload only calls `mark(phase)`; the sampler keeps
the peak of device-used and process-used memory in each phase, and how long its own
sampling took (its overhead).
"""

import threading
import time

from . import nvml

PROCESS_EVERY = 20  # per-process memory is sampled every 20th device sample


class NvmlSampler:
    """Sample device i every `interval_s` seconds until stopped; peaks per phase."""

    def __init__(self, device_index=0, interval_s=0.001, pid=None, keep_timeline=2000):
        self.device_index = device_index
        self.interval_s = interval_s
        self.pid = pid  # the pid NVML reports for the measured process (a host pid in a container); None: unknown
        self.phase = "load"
        self.peaks = {}  # phase → {"device_used_bytes": max, "process_used_bytes": max}
        self.samples = 0
        self.busy_s = 0.0  # time spent inside sampling calls
        self.timeline = []  # (seconds since start, phase, device used), decimated to keep_timeline points
        self._keep = keep_timeline
        self._stop = threading.Event()
        self._thread = None
        self._t0 = None
        self._process_api = pid is not None

    def mark(self, phase):
        """Start attributing samples to `phase` (and take one sample at the boundary)."""
        self._sample()
        self.phase = phase

    def _sample(self):
        t = time.perf_counter()
        used = nvml.used_bytes(self.device_index)
        # The process list is a millisecond-scale query: ask it every PROCESS_EVERY-th sample only, so the
        # device-used figure keeps its interval.
        ask = self._process_api and self.samples % PROCESS_EVERY == 0
        proc = nvml.process_used_bytes(self.device_index, self.pid) if ask else None
        if ask and proc is None:
            self._process_api = self.samples < 10 * PROCESS_EVERY  # stop asking a driver that never says
        self.busy_s += time.perf_counter() - t
        self.samples += 1
        if used is None:
            return
        pk = self.peaks.setdefault(self.phase, {"device_used_bytes": 0, "process_used_bytes": None})
        pk["device_used_bytes"] = max(pk["device_used_bytes"], used)
        if proc is not None:
            pk["process_used_bytes"] = max(pk["process_used_bytes"] or 0, proc)
        if self._t0 is not None and (self.samples % max(1, self.samples // self._keep + 1) == 0):
            self.timeline.append((round(t - self._t0, 6), self.phase, used))

    def _run(self):
        nxt = time.perf_counter()
        while not self._stop.is_set():
            self._sample()
            nxt += self.interval_s  # drift-free: the schedule, not the last wake-up, sets the next sample
            delay = nxt - time.perf_counter()
            if delay > 0:
                self._stop.wait(delay)
            else:
                nxt = time.perf_counter()  # fell behind: do not burst to catch up

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="vramlab-nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
        return False

    def peak(self, key="device_used_bytes"):
        """Largest value of `key` over all phases, and the phase it fell in."""
        best = (None, None)
        for ph, pk in self.peaks.items():
            v = pk.get(key)
            if v is not None and (best[0] is None or v > best[0]):
                best = (v, ph)
        return best

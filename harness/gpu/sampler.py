"""A background thread that samples NVML memory per phase, on an adaptive drift-free schedule.

Measurement wraps the workload: the workload only calls `mark(phase)`; the sampler keeps
the peak of device-used and process-used memory in each phase, and what its own sampling cost.

Why adaptive: a device-used reading took ~70 µs on the H200 (with the process list every 20th
sample), so sampling every millisecond cost 10 % of the workload (`overhead_fraction`, median 0.099
over the first 62 records). Device-used only moves when memory is taken from or given back to the
driver — the caching allocator's segments, the context's own — and the caching allocator keeps what
it took until the experiment ends, so between moves there is nothing to see. The interval starts at
`interval_s` (1 ms), doubles after every sample that reads the same value up to `max_interval_s`, and
drops back to `interval_s` on every change and at every phase mark: 1 ms resolution wherever memory
moves — the growth to each peak — and a sample every `max_interval_s` on the plateaus. Phase marks
sample on the workload's thread, after the allocator is synchronised, so each phase's peak is read at
its end whatever the interval was.

The per-process figure (the process list: a millisecond-scale query; recorded, read by nothing
else) is taken only after device-used reaches a new high in the phase, at most every
PROCESS_MIN_GAP_S, and once more at the end if one is due.

Cost (`cpu_s`): the sampler thread's own CPU time (`time.thread_time` inside the thread) plus the time
of the samples taken on the workload's thread; measure.py divides it by the workload time.
"""

import threading
import time

from . import nvml

# Plateau interval: a wake-up of this thread costs ~40-80 µs of CPU (Event.wait and the loop, measured on a
# 2-core CPU box) besides the ~20 µs reading, so 50 ms keeps a plateau under 0.2 %.
MAX_INTERVAL_S = 0.05
PROCESS_MIN_GAP_S = 0.5  # the process list at most twice a second
PROCESS_TRIES = 10  # a driver that never answers the process query is asked this many times


def next_interval(current, changed, minimum, maximum):
    """The sampling interval after a sample: back to `minimum` when the reading changed, else doubled up to `maximum`."""
    return minimum if changed else min(current * 2, maximum)


class NvmlSampler:
    """Sample device i from `interval_s` to `max_interval_s` seconds apart until stopped; peaks per phase."""

    def __init__(self, device_index=0, interval_s=0.001, pid=None, keep_timeline=2000, max_interval_s=MAX_INTERVAL_S):
        self.device_index = device_index
        self.interval_s = interval_s
        self.max_interval_s = max(max_interval_s, interval_s)
        self.pid = pid  # the pid NVML reports for the measured process (a host pid in a container); None: unknown
        self.phase = "load"
        self.peaks = {}  # phase → {"device_used_bytes": max, "process_used_bytes": max}
        self.samples = 0
        self.process_samples = 0
        self.busy_s = 0.0  # wall time inside sampling calls, both threads
        self.thread_cpu_s = 0.0  # CPU time of the sampler thread, from its start to its end
        self.marks_s = 0.0  # wall time of the samples taken on the workload's thread (marks, the last one)
        self.timeline = []  # (seconds since start, phase, device used), decimated to keep_timeline points
        self._keep = keep_timeline
        self._stop = threading.Event()
        self._thread = None
        self._t0 = None
        self._lock = threading.Lock()  # a mark's sample and the thread's never interleave
        self._last = None  # the last device-used reading
        self._interval = interval_s
        self._process_api = pid is not None
        self._process_tries = 0
        self._process_due = False  # a new high since the last process reading
        self._process_at = -1.0  # perf_counter of the last process reading

    @property
    def cpu_s(self):
        """What sampling cost the process: the thread's CPU time and the marks' samples."""
        return self.thread_cpu_s + self.marks_s

    def mark(self, phase):
        """Start attributing samples to `phase`, after one sample at the boundary."""
        t = time.perf_counter()
        self._sample(boundary=True)
        self.phase = phase
        self._interval = self.interval_s
        self.marks_s += time.perf_counter() - t

    def _ask_process(self, now, last):
        if not (self._process_api and self._process_due):
            return False
        return last or now - self._process_at >= PROCESS_MIN_GAP_S

    def _sample(self, boundary=False, last=False):
        with self._lock:
            t = time.perf_counter()
            used = nvml.used_bytes(self.device_index)
            pk = None
            if used is not None:  # without NVML no phase gets a figure (peak() says None)
                pk = self.peaks.setdefault(self.phase, {"device_used_bytes": 0, "process_used_bytes": None})
                if used > pk["device_used_bytes"]:
                    pk["device_used_bytes"] = used
                    self._process_due = True
            proc = None
            if self._ask_process(t, last):
                proc = nvml.process_used_bytes(self.device_index, self.pid)
                self._process_at, self._process_due = time.perf_counter(), False
                self.process_samples += 1
                self._process_tries += 1
                if proc is None and self._process_tries >= PROCESS_TRIES:
                    self._process_api = False  # stop asking a driver that never says
            if proc is not None and pk is not None:
                pk["process_used_bytes"] = max(pk["process_used_bytes"] or 0, proc)
            self.busy_s += time.perf_counter() - t
            self.samples += 1
            changed = used != self._last
            self._last = used
            if used is not None and self._t0 is not None and (changed or boundary
                                                              or self.samples % max(1, self.samples // self._keep + 1) == 0):
                self.timeline.append((round(t - self._t0, 6), self.phase, used))
            if len(self.timeline) > 2 * self._keep:
                self.timeline = self.timeline[::2]
            return changed

    def _run(self):
        cpu0 = time.thread_time()
        nxt = time.perf_counter()
        try:
            while not self._stop.is_set():
                changed = self._sample()
                self._interval = next_interval(self._interval, changed, self.interval_s, self.max_interval_s)
                nxt += self._interval  # drift-free: the schedule, not the last wake-up, sets the next sample
                delay = nxt - time.perf_counter()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    nxt = time.perf_counter()  # fell behind: do not burst to catch up
        finally:
            self.thread_cpu_s = time.thread_time() - cpu0

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="vramlab-nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        t = time.perf_counter()
        self._sample(boundary=True, last=True)
        self.marks_s += time.perf_counter() - t
        return False

    def peak(self, key="device_used_bytes"):
        """Largest value of `key` over all phases, and the phase it fell in."""
        best = (None, None)
        for ph, pk in self.peaks.items():
            v = pk.get(key)
            if v is not None and (best[0] is None or v > best[0]):
                best = (v, ph)
        return best

"""NVML through one small wrapper: initialised lazily, "not available" instead of exceptions.

Everything here returns None (or an empty list) where there is no NVIDIA driver, so
callers on a CPU machine need no special cases.
"""

import threading

_lock = threading.Lock()
_state = {"init": None, "mod": None}


def _nvml():
    """The pynvml module, initialised once; None without a driver."""
    with _lock:
        if _state["init"] is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _state["mod"], _state["init"] = pynvml, True
            except Exception:
                _state["init"] = False
        return _state["mod"] if _state["init"] else None


def available():
    """True when NVML answers."""
    return _nvml() is not None


def device_count():
    n = _nvml()
    if n is None:
        return 0
    try:
        return n.nvmlDeviceGetCount()
    except Exception:
        return 0


def _handle(i):
    """(pynvml, handle of device i), or (None, None) without NVML or for an index it does not know."""
    n = _nvml()
    if n is None:
        return None, None
    try:
        return n, n.nvmlDeviceGetHandleByIndex(i)
    except Exception:
        return None, None


def _str(x):
    return x.decode() if isinstance(x, bytes) else x


def device_info(i=0):
    """GPU name, total memory, driver, CUDA driver version and NVML memory API of device i; None without NVML."""
    n, h = _handle(i) if device_count() > i else (None, None)
    if h is None:
        return None
    info = {"index": i, "name": _str(n.nvmlDeviceGetName(h))}
    try:
        info["memory_total_bytes"] = int(n.nvmlDeviceGetMemoryInfo(h).total)
        info["driver"] = _str(n.nvmlSystemGetDriverVersion())
        info["nvml_version"] = _str(n.nvmlSystemGetNVMLVersion())
        cuda = n.nvmlSystemGetCudaDriverVersion()
        info["cuda_driver"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        info["uuid"] = _str(n.nvmlDeviceGetUUID(h))
    except Exception:
        pass
    info["memory_api"] = "v2" if _memory_v2(n, h) is not None else "v1"
    return info


def _memory_v2(n, h):
    # nvmlDeviceGetMemoryInfo_v2 separates driver-reserved memory from "used" (driver ≥ 510).
    try:
        return n.nvmlDeviceGetMemoryInfo(h, version=n.nvmlMemory_v2)
    except Exception:
        return None


def device_uuid(i=0):
    """NVML's UUID of device i ('GPU-8c2b…'); None without NVML."""
    n, h = _handle(i) if device_count() > i else (None, None)
    if h is None:
        return None
    try:
        return _str(n.nvmlDeviceGetUUID(h))
    except Exception:
        return None


def used_bytes(i=0):
    """Device memory in use (all processes, as nvidia-smi's Memory-Usage); None without NVML."""
    n, h = _handle(i) if available() else (None, None)
    if h is None:
        return None
    try:
        return int(n.nvmlDeviceGetMemoryInfo(h).used)
    except Exception:
        return None


def processes(i=0):
    """[(pid, used bytes or None)] of compute processes on device i."""
    n, h = _handle(i) if available() else (None, None)
    if h is None:
        return []
    try:
        return [(p.pid, p.usedGpuMemory) for p in n.nvmlDeviceGetComputeRunningProcesses(h)]
    except Exception:
        return []


def process_used_bytes(i, pid):
    """Memory NVML attributes to process `pid` on device i (None where the driver does not say)."""
    for p, used in processes(i):
        if p == pid:
            return used
    return None

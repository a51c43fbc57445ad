"""Nominal GPU memory for `--gpu NAME`, read from the hardware catalog (`catalog/hardware.json`)."""

from .hardware import get_hardware, hardware_names


def gpu_names():
    """Names of the GPUs with a known capacity."""
    return hardware_names()


def gpu_memory_bytes(name):
    """(canonical name, nominal memory bytes) of a GPU; unknown names are a ValueError naming the flag."""
    hw = get_hardware(name)
    return hw.name, hw.memory_bytes

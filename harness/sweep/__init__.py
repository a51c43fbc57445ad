"""Sweeps: YAML experiments, one process and one record per experiment, resumable.

`schema` reads and validates sweep files and hashes each experiment; `launcher` runs them, one
subprocess per experiment and GPU, with timeouts and resume; `worker` is that subprocess.
"""

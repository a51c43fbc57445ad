"""Sweeps: YAML experiments, one process and one record per experiment, resumable.

`schema` reads and validates sweep files and hashes each experiment; `launcher` runs them, one
subprocess per experiment and GPU, with timeouts and resume; `worker` is that subprocess; `ranks`
runs a multi-GPU experiment's ranks under torchrun (or rehearses them on the CPU) for the worker;
`backends` runs a sweep's experiments as Slurm or Ray tasks instead (`vramlab run --launcher slurm|ray`), and
`reaper` ends what those started when the submitting process dies; `documents` is the one YAML reader (sweep
files and published measurement sets), with its limits.
"""

"""GPU measurement, wrapped around the workload: NVML, a sampler, and the model built on the device.

`nvml` is the one wrapper around the driver's library ("not available" instead of exceptions),
`sampler` samples device memory per phase on a drift-free schedule, `measure` builds the model on
the GPU and records allocator and NVML peaks around the workload.
"""

"""Tracing: the workload on fake tensors (no GPU, no memory), every tensor's bytes counted per category.

`tracer` runs it and keeps the per-category peaks and a timeline; `allocator` replays the
allocations through a model of PyTorch's CUDA caching allocator for an estimate of reserved bytes.
"""

"""The workloads vramlab runs, shared by tracing and GPU measurement: shape-matched models and their steps.

`models` builds the transformers model a Spec describes (dtype, attention, LoRA, freezing,
checkpointing); `steps` runs generate-style inference or training steps and calls
`mark(phase)` as each phase begins. Nothing here measures: tracing and measurement wrap it.
"""

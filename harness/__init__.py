"""vramlab's experiment side: everything that runs, measures or reads what was measured.

    cli/        the `vramlab` command, one module per verb
    workload/   the model a Spec describes and the steps it runs (shared by tracing and measurement)
    tracing/    the workload on fake tensors, bytes counted per category
    gpu/        NVML, the sampler, measurement wrapped around the workload on a GPU
    sweep/      sweep files, the launcher and the one-experiment worker
    analysis/   calibration tables, regression checks, reports, result tables
    records.py  the record schema (by source: predicted, traced, measured), atomic files, migration
    env.py      the environment fingerprint every record carries
    paths.py    where the checkout and results/ live

The predictor and the planner are pure and live in formulas/. Importing this package stays
cheap: torch, transformers and pandas are imported only inside the commands that need them,
so `vramlab predict` answers without them.
"""

__version__ = "0.1.0"

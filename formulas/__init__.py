"""vramlab's analytic memory predictor: pure Python over a model's shape, no torch, no I/O but config reading."""

"""Where vramlab's checkout and its committed data live. One place, so every module agrees."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (editable install)
RESULTS_DIR = os.path.join(ROOT, "results")
RUNS_DIR = os.path.join(RESULTS_DIR, "runs")  # records: runs/<sweep>/<gpu-driver>/<spec_hash>.json
CALIBRATION_DIR = os.path.join(RESULTS_DIR, "calibration")  # tables fitted by `vramlab fit`

"""Time the grid helper on 100,000 specs (bar: under 2 s on 2 cores).

    python benchmarks/grid_bench.py [--n 100000]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from formulas.grid import expand_grid, predict_grid  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000, help="number of specs (approximately)")
    a = ap.parse_args()
    models = ["Llama-3.1-8B", "Qwen2.5-7B", "Mistral-7B-v0.1", "Qwen3-30B-A3B", "DeepSeek-R1-Distill-Qwen-32B"]
    dtypes = ["bf16", "int8", "nf4", "q4_k_m"]
    batches = list(range(1, 51))
    n_seq = max(1, a.n // (len(models) * len(dtypes) * len(batches) * 2))
    seqs = [128 * (i + 1) for i in range(n_seq)]
    t0 = time.perf_counter()
    specs = expand_grid(model=models, dtype=dtypes, batch=batches, seq=seqs, gen=[0, 256])
    t1 = time.perf_counter()
    df = predict_grid(specs)
    t2 = time.perf_counter()
    print(f"{len(specs):,} specs: build {t1 - t0:.2f} s, predict_grid {t2 - t1:.2f} s "
          f"({(t2 - t1) / len(specs) * 1e6:.1f} µs/spec); peak device max {df.peak_device_bytes.max() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()

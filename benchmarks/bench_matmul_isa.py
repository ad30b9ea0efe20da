"""fp32 matmul speed at the embedded model's shapes with the CPU's full instruction set and with PyTorch, MKL and
oneDNN held to AVX2 (what a CPU without AVX-512 runs), side by side, each setting in its own process (the caps are
read at start-up):

    python benchmarks/bench_matmul_isa.py

Shapes: a training/prefill MLP projection (4,800 tokens x 576 -> 1,536) and a decoding step's (64 rows). On a CPU
with AVX-512 the capped run shows what the AVX2 kernels cost on the same cores, not how fast another CPU is.
"""
from __future__ import annotations

import os
import subprocess
import sys

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
MEASURE = """
import time, torch
w = torch.randn(1536, 576)
for rows in (4800, 64):
    a = torch.randn(rows, 576)
    for _ in range(3): a @ w.T
    n = 20 if rows > 64 else 200
    t = time.perf_counter()
    for _ in range(n): a @ w.T
    dt = (time.perf_counter() - t) / n
    print(f"{rows}:{2 * rows * 576 * 1536 / dt / 1e9:.0f}")
"""


def main() -> None:
    print("| kernels | GFLOPS, 4,800 x 576 -> 1,536 (training, prefill) | GFLOPS, 64 x 576 -> 1,536 (decoding) |")
    print("|---|---:|---:|")
    for label, env in (("full instruction set", {}), ("held to AVX2", AVX2)):
        out = subprocess.run([sys.executable, "-c", MEASURE], env={**os.environ, **env}, capture_output=True,
                             text=True, check=True).stdout
        gflops = dict(line.split(":") for line in out.split())
        print(f"| {label} | {gflops['4800']} | {gflops['64']} |")


if __name__ == "__main__":
    main()

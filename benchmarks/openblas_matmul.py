"""MLX fp32 matmul throughput on Linux CPU: bundled reference BLAS vs OpenBLAS (mm1_mlx's loader).

    python benchmarks/openblas_matmul.py [--size 1024] [--repeats 10]

Each setting runs in its own process (OpenBLAS must be loaded before mlx.core is imported).
"""

import argparse
import os
import subprocess
import sys

MEASURE = """
import sys, time
import mm1_mlx
import mlx.core as mx
size, repeats = int(sys.argv[1]), int(sys.argv[2])
a, b = mx.random.normal((size, size)), mx.random.normal((size, size))
mx.eval(a @ b)
start = time.perf_counter()
for _ in range(repeats):
    mx.eval(a @ b)
seconds = (time.perf_counter() - start) / repeats
print(2 * size**3 / seconds / 1e9, mm1_mlx.OPENBLAS)
"""


def gflops(size: int, repeats: int, openblas: bool) -> tuple[float, str]:
    env = {**os.environ, "MM1_MLX_OPENBLAS": "1" if openblas else "0"}
    command = [sys.executable, "-c", MEASURE, str(size), str(repeats)]
    rate, library = subprocess.run(
        command, env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    return float(rate), library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    bundled, _ = gflops(args.size, max(1, args.repeats // 5), openblas=False)
    fast, library = gflops(args.size, args.repeats, openblas=True)
    print(f"fp32 {args.size}x{args.size} matmul, MLX CPU")
    print(f"  bundled BLAS : {bundled:8.1f} GFLOP/s")
    print(f"  OpenBLAS     : {fast:8.1f} GFLOP/s  ({library})")
    print(f"  ratio        : {fast / bundled:8.1f}x")


if __name__ == "__main__":
    main()

"""Make MLX's CPU backend use OpenBLAS on Linux.

The `mlx[cpu]` wheel bundles a reference BLAS that runs fp32 matmuls at ~5 GFLOP/s. Loading
Debian's OpenBLAS into the global symbol scope *before* `mlx.core` is imported makes MLX's
`cblas_*` calls resolve to it (~30-50x faster). OpenBLAS picks its kernels when it loads, from
`OPENBLAS_CORETYPE`, so we set that from the CPU flags first (its own detection can fall back
to slow generic kernels on virtual machines). Nothing happens when OpenBLAS is missing, when
`MM1_MLX_OPENBLAS=0`, or when mlx was imported before us (then it is too late: a
warning says so).
"""

import ctypes
import ctypes.util
import os
import platform
import sys
import warnings
from pathlib import Path

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def _core_type(cpuinfo: str, machine: str) -> str | None:
    """The OpenBLAS kernel set for an x86_64 CPU with these /proc/cpuinfo flags, else None."""
    if machine != "x86_64":
        return None
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def _this_core_type() -> str | None:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return _core_type(cpuinfo, platform.machine())


def _library_path() -> str | None:
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("openblas")


def load_openblas() -> str | None:
    """Load OpenBLAS globally; returns the library path, or None if it was not loaded."""
    if sys.platform != "linux" or os.environ.get("MM1_MLX_OPENBLAS", "1") == "0":
        return None
    path = _library_path()
    if path is None:
        return None
    if "mlx.core" in sys.modules:
        # Silent, this costs ~35x on every fp32 matmul: say so once, where it can be fixed.
        warnings.warn(
            "mlx was imported before mm1_mlx, so MLX keeps its slow reference BLAS: "
            "import mm1_mlx first (or set MM1_MLX_OPENBLAS=0 to silence this)",
            stacklevel=3,
        )
        return None
    core_type = _this_core_type()
    if core_type is not None:
        os.environ.setdefault("OPENBLAS_CORETYPE", core_type)
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    return path

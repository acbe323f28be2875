"""The OpenBLAS loader: used when present, optional, and harmless when too late."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mm1_mlx import _openblas

PROBE = """
import numpy as np
import mm1_mlx
import mlx.core as mx
a = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((200, 100)).astype(np.float32)
error = np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max()
print(mm1_mlx.OPENBLAS, error)
"""


def run_probe(env: dict[str, str], prelude: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", prelude + PROBE],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
    )


def probe(env: dict[str, str], prelude: str = "") -> tuple[str, float]:
    library, error = run_probe(env, prelude).stdout.split()
    return library, float(error)


has_openblas = _openblas._library_path() is not None


@pytest.mark.skipif(sys.platform != "linux" or not has_openblas, reason="needs Linux OpenBLAS")
def test_openblas_is_loaded_and_matmuls_are_right():
    library, error = probe({})
    assert Path(library).name.startswith("libopenblas")
    assert error < 1e-3


def test_it_can_be_turned_off_and_is_skipped_after_mlx():
    assert probe({"MM1_MLX_OPENBLAS": "0"})[0] == "None"
    library, error = probe({}, prelude="import mlx.core\n")
    assert library == "None" and error < 1e-3


@pytest.mark.skipif(sys.platform != "linux" or not has_openblas, reason="needs Linux OpenBLAS")
def test_importing_mlx_first_is_warned_about():
    assert "import mm1_mlx first" in run_probe({}, prelude="import mlx.core\n").stderr
    assert "import mm1_mlx first" not in run_probe({}).stderr
    assert (
        "import mm1_mlx first"
        not in run_probe({"MM1_MLX_OPENBLAS": "0"}, "import mlx.core\n").stderr
    )


AVX512 = "fpu sse4_2 avx avx2 fma avx512f avx512dq avx512bw avx512vl"


@pytest.mark.parametrize(
    "flags, machine, expected",
    [
        (AVX512, "x86_64", "SkylakeX"),
        ("fpu sse4_2 avx avx2 fma", "x86_64", "Haswell"),
        ("fpu sse4_2 avx avx2 fma avx512f", "x86_64", "Haswell"),  # AVX-512 without BW/VL/DQ
        ("fpu sse4_2 avx avx2", "x86_64", None),  # AVX2 without FMA
        ("fpu sse4_2 avx", "x86_64", None),
        (AVX512, "aarch64", None),
    ],
)
def test_core_type_comes_from_cpu_flags(flags, machine, expected):
    cpuinfo = f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n\n"
    second_cpu = f"processor\t: 1\nflags\t\t: {flags}\n"
    assert _openblas._core_type(cpuinfo + second_cpu, machine) == expected


def test_core_type_without_flags_is_none():
    assert _openblas._core_type("processor\t: 0\n", "x86_64") is None

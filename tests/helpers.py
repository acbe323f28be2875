"""Shared helpers for tests (import as `from helpers import ...`)."""

import io
import random
import sys
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
from PIL import Image

from mm1_mlx.cli import main
from mm1_mlx.train import synth


def shapes_picture(seed: int = 0) -> Image.Image:
    """A shape scene of the synthetic world, drawn by its plain renderer."""
    return synth.render(synth.sample_shape_scene(random.Random(seed)))


def relative_error(actual, expected) -> float:
    """max |a - e| / max |e|: the parity measure every reference test uses (<= 1e-4)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def run_cli(*args: str, stdin: str = "") -> tuple[int, str, str]:
    """Run the `mm1-mlx` entry point in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_stdin = sys.argv, sys.stdin
    sys.argv, sys.stdin = ["mm1-mlx", *args], io.StringIO(stdin)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        sys.argv, sys.stdin = old_argv, old_stdin
    return code, out.getvalue(), err.getvalue()


def init_model_folder(config_path, tokenizer, out) -> None:
    """`mm1-mlx init CONFIG --tokenizer T --out OUT`, which must succeed."""
    code, _, err = run_cli(
        "init", str(config_path), "--tokenizer", str(tokenizer), "--out", str(out)
    )
    assert code == 0, err

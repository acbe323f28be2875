"""Shared helpers for tests (import as `from helpers import ...`)."""

import numpy as np


def relative_error(actual, expected) -> float:
    """max |a - e| / max |e|: the parity measure every reference test uses (<= 1e-4)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))

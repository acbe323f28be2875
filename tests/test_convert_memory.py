"""Converting holds about one copy of the checkpoint, not several (issue: at most ~1.5x)."""

import subprocess
import sys

import pytest
from builders import make_clip_vision, make_llm

BIG = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
)

PEAK_RSS = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-m", "mm1_mlx", *sys.argv[1:]], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def peak_rss_of_convert(vision, llm, out) -> int:
    args = ["convert", "--vision", str(vision), "--llm", str(llm), "--out", str(out)]
    args += ["--num-image-tokens", "4"]
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *args], check=True, capture_output=True, text=True
    )
    return int(result.stdout.strip())


@pytest.mark.slow
def test_convert_memory_is_about_one_checkpoint(tmp_path):
    make_clip_vision(tmp_path / "vision")
    make_llm(tmp_path / "small", "llama")
    make_llm(tmp_path / "big", "llama", **BIG)
    checkpoint = (tmp_path / "big" / "model.safetensors").stat().st_size
    assert checkpoint > 100e6
    baseline = peak_rss_of_convert(tmp_path / "vision", tmp_path / "small", tmp_path / "a")
    peak = peak_rss_of_convert(tmp_path / "vision", tmp_path / "big", tmp_path / "b")
    growth = (peak - baseline) / checkpoint
    print(f"convert: peak RSS grows by {growth:.2f}x the checkpoint ({checkpoint / 1e6:.0f} MB)")
    assert growth <= 1.5

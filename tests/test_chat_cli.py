"""`mm1-mlx chat`: one-shot answers, the interactive chat, and every kind of bad input."""

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

from mm1_mlx.generate import generate


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "screen.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 32, 3), np.uint8)).save(path)
    return path


def test_one_shot_prints_the_streamed_answer(tiny_model_dir, tiny_model, screen):
    code, out, err = run_cli(
        "chat", "--model", str(tiny_model_dir), "--image", str(screen), "--max-tokens", "6",
        "Where is the Send button?",
    )  # fmt: skip
    assert code == 0, err
    model, processor = tiny_model
    expected = generate(model, processor, "<image>\nWhere is the Send button?",
                        [Image.open(screen)], max_tokens=6)  # fmt: skip
    assert out == expected + "\n"


def test_verbose_prints_timing_and_memory(tiny_model_dir, screen):
    code, _, err = run_cli(
        "chat", "--model", str(tiny_model_dir), "--image", str(screen), "--max-tokens", "3",
        "--verbose", "Describe the image.",
    )  # fmt: skip
    assert code == 0
    for word in ("TTFT", "prefill", "decode", "tok/s", "peak memory"):
        assert word in err


def test_interactive_chat_commands(tiny_model_dir, screen):
    lines = [
        f"/image {screen}",
        "What is the title of this screen?",
        "How many buttons are there?",
        "/history",
        "/reset",
        "/history",
        "/image /nowhere.png",
        "/bogus",
        "/quit",
        "never read",
    ]
    code, out, err = run_cli(
        "chat", "--model", str(tiny_model_dir), "--max-tokens", "3", stdin="\n".join(lines) + "\n"
    )
    assert code == 0, err
    assert "attached" in out and "new conversation" in out
    assert out.count("user: ") == 2  # two turns in the history, none after /reset
    assert "<image>" in out  # the first turn carries the picture
    assert "no such image file" in out and "unknown command /bogus" in out


def bad_inputs(tmp_path, tiny_model_dir, screen):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(screen.read_bytes()[:100])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    model = ["--model", str(tiny_model_dir)]
    return {
        "missing image": ([*model, "--image", str(tmp_path / "nope.png"), "hi"], "nope.png"),
        "empty image": ([*model, "--image", str(empty), "hi"], "empty.png"),
        "truncated image": ([*model, "--image", str(truncated), "hi"], "truncated.png"),
        "not an image": ([*model, "--image", str(text), "hi"], "notes.png"),
        "too many markers": ([*model, "--image", str(screen), "<image> <image> hi"], "marker"),
        "unknown model": (["--model", str(tmp_path / "nomodel"), "hi"], "nomodel"),
        "bad --annotate name": (
            [*model, "--image", str(screen), "--annotate", str(tmp_path / "x.gif"), "hi"],
            "x.gif",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["missing image", "empty image", "truncated image", "not an image", "too many markers",
     "unknown model", "bad --annotate name"],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_1(tmp_path, tiny_model_dir, screen, case):
    args, names = bad_inputs(tmp_path, tiny_model_dir, screen)[case]
    code, out, err = run_cli("chat", *args)
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert names in err
    assert out == ""

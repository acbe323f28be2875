"""The demo model shipped in the package (train/recipes/demo): the default of `mm1-mlx chat`,
offline, and right about held-out images of the synthetic world; and its recipe runs."""

import json
import os
import random
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import run_cli
from PIL import Image

from mm1_mlx.boxes import format_box
from mm1_mlx.evaluate import evaluate, is_correct, load_examples, whole_box
from mm1_mlx.loading import DEMO_MODEL, load
from mm1_mlx.processor import read_image_size
from mm1_mlx.train import synth
from mm1_mlx.train.synth import TASKS, write_eval

ROOT = Path(__file__).resolve().parent.parent
# Per question type, what the shipped model must keep reaching on a fresh held-out sample of
# 25: its 200-per-type accuracy (README.md; benchmarks/demo_eval.py) less 3 standard errors of
# a 25-example sample, rounded down to 0.05 and at least 0.05, at most 0.9 (title, compare
# and ground_button: 98.5-100% measured, 90% asked). Most types are below their targets
# (README.md: 90% per type, 80% on grounding).
FLOORS = {
    "title": 0.9,
    "compare": 0.9,
    "ground_button": 0.9,
    "count_buttons": 0.8,
    "count_objects": 0.65,
    "ground_shape": 0.55,
    "color": 0.35,
    "count_kind": 0.25,
    "list_buttons": 0.2,
    "refer_shape": 0.2,
    "refer_button": 0.2,
    "describe": 0.05,
}
# Where the model is not yet right, it must still answer in the truth's form (one box for a
# box; a list of as many known labels or phrases as the truth has): measured on this sample
# (`pytest -s` prints it), list_buttons 76%, describe 96%, the other types 100%.
FORM_FLOORS = {"list_buttons": 0.6, "describe": 0.8}
FORM_FLOOR = 0.9
WORDS = {
    *synth.TITLES,
    *synth.LABELS,
    *synth.COLORS,
    *(f"the {ordinal}" for ordinal in synth.ORDINALS),
    *(
        synth.Shape(kind, color, (0, 0, 1, 1)).phrase
        for kind in synth.KINDS
        for color in synth.COLORS
    ),
    *map(str, range(synth.MAX_OBJECTS + 1)),
}


def answer_items(text: str) -> list[str]:
    """The items of an answer: "a, b and c" -> [a, b, c]."""
    return re.split(r", | and ", text.strip())


def has_the_truths_form(result) -> bool:
    size = read_image_size(result.example.images[0])
    truth = whole_box(result.example.answer, size)
    if truth is not None:
        return whole_box(result.prediction, size) is not None
    items = answer_items(result.prediction)
    return len(items) == len(answer_items(result.example.answer)) and set(items) <= WORDS


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_demo_model_is_package_data_of_a_few_tens_of_mb():
    assert (DEMO_MODEL / "config.json").is_file()
    size = sum(path.stat().st_size for path in DEMO_MODEL.iterdir())
    assert size < 40e6


def test_chat_without_a_model_counts_the_buttons_offline(offline):
    """A count, answered offline and right (README's Quick start)."""
    code, answer, err = run_cli(
        "chat", "--image", str(ROOT / "examples/screen.png"), "How many buttons are there?"
    )
    assert (code, answer.strip()) == (0, "3"), err


def test_chat_without_a_model_reads_the_title_offline(offline):
    code, answer, err = run_cli(
        "chat", "--image", str(ROOT / "examples/screen.png"), "What is the title of this screen?"
    )
    assert (code, answer.strip()) == (0, "Photos"), err


def test_chat_without_a_model_finds_the_send_button_and_draws_it_offline(offline, tmp_path):
    """The README's main command: one box, right (IoU >= 0.5 with the Send button's box, as the
    generator drew examples/screen.png: seed 8), drawn on the image."""
    scene = synth.sample_screen_scene(random.Random(8))
    assert Image.open(ROOT / "examples/screen.png").size == scene.size
    send = next(button for button in scene.buttons if button.label == "Send")
    out = tmp_path / "send.png"
    code, answer, err = run_cli(
        "chat", "--image", str(ROOT / "examples/screen.png"), "--annotate", str(out),
        "Where is the Send button?",
    )  # fmt: skip
    assert code == 0, err
    assert is_correct(answer, format_box(send.box, scene.size), scene.size), answer
    assert "drew 1 box" in err and Image.open(out).size == (160, 320)


@pytest.mark.slow
def test_the_demo_model_keeps_its_accuracy_on_a_fresh_held_out_sample(tmp_path):
    write_eval(tmp_path, n_per_task=25, seed=31337)
    model, processor = load(DEMO_MODEL)
    examples = [e for task in TASKS for e in load_examples(tmp_path / f"{task}.jsonl")]
    report = evaluate(model, processor, examples, max_tokens=32)
    scores = report.scores()
    reached = {task: scores[task].accuracy for task in TASKS}
    formed = {task: [] for task in TASKS}
    for result in report.results:
        formed[result.example.task].append(has_the_truths_form(result))
    formed = {task: sum(found) / len(found) for task, found in formed.items()}
    print(f"accuracy: {reached}\nin the truth's form: {formed}")  # pytest -s shows them
    below = {task: value for task, value in reached.items() if value < FLOORS.get(task, 0.0)}
    assert not below, f"accuracy below its floor: {below}"
    below = {
        task: value for task, value in formed.items() if value < FORM_FLOORS.get(task, FORM_FLOOR)
    }
    assert not below, f"answers not in the truth's form: {below}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mm1-mlx") is None, reason="needs the installed mm1-mlx command")
def test_the_demo_recipe_runs_end_to_end(tmp_path):
    """build.sh from nothing: data, tokenizer, init, dense encoder pre-training, pre-training,
    SFT in two cycles, eval; a few dozen steps."""
    settings = ("train.steps=24", "optimizer.warmup_steps=4", "data.batch_size=2",
                "checkpoint.every=12")  # fmt: skip
    short = [f"--set={setting}" for setting in settings]
    build = ROOT / "train/recipes/demo/build.sh"
    work = tmp_path / "work"
    dense = "--set=train.steps=4 --set=optimizer.warmup_steps=1 --set=dense.batch_size=8"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DENSE_ARGS": dense}
    result = subprocess.run(
        ["bash", str(build), str(work), "40", "1", *short],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "vision" / "model.safetensors").is_file()
    for stage in ("pretrain", "sft", "sft2"):
        losses = [json.loads(line)["loss"] for line in open(work / stage / "metrics.jsonl")]
        assert losses[-1] < losses[0], (stage, losses)
    report = json.loads((work / "eval.json").read_text())
    assert set(report["tasks"]) == set(TASKS)

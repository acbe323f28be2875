"""Resuming `mm1-mlx train`: a stop keeps every finished step's metrics line, damaged files fall
back to an older checkpoint, another optimizer or LoRA setup is refused, and a failed run leaves
no output folder behind."""

import json
import os
import shutil
import signal
from functools import reduce
from pathlib import Path

import pytest
from test_train import losses, prepared_workdir

from mm1_mlx.errors import UserError
from mm1_mlx.train import trainer
from mm1_mlx.train.data import DataLoader
from mm1_mlx.train.optim import ModuleSettings
from mm1_mlx.train.recipe import LoraSettings, load_recipe
from mm1_mlx.train.trainer import train

NEWEST, OLDER = "checkpoints/step-0000006", "checkpoints/step-0000004"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny pre-training run whole (12 steps) and stopped at step 6 (checkpoints at 4 and 6);
    the tiny LoRA SFT run for 2 steps (a checkpoint at each)."""
    workdir = prepared_workdir(tmp_path_factory.mktemp("runs"), tiny_model_dir)
    train(pretrain(workdir, "whole"))

    def stop_at_step_6(step, _):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(pretrain(workdir, "stopped"), reporter=stop_at_step_6)
    train(sft(workdir, "sft"))
    return workdir


def pretrain(workdir: Path, out: str):
    return load_recipe(workdir / "tiny-pretrain.toml", out=workdir / out)


def sft(workdir: Path, out: str):
    overrides = ["train.steps=2", "checkpoint.every=1", "log.eval_every=0"]
    return load_recipe(workdir / "tiny-sft.toml", overrides, out=workdir / out)


def copied(runs: Path, name: str, to: Path) -> Path:
    shutil.copytree(runs / name, to / name)
    return to / name


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- damaged files ------------------------------------------------------------------------------


def cut(*names: str):
    def damage(run: Path) -> None:
        for name in names:
            data = (run / name).read_bytes()
            (run / name).write_bytes(data[: len(data) // 2])

    return damage


def state_json(change):
    def damage(run: Path) -> None:
        path = run / NEWEST / "state.json"
        path.write_text(change(json.loads(path.read_text())))

    return damage


def state_with(**fields):
    return state_json(lambda state: json.dumps({**state, **fields}))


def empty(run: Path) -> None:
    (run / NEWEST / "optimizer.safetensors").write_bytes(b"")


def offset_as_text(state: dict) -> str:
    state["data"]["sources"][0]["offset"] = str(state["data"]["sources"][0]["offset"])
    return json.dumps(state)


def offset_past_the_file(state: dict) -> str:
    state["data"]["sources"][0]["offset"] = 10**9
    return json.dumps(state)


def offset_inside_a_line(state: dict) -> str:
    state["data"]["sources"][0]["offset"] += 3
    return json.dumps(state)


def checkpoints_as_a_file(run: Path) -> None:
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a folder")


def metrics_as_a_folder(run: Path) -> None:
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()


def tear_metrics(run: Path) -> None:
    with (run / "metrics.jsonl").open("a") as file:
        file.write('{"step": 7, "loss": 1.2')  # a kill -9 in the middle of a write


TRAINABLE = "trainable.safetensors"
NOT_STATE = "state.json does not hold step 6 and its data"
DAMAGES = {  # damage -> (what the warning says as the resume falls back to step 4, or what
    #                        the error says; None: it resumes at step 6 without a word)
    "trainable weights cut short": (cut(f"{NEWEST}/{TRAINABLE}"), "unreadable trainable."),
    "optimizer state cut short": (cut(f"{NEWEST}/optimizer.safetensors"), "unreadable optimizer."),
    "optimizer state emptied": (empty, "unreadable optimizer.safetensors"),
    "state.json missing": (lambda run: (run / NEWEST / "state.json").unlink(), "unreadable state."),
    "state.json not JSON": (state_json(lambda state: json.dumps(state)[:40]), "unreadable state."),
    "state.json a list": (state_json(lambda state: "[]"), NOT_STATE),
    "step as text": (state_with(step="6"), NOT_STATE),
    "step of another checkpoint": (state_with(step=4), NOT_STATE),
    "data as a list": (state_with(data=[]), NOT_STATE),
    "setup as text": (state_with(setup="adamw"), NOT_STATE),
    "data position of the wrong kind": (state_json(offset_as_text), "state.json holds a damaged"),
    "data position past the file": (state_json(offset_past_the_file), "state.json holds a damaged"),
    "data position inside a line": (state_json(offset_inside_a_line), "state.json holds a damaged"),
    "torn last metrics line": (tear_metrics, None),
    "checkpoints a file": (checkpoints_as_a_file, "error: not a folder; a run keeps its"),
    "metrics a folder": (metrics_as_a_folder, "error: a folder; a run appends its metrics"),
    "every checkpoint cut short": (cut(f"{NEWEST}/{TRAINABLE}", f"{OLDER}/{TRAINABLE}"),
                                   "error: no readable checkpoint to resume from"),
}  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_from_damaged_files(runs, tmp_path, capsys, damage):
    run = copied(runs, "stopped", tmp_path)
    damaging, expected = DAMAGES[damage]
    damaging(run)
    before = files(run)
    recipe = pretrain(runs, "stopped")
    recipe.out = str(run)
    if expected and expected.startswith("error: "):
        with pytest.raises(UserError, match=expected.removeprefix("error: ")) as error:
            train(recipe, resume=True)
        assert "\n" not in str(error.value) and files(run) == before
        return
    train(recipe, resume=True)
    warnings = capsys.readouterr().err.splitlines()
    if expected:
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(f"warning: {run / NEWEST}: {expected}"), warnings[0]
        assert warnings[0].endswith("; resuming from step-0000004")
    else:
        assert warnings == []
    assert losses(run) == losses(runs / "whole")  # step for step, exactly
    assert [p.name for p in trainer.checkpoint_dirs(run)] == ["step-0000008", "step-0000012"]


# -- another setup ------------------------------------------------------------------------------


def setting(name: str, value):
    def change(recipe) -> None:
        *path, leaf = name.split(".")
        setattr(reduce(getattr, path, recipe), leaf, value)

    return change


def without_setup(run: Path) -> None:
    """As checkpoints without a saved setup are: only their tensors tell."""
    for folder in trainer.checkpoint_dirs(run):
        state = json.loads((folder / "state.json").read_text())
        del state["setup"]
        (folder / "state.json").write_text(json.dumps(state))


VISION_TRAINS = {"vision": ModuleSettings(trainable=True)}
SFT_LORA = "lora (rank=4, scale=10.0, num_layers=None, quantize_bits=None, group_size=64)"
DIFFERENT_SETUPS = [  # (run, what its checkpoints lose, the change, the message; None: resumes)
    ("stopped", None, setting("optimizer.name", "adafactor"),
     "with optimizer 'adamw', the recipe has optimizer 'adafactor';"),
    ("stopped", None, setting("lora", LoraSettings(rank=4)),
     "with no lora, the recipe has lora (rank=4,"),
    ("stopped", None, setting("modules", VISION_TRAINS), "weights do not fit this run (vision."),
    ("sft", None, setting("lora", None), f"with {SFT_LORA}, the recipe has no lora;"),
    ("sft", None, setting("lora.rank", 8), "with lora.rank=4, the recipe has lora.rank=8;"),
    ("sft", None, setting("lora.num_layers", 1),
     "with lora.num_layers=None, the recipe has lora.num_layers=1;"),
    ("sft", None, setting("optimizer.name", "adamw"),
     "with optimizer 'adafactor', the recipe has optimizer 'adamw';"),
    ("sft", without_setup, setting("lora.rank", 8), "trainable weights do not fit this run"),
    ("sft", without_setup, setting("lora", None), "trainable weights do not fit this run"),
    ("sft", without_setup, setting("optimizer.name", "adamw"), "optimizer state do not fit"),
    ("sft", None, setting("lora.dropout", 0.1), None),  # regularisation only: it may change
]  # fmt: skip


@pytest.mark.parametrize("name, strip, change, message", DIFFERENT_SETUPS)
def test_resume_with_another_setup_is_refused(runs, tmp_path, name, strip, change, message):
    run = copied(runs, name, tmp_path)
    if strip:
        strip(run)
    before = files(run)
    recipe = pretrain(runs, name) if name == "stopped" else sft(runs, name)
    recipe.out = str(run)
    change(recipe)
    if message is None:
        assert train(recipe, resume=True).steps == 2
        return
    with pytest.raises(UserError) as error:
        train(recipe, resume=True)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert files(run) == before


# -- stops --------------------------------------------------------------------------------------


def steps_that(monkeypatch, at_call: int, action) -> None:
    """The trainer's step function runs `action()` first on its `at_call`-th call."""
    make = trainer.make_train_step

    def make_acting(*args):
        step, calls = make(*args), []

        def acting(batches, *more):
            calls.append(batches)
            if len(calls) == at_call:
                action()
            return step(batches, *more)

        return acting

    monkeypatch.setattr(trainer, "make_train_step", make_acting)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_inside_a_step_keeps_its_metrics_line(runs, tmp_path, monkeypatch, stop):
    steps_that(monkeypatch, 3, lambda: os.kill(os.getpid(), stop))
    recipe = pretrain(runs, "unused")
    recipe.out = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 3"):
        train(recipe)
    assert list(losses(tmp_path / "run")) == [1, 2, 3]
    assert [p.name for p in trainer.checkpoint_dirs(tmp_path / "run")] == ["step-0000003"]
    monkeypatch.undo()
    train(recipe, resume=True)
    assert losses(tmp_path / "run") == losses(runs / "whole")


def loads_that(monkeypatch, at_call: int, action) -> None:
    """The data loader runs `action()` first on its `at_call`-th batch."""
    next_batch, calls = DataLoader.next_batch, []

    def acting(loader):
        calls.append(loader)
        if len(calls) == at_call:
            action()
        return next_batch(loader)

    monkeypatch.setattr(DataLoader, "next_batch", acting)


MICRO_BATCHES = ["train.steps=4", "train.grad_accumulation=3", "log.eval_every=0"]
STOP_IN_STEP_3 = {  # 3 micro-batches a step: the 8th batch loaded is step 3's second
    "while its micro-batches load": lambda monkeypatch, stop: loads_that(monkeypatch, 8, stop),
    "while it computes them": lambda monkeypatch, stop: steps_that(monkeypatch, 3, stop),
}


@pytest.fixture(scope="module")
def accumulating(runs) -> Path:
    """The tiny pre-training run, 4 steps of 3 micro-batches each, whole."""
    train(load_recipe(runs / "tiny-pretrain.toml", MICRO_BATCHES, out=runs / "accumulating"))
    return runs / "accumulating"


@pytest.mark.parametrize("where", STOP_IN_STEP_3)
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_one_stop_between_micro_batches_saves_the_last_whole_step(
    runs, accumulating, tmp_path, monkeypatch, where, stop
):
    STOP_IN_STEP_3[where](monkeypatch, lambda: os.kill(os.getpid(), stop))
    recipe = load_recipe(runs / "tiny-pretrain.toml", MICRO_BATCHES, out=tmp_path / "run")
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 2"):
        train(recipe)
    assert list(losses(tmp_path / "run")) == [1, 2]
    assert [p.name for p in trainer.checkpoint_dirs(tmp_path / "run")] == ["step-0000002"]
    monkeypatch.undo()
    train(recipe, resume=True)
    assert losses(tmp_path / "run") == losses(accumulating)


# Recipe values whose domain depends on the model (or the run): refused before the first step.
# (case, a change to the tiny pre-training recipe, what the error says)
REFUSED_BEFORE_TRAINING = [
    ("grad accumulation past the cap", setting("train.grad_accumulation", 1_000_000),
     "train.grad_accumulation must be at most 1,024, not 1,000,000"),
    ("LoRA rank past the decoder's width", setting("lora", LoraSettings(rank=10**8)),
     "lora.rank must be at most the decoder's hidden size (64), not 100,000,000"),
    ("box smoothing wider than the grid", setting("train.box_smoothing", 1e300),
     "train.box_smoothing must be 0 (off) or a width in (0, 1000] coordinate units, not 1e+300"),
]  # fmt: skip


@pytest.mark.parametrize(
    "change, message", [case[1:] for case in REFUSED_BEFORE_TRAINING],
    ids=[case[0] for case in REFUSED_BEFORE_TRAINING],
)  # fmt: skip
def test_a_value_out_of_the_models_domain_is_refused_first(runs, tmp_path, change, message):
    recipe = pretrain(runs, "unused")
    recipe.out = str(tmp_path / "run")
    change(recipe)
    with pytest.raises(UserError) as error:
        train(recipe)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "run").exists()


# -- failed runs --------------------------------------------------------------------------------


def fail_in_step_2(recipe, monkeypatch) -> None:
    def fail():
        raise UserError("a global batch has no loss tokens (check the data and masks)")

    steps_that(monkeypatch, 2, fail)


FAILURES = {  # each fails after train() has started, the model loaded or not
    "no such model": lambda recipe, _: setting("model", str(Path(recipe.out) / "none"))(recipe),
    "a recipe value checked once the model is loaded": (
        lambda recipe, _: setting("train.box_smoothing", -1.0)(recipe)
    ),
    "a step failing after the first metrics line": fail_in_step_2,
}


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("made_by", ["the run", "the user"])
def test_a_failed_run_leaves_no_output_folder(runs, tmp_path, monkeypatch, failure, made_by):
    """The folders the run made go again; a folder made by the user stays, as it was."""
    recipe = pretrain(runs, "unused")
    recipe.out = str(tmp_path / "new" / "run")
    if made_by == "the user":
        Path(recipe.out).mkdir(parents=True)
    FAILURES[failure](recipe, monkeypatch)
    with pytest.raises(UserError):
        train(recipe)
    if made_by == "the user":
        assert list(Path(recipe.out).iterdir()) == []
    else:
        assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("out", ["file", "file/run"])
def test_an_output_folder_that_cannot_be_is_refused_first(runs, tmp_path, out):
    (tmp_path / "file").write_text("kept")
    recipe = pretrain(runs, "unused")
    recipe.out = str(tmp_path / out)
    with pytest.raises(UserError, match="cannot be the output folder"):
        train(recipe)
    assert (tmp_path / "file").read_text() == "kept"


def test_resume_with_nothing_to_resume_says_it_starts_fresh(runs, tmp_path, capsys):
    recipe = sft(runs, "sft")
    recipe.out = str(tmp_path / "fresh")
    train(recipe, resume=True)
    notes = capsys.readouterr().err.splitlines()
    assert f"{tmp_path / 'fresh'}: no checkpoint to resume from; starting at step 0" in notes

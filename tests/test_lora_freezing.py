"""LoRA runs of `mm1-mlx train` train the adapters and nothing else unless a [modules.*] table
says `trainable = true`: what is frozen stays bit-identical, the optimizer and the checkpoints
hold only what trains, and such a run resumes step for step."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_optim import flat
from test_train import losses, prepared_workdir, weights

from mm1_mlx.train import trainer
from mm1_mlx.train.recipe import Recipe, load_recipe
from mm1_mlx.train.trainer import train

ADAPTERS_ONLY = "lora-only.toml"  # tiny-sft.toml without `trainable = true` on the connector
TRAINED_IN_FULL = {ADAPTERS_ONLY: (), "tiny-sft.toml": ("connector.",)}  # beside the adapters
SHORT = ["train.steps=4", "checkpoint.every=2", "log.eval_every=0", "optimizer.name='adamw'"]


@pytest.fixture
def workdir(tmp_path, tiny_model_dir) -> Path:
    folder = prepared_workdir(tmp_path, tiny_model_dir)
    sft = (folder / "tiny-sft.toml").read_text()
    (folder / ADAPTERS_ONLY).write_text(sft.replace("trainable = true\n", "", 1))
    return folder


def lora_recipe(workdir: Path, name: str, out: str) -> Recipe:
    return load_recipe(workdir / name, SHORT, out=workdir / out)


@pytest.fixture
def recorded(monkeypatch) -> dict[str, dict[str, np.ndarray]]:
    """The model's parameters as `train` prepared it ("start") and as it ends, before its LoRA
    layers are fused ("end")."""
    seen = {}
    prepare, fuse = trainer.prepare_model, trainer.fuse_lora

    def preparing(recipe: Recipe):
        model, processor = prepare(recipe)
        seen["start"] = flat(model)
        return model, processor

    def fusing(model) -> None:
        seen["end"] = flat(model)
        fuse(model)

    monkeypatch.setattr(trainer, "prepare_model", preparing)
    monkeypatch.setattr(trainer, "fuse_lora", fusing)
    return seen


def what_trains(name: str, parameters: dict[str, np.ndarray]) -> set[str]:
    """LoRA's A and B, and every parameter of the modules the recipe trains in full."""
    return {
        path
        for path in parameters
        if path.endswith((".lora_a", ".lora_b")) or path.startswith(TRAINED_IN_FULL[name])
    }


@pytest.mark.parametrize("name", TRAINED_IN_FULL)
def test_only_the_adapters_and_the_modules_asked_for_train(workdir, recorded, capsys, name):
    result = train(lora_recipe(workdir, name, "run"))
    start, end = recorded["start"], recorded["end"]
    trains = what_trains(name, start)
    assert start.keys() == end.keys()
    assert {path for path in start if not np.array_equal(start[path], end[path])} == trains
    sizes = {
        module: sum(start[path].size for path in trains if path.startswith(f"{module}."))
        for module in ("vision", "connector", "decoder")
    }
    assert sizes["vision"] == 0 and sizes["decoder"] > 0
    counts = ", ".join(f"{module} {size:,}" for module, size in sizes.items())
    trained, total = sum(sizes.values()), sum(value.size for value in start.values())
    summary = f"training {trained:,} of {total:,} parameters ({trained / total:.2%}): {counts}"
    assert summary in capsys.readouterr().out.splitlines()
    # The output folder: LoRA fused, the vision encoder as it was.
    source, out = weights(workdir / "model", "vision."), weights(result.out, "vision.")
    assert source.keys() == out.keys()
    assert all(np.array_equal(source[path], out[path]) for path in source)


@pytest.mark.parametrize("name", TRAINED_IN_FULL)
def test_checkpoints_and_the_optimizer_hold_only_what_trains(workdir, recorded, name):
    result = train(lora_recipe(workdir, name, "run"))
    checkpoint = result.out / "checkpoints/step-0000004"
    trained = mx.load(str(checkpoint / "trainable.safetensors"))
    assert set(trained) == what_trains(name, recorded["start"])
    # AdamW keeps a first and a second moment per trained array, and a step count and learning
    # rate per group (six groups: three modules, with and without weight decay).
    state = mx.load(str(checkpoint / "optimizer.safetensors"))
    groups = {key for key in state if key.endswith((".step", ".learning_rate"))}
    assert len(groups) == 12
    moments = {key.split(".", 2)[2] for key in state.keys() - groups}  # less "states.N."
    assert moments == {f"{path}.{moment}" for path in trained for moment in ("m", "v")}
    moment_bytes = sum(state[key].nbytes for key in state.keys() - groups)
    assert moment_bytes == 2 * sum(value.nbytes for value in trained.values())


def test_a_lora_run_resumes_step_for_step(workdir):
    whole = train(lora_recipe(workdir, ADAPTERS_ONLY, "whole"))

    def stop_at_step_2(step: int, _) -> None:
        if step == 2:
            raise KeyboardInterrupt

    recipe = lora_recipe(workdir, ADAPTERS_ONLY, "resumed")
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 2"):
        train(recipe, reporter=stop_at_step_2)
    resumed = train(recipe, resume=True)
    assert losses(resumed.out) == losses(whole.out)  # step for step, exactly
    expected, got = weights(whole.out, ""), weights(resumed.out, "")
    assert expected.keys() == got.keys()
    assert all(np.array_equal(got[path], value) for path, value in expected.items())

"""`mm1-mlx train` end to end on a tiny model: learning, resuming, ranks, freezing, recipes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from builders import make_dataset
from helpers import init_model_folder, run_cli

import mm1_mlx
from mm1_mlx.errors import UserError
from mm1_mlx.generate import generate
from mm1_mlx.train import trainer
from mm1_mlx.train.data import DataLoader
from mm1_mlx.train.recipe import load_recipe
from mm1_mlx.train.sources import SourceConfig
from mm1_mlx.train.trainer import HeldStops, StepAbandoned, train

RECIPES = Path(__file__).resolve().parents[1] / "train" / "recipes"


def prepared_workdir(folder: Path, model_dir: Path) -> Path:
    """A folder as a user has it: the tiny recipes, a model folder and data beside them."""
    shutil.copytree(model_dir, folder / "model")
    for name in ("tiny-pretrain.toml", "tiny-sft.toml"):
        shutil.copy(RECIPES / name, folder / name)
    make_dataset(folder / "data")
    return folder


@pytest.fixture
def workdir(tmp_path, tiny_model_dir):
    return prepared_workdir(tmp_path, tiny_model_dir)


def losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


def weights(folder: Path, prefix: str) -> dict[str, np.ndarray]:
    loaded = mx.load(str(folder / "model.safetensors"))
    return {k: np.array(v) for k, v in loaded.items() if k.startswith(prefix)}


def test_loss_falls_and_frozen_vision_stays_bit_identical(workdir):
    recipe = load_recipe(workdir / "tiny-pretrain.toml", ["train.steps=30", "log.every=1"])
    result = train(recipe)
    curve = list(losses(result.out).values())
    assert len(curve) == 30
    assert np.mean(curve[-5:]) < 0.7 * np.mean(curve[:3]), curve
    before, after = weights(workdir / "model", "vision."), weights(result.out, "vision.")
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    changed = weights(workdir / "model", "decoder."), weights(result.out, "decoder.")
    assert any(not np.array_equal(changed[0][k], changed[1][k]) for k in changed[0])


def test_a_stop_inside_a_step_is_held_until_the_step_ends():
    finished = []
    before = signal.getsignal(signal.SIGINT)  # pytest's, or one another test left
    with HeldStops() as stops:
        assert not stops.stop_now()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the signal arrives here, and is held
        finished.append(True)
        assert stops.stop_now()
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_stop_inside_a_step_stops_at_once():
    with pytest.raises(StepAbandoned), HeldStops():
        os.kill(os.getpid(), signal.SIGINT)  # held
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        pytest.fail("the second stop did not end the step")


def test_a_run_stuck_in_a_step_stops_on_a_second_signal_and_saves_nothing(workdir, monkeypatch):
    recipe = load_recipe(workdir / "tiny-pretrain.toml", ["train.steps=3", "checkpoint.every=1"])
    next_batch = DataLoader.next_batch
    calls = []

    def stuck_at_the_second(loader):
        calls.append(1)
        if len(calls) == 1:
            return next_batch(loader)
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop: held until the step ends
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)  # ... which it does not: the second one stops it
        time.sleep(5)
        pytest.fail("the second stop did not end the step")

    monkeypatch.setattr(DataLoader, "next_batch", stuck_at_the_second)
    with pytest.raises(KeyboardInterrupt, match="stopped during a step, which is not saved"):
        train(recipe)
    saved = sorted(p.name for p in (Path(recipe.out) / "checkpoints").iterdir())
    assert saved == ["step-0000001"]


def test_a_batch_that_cannot_fit_the_machine_is_refused_before_any_work(workdir):
    huge = ["data.batch_size=100000000000"]  # packing its rows would run until memory ends
    recipe = load_recipe(workdir / "tiny-pretrain.toml", huge, out=workdir / "huge")
    with pytest.raises(UserError, match=r"logits alone take .* GB .* more than this machine's"):
        train(recipe)
    assert not (workdir / "huge").exists()


@pytest.mark.parametrize("out", ["model", "data", "."])
def test_an_output_folder_holding_the_model_or_data_is_refused(workdir, out):
    before = weights(workdir / "model", "")
    recipe = load_recipe(workdir / "tiny-pretrain.toml", out=workdir / out)
    with pytest.raises(UserError, match="holds the input"):
        train(recipe)
    after = weights(workdir / "model", "")
    assert all(np.array_equal(before[name], after[name]) for name in before)


def test_a_loss_that_is_not_finite_stops_the_run(workdir):
    """A model whose decoder's last norm holds NaN (as a diverged checkpoint would)."""
    path = workdir / "model" / "model.safetensors"
    weights = mx.load(str(path))
    weights["decoder.model.norm.weight"] = mx.full(
        weights["decoder.model.norm.weight"].shape, mx.nan
    )
    mx.save_safetensors(str(path), weights)
    recipe = load_recipe(workdir / "tiny-pretrain.toml", out=workdir / "o")
    with pytest.raises(UserError, match=r"step \d+: the loss is nan; the run stops"):
        train(recipe)
    assert not (workdir / "o" / "model.safetensors").exists()


def test_a_sequence_longer_than_the_model_s_context_is_refused(workdir):
    recipe = load_recipe(workdir / "tiny-pretrain.toml", ["data.seq_len=512"], out=workdir / "o")
    with pytest.raises(UserError, match="data.seq_len 512 is over the model's context of 256"):
        train(recipe)


def test_validation_reads_its_data_once_at_most(tiny_model, tmp_path):
    """log.eval_batches past the validation data: it ends with the batch that runs out."""
    model, processor = tiny_model
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(3)))
    validation = DataLoader([SourceConfig(str(path), "text")], processor, seq_len=6, batch_size=1)
    drawn = []
    next_batch = validation.next_batch
    validation.next_batch = lambda: drawn.append(1) or next_batch()
    loss = trainer.evaluate(model, validation, 10**12, mx.distributed.init())
    assert len(drawn) == 3 and np.isfinite(loss)  # a line a batch, then the data runs out


def test_shuffled_image_tokens_change_only_where_the_tokens_sit(tiny_model, tmp_path):
    model, processor = tiny_model
    make_dataset(tmp_path / "data")
    source = SourceConfig(str(tmp_path / "data" / "captions.jsonl"), "caption")
    batch = DataLoader([source], processor, seq_len=64, batch_size=4).next_batch()
    tokens = model.config.num_image_tokens
    orders = trainer.image_token_orders(batch, 1.0, 0, tokens)
    assert orders.shape == (len(batch.pixels), tokens)
    assert all(sorted(order) == list(range(tokens)) for order in orders)
    assert (orders != np.arange(tokens)).any()
    assert np.array_equal(orders, trainer.image_token_orders(batch, 1.0, 0, tokens))  # resumable
    assert not np.array_equal(orders, trainer.image_token_orders(batch, 1.0, 1, tokens))
    assert trainer.image_token_orders(batch, 0.0, 0, tokens) is None
    plain = trainer.loss_sums(model, batch, 0.0)
    as_they_are = np.tile(np.arange(tokens), (len(batch.pixels), 1))
    kept = trainer.loss_sums(model, batch, 0.0, token_orders=as_they_are)
    shuffled = trainer.loss_sums(model, batch, 0.0, token_orders=orders)
    assert [x.item() for x in kept] == [x.item() for x in plain]
    assert shuffled[0].item() != plain[0].item()


def test_packed_examples_are_trained_as_if_each_were_alone(tiny_model, tmp_path):
    model, processor = tiny_model
    make_dataset(tmp_path / "data")
    source = SourceConfig(str(tmp_path / "data" / "captions.jsonl"), "caption")

    def cross_entropy(batch_size: int, **settings) -> float:
        loader = DataLoader([source], processor, seq_len=96, batch_size=batch_size, **settings)
        return trainer.loss_sums(model, loader.next_batch(), 0.0)[1].item()

    packed = DataLoader([source], processor, seq_len=96, batch_size=2).next_batch()
    examples = sum(
        len(set(ids[:n])) for ids, n in zip(packed.example_ids, packed.lengths, strict=True)
    )
    assert examples > 2  # the two rows hold several captions each
    one_each = cross_entropy(examples, max_images_per_sequence=1)
    error = abs(cross_entropy(2) - one_each)
    assert error < 1e-5 * one_each, error
    assert abs(cross_entropy(2, attend_across_examples=True) - one_each) > 100 * error

    class OwnMask:  # a decoder that makes its own attention mask, whatever its cache says
        decoder = model.decoder

        def __call__(self, input_ids, pixels=None, cache=None, image_features=None):
            return model(input_ids, pixels)

    with pytest.raises(UserError, match="attend_across_examples = true"):
        trainer.loss_sums(OwnMask(), packed, 0.0)


def test_a_recipe_that_trains_nothing_is_refused(workdir):
    frozen = [f"modules.{name}.trainable=false" for name in ("vision", "connector", "decoder")]
    recipe = load_recipe(workdir / "tiny-pretrain.toml", frozen, out=workdir / "o")
    with pytest.raises(UserError, match="nothing to train"):
        train(recipe)


def test_resuming_with_fewer_steps_than_the_checkpoint_is_refused(workdir):
    recipe = load_recipe(workdir / "tiny-pretrain.toml", ["train.steps=4"], out=workdir / "o")
    train(recipe)
    fewer = load_recipe(workdir / "tiny-pretrain.toml", ["train.steps=2"], out=workdir / "o")
    with pytest.raises(UserError, match="checkpoint is at step 4, past train.steps 2"):
        train(fewer, resume=True)


@pytest.mark.parametrize("overrides", [[], ["train.image_token_shuffle=0.5"]])
def test_resume_reproduces_the_uninterrupted_run(workdir, overrides):
    whole = train(load_recipe(workdir / "tiny-pretrain.toml", overrides, out=workdir / "whole"))

    def interrupt_at_step_6(step, _):
        if step == 6:
            raise KeyboardInterrupt

    recipe = load_recipe(workdir / "tiny-pretrain.toml", overrides, out=workdir / "resumed")
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 6"):
        train(recipe, reporter=interrupt_at_step_6)
    assert sorted(p.name for p in (workdir / "resumed" / "checkpoints").iterdir()) == [
        "step-0000004",
        "step-0000006",
    ]
    resumed = train(recipe, resume=True)
    assert losses(resumed.out) == losses(whole.out)  # step for step, exactly
    checkpoints = sorted(p.name for p in (resumed.out / "checkpoints").iterdir())
    assert checkpoints == ["step-0000008", "step-0000012"]  # the last `keep` = 2
    assert weights(resumed.out, "").keys() == weights(whole.out, "").keys()
    for name, value in weights(whole.out, "").items():
        assert np.array_equal(weights(resumed.out, "")[name], value), name


def test_output_folder_is_a_model_folder(workdir):
    """The trained weights (the last checkpoint's), the frozen ones as they were, the source's
    config and tokenizer; `mm1-mlx chat` answers from it as the loaded model does."""
    recipe = load_recipe(workdir / "tiny-pretrain.toml", ["train.steps=2", "checkpoint.every=2"])
    result = train(recipe)
    out, source = weights(result.out, ""), weights(workdir / "model", "")
    assert out.keys() == source.keys()
    trained = mx.load(str(result.out / "checkpoints/step-0000002/trainable.safetensors"))
    assert trained and not any(name.startswith("vision.") for name in trained)
    for name, value in out.items():
        expected = np.array(trained[name]) if name in trained else source[name]
        assert np.array_equal(value, expected), name
    assert any(not np.array_equal(np.array(v), source[k]) for k, v in trained.items())
    config = json.loads((result.out / "config.json").read_text())
    assert config == json.loads((workdir / "model/config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (result.out / name).read_bytes() == (workdir / "model" / name).read_bytes()

    image, question = str(workdir / "data/images/0.png"), "What color is the square?"
    code, answer, err = run_cli(
        "chat", "--model", str(result.out), "--image", image, "--max-tokens", "3", question
    )
    assert code == 0, err
    model, processor = mm1_mlx.load(result.out)
    assert answer.rstrip("\n") == generate(model, processor, question, [image], max_tokens=3)


def test_sft_with_lora_and_validation(workdir):
    result = train(load_recipe(workdir / "tiny-sft.toml"))
    entries = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "val_loss" in e] == [3, 6]
    model, _ = mm1_mlx.load(result.out)  # LoRA fused: a plain model folder
    assert "lora" not in json.dumps(list(weights(result.out, "").keys()))
    before, after = weights(workdir / "model", "vision."), weights(result.out, "vision.")
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_box_smoothing_leaves_data_without_boxes_as_it_was(workdir):
    """The tiny data has no boxes: soft targets change nothing (tests/test_coordinates.py
    checks them where there are boxes)."""
    runs = [
        train(
            load_recipe(
                workdir / "tiny-pretrain.toml",
                [f"train.box_smoothing={sigma}"],
                out=workdir / str(sigma),
            )
        )
        for sigma in (0, 8)
    ]
    assert losses(runs[0].out) == losses(runs[1].out)


def test_cli_train_runs_and_refuses_to_overwrite_a_run(workdir):
    recipe = str(workdir / "tiny-pretrain.toml")
    code, out, err = run_cli("train", recipe, "--set", "train.steps=2", "--out", str(workdir / "r"))
    assert code == 0, err
    assert "wrote" in out and "skipped" in out
    code, _, err = run_cli("train", recipe, "--set", "train.steps=2", "--out", str(workdir / "r"))
    assert code == 1 and "--resume" in err and err.count("\n") == 1


def test_cli_ctrl_c_says_where_the_run_was_saved(workdir, monkeypatch):
    def train_until_ctrl_c_at_step_2(recipe, resume, reporter):
        def report(step, values):
            reporter(step, values)
            if step == 2:
                raise KeyboardInterrupt

        return train(recipe, resume=resume, reporter=report)

    monkeypatch.setattr(trainer, "train", train_until_ctrl_c_at_step_2)
    out = workdir / "r"
    code, _, err = run_cli("train", str(workdir / "tiny-pretrain.toml"), "--out", str(out))
    saved = out / "checkpoints" / "step-0000002"
    assert code == 130 and f"interrupted at step 2; saved {saved}" in err, err
    assert saved.is_dir()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown key 'stepz'"),
        ("optimizer.lr='fast'", "optimizer.lr"),
        ("data.sources=[]", "no data sources"),
        ("train.box_smoothing=-1", "train.box_smoothing"),
    ],
)
def test_bad_recipes_are_one_line_errors(workdir, override, message):
    args = ["train", str(workdir / "tiny-pretrain.toml"), "--set", override]
    code, _, err = run_cli(*args)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_missing_recipe(tmp_path):
    code, _, err = run_cli("train", str(tmp_path / "none.toml"))
    assert code == 1 and "no such recipe" in err


MLX_LAUNCH = "from mlx._distributed_utils.launch import main; main()"  # = mlx.launch
LAUNCHERS = {
    "--ranks": ([sys.executable, "-m", "mm1_mlx"], ["--ranks", "2"]),
    "mlx.launch": ([sys.executable, "-c", MLX_LAUNCH, "--backend", "ring", "-n", "2",
                    sys.executable, "-m", "mm1_mlx"], []),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_ranks_equal_one_rank_with_the_same_global_batch(workdir, launcher):
    recipe = workdir / "tiny-pretrain.toml"
    single = train(load_recipe(recipe, ["train.steps=4"], out=workdir / "one"))
    start, two_ranks = LAUNCHERS[launcher]
    command = [*start, "train", str(recipe), "--set", "train.steps=4", *two_ranks]
    command += ["--out", str(workdir / "two")]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    one, two = losses(single.out), losses(workdir / "two")
    assert one.keys() == two.keys()
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])


def test_gradient_checkpointing_gives_the_same_losses(workdir):
    from mlx_lm.models.llama import TransformerBlock

    call = TransformerBlock.__call__
    checkpointed = train(
        load_recipe(
            workdir / "tiny-pretrain.toml",
            ["train.steps=3", "train.gradient_checkpointing=true", "modules.vision.trainable=true"],
            out=workdir / "b",
        )
    )
    assert TransformerBlock.__call__ is call  # the class is restored afterwards
    reference = train(
        load_recipe(
            workdir / "tiny-pretrain.toml",
            ["train.steps=3", "modules.vision.trainable=true"],
            out=workdir / "c",
        )
    )
    for step, loss in losses(reference.out).items():
        assert abs(losses(checkpointed.out)[step] - loss) <= 1e-5 * abs(loss)


def test_an_moe_decoder_trains_with_its_router_losses(workdir):
    from builders import make_tokenizer

    make_tokenizer(workdir / "tokenizer")
    config = json.loads((workdir / "model" / "config.json").read_text())
    config["text_config"] = {
        "model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": 4, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
        "vocab_size": 336,
    }  # fmt: skip
    (workdir / "moe-config.json").write_text(json.dumps(config))
    init_model_folder(workdir / "moe-config.json", workdir / "tokenizer", workdir / "moe")
    recipe = load_recipe(
        workdir / "tiny-pretrain.toml", ["model='moe'", "train.steps=4"], out=workdir / "moe-run"
    )
    result = train(recipe)
    curve = list(losses(result.out).values())
    assert len(curve) == 4 and all(np.isfinite(curve))
    gate = "decoder.model.layers.0.block_sparse_moe.gate.weight"
    assert not np.array_equal(weights(workdir / "moe", gate)[gate], weights(result.out, gate)[gate])

"""Dense pre-training: each image token's target is what the processor's tile shows there."""

import json
import random

import mlx.core as mx
import numpy as np
import pytest
from builders import make_tokenizer
from helpers import init_model_folder, run_cli
from mlx.utils import tree_flatten
from PIL import Image

from mm1_mlx.cells import cell_centres
from mm1_mlx.config import PreprocessConfig
from mm1_mlx.errors import UserError
from mm1_mlx.loading import DEMO_MODEL, load
from mm1_mlx.processor import WHOLE_IMAGE, resize_image
from mm1_mlx.train import synth
from mm1_mlx.train.dense import (
    CLASSES,
    DenseHeads,
    SceneImage,
    TileBatcher,
    cell_targets,
    gaussian_targets,
    read_scenes,
    word_errors,
)
from mm1_mlx.train.recipe import load_recipe
from mm1_mlx.train.tokenizer import number_token_ids
from mm1_mlx.train.trainer import train


def test_cell_centres_of_a_whole_image_and_of_a_split_screen():
    squash = PreprocessConfig(image_size=128, resize_mode="squash")
    whole = cell_centres((128, 128), WHOLE_IMAGE, squash, 8)
    assert whole.shape == (1, 64, 2)
    assert whole[0, 0].tolist() == [8, 8] and whole[0, 1].tolist() == [24, 8]
    assert whole[0, 8].tolist() == [8, 24]
    # A 160x320 screen on a 1-column, 2-row grid: a 128x256 canvas, scale 0.8, no padding.
    split = cell_centres((160, 320), (2, 1), squash, 8)
    assert split.shape == (3, 64, 2)
    assert split[0, 0].tolist() == [10, 10]
    assert split[1, 0].tolist() == [10, 170]  # the second tile starts 128 canvas px lower
    assert split[2, 0].tolist() == [10, 20]  # the overview squashes 160x320 to 128x128
    # Padding ("pad" mode, or a canvas wider than the image) maps outside the image.
    pad = PreprocessConfig(image_size=128, resize_mode="pad")
    assert cell_centres((64, 128), WHOLE_IMAGE, pad, 8)[0, 0, 0] < 0


def test_cell_centres_follow_the_processor_in_every_resize_mode():
    """Each token's cell centre, marked on the picture, lands on its cell of the encoder's input
    as the processor makes it (squash, pad, and CLIP's crop with an odd margin)."""
    size, black = (96, 181), (0.0, 0.0, 0.0)  # padding black too
    for config in (
        PreprocessConfig(image_size=32, resize_mode="squash"),
        PreprocessConfig(image_size=32, resize_mode="pad", mean=black),
        PreprocessConfig(image_size=32, resize_mode="crop", shortest_edge=40),
    ):
        centres = cell_centres(size, WHOLE_IMAGE, config, 4)[0]
        for index in (0, 5, 15):
            x, y = centres[index]
            if not (0 <= x < size[0] and 0 <= y < size[1]):
                continue  # padding
            picture = Image.new("L", size)
            picture.paste(255, (int(x) - 3, int(y) - 3, int(x) + 4, int(y) + 4))
            seen = np.asarray(resize_image(picture.convert("RGB"), config))[..., 0]
            row, column = divmod(index, 4)
            cell = seen[row * 8 : row * 8 + 8, column * 8 : column * 8 + 8]
            assert cell.max() == seen.max() > 0, (config.resize_mode, index)


def test_cell_targets_name_the_thing_and_its_box():
    circle = synth.Shape("circle", "red", (10, 20, 40, 50))
    scene = synth.ShapeScene((circle,))
    classes, boxes = cell_targets(scene, np.array([[[25.0, 35.0], [100.0, 100.0]]]))
    assert [CLASSES[c] for c in classes[0]] == ["red circle", "nothing"]
    assert np.allclose(boxes[0, 0], np.array([10, 20, 40, 50]) / 128)
    assert (boxes[0, 1] == 0).all()
    screen = synth.ScreenScene("Notes", (synth.Button("Send", "blue", (20, 60, 100, 90)),))
    classes, _ = cell_targets(screen, np.array([[5.0, 5.0], [50.0, 70.0], [50.0, 200.0]]))
    assert [CLASSES[c] for c in classes] == ["title Notes", "button Send", "nothing"]


def denormalized(tile: np.ndarray) -> np.ndarray:
    return np.clip(np.round((tile * 0.5 + 0.5) * 255), 0, 255)


@pytest.mark.parametrize("sampler", [synth.sample_shape_scene, synth.sample_screen_scene])
def test_the_targets_match_the_pixels_the_model_sees(tmp_path, sampler):
    """Render scenes, make the demo model's own tiles, and look at each cell's centre pixel: a
    cell labelled with a square (filled to its edges) shows that colour, a title cell the bar's
    grey or its black text, a cell labelled nothing on a screen white. A wrong tile order,
    offset or scale breaks this for many cells."""
    _, processor = load(DEMO_MODEL)
    batcher = TileBatcher(processor, 64)
    rng = random.Random(3)
    checked = agreeing = 0
    for k in range(12):
        scene = sampler(rng)
        path = tmp_path / f"{k}.png"
        synth.render(scene).save(path)
        batch = batcher([SceneImage(path, scene)])
        pixels, classes = np.array(batch.pixels), np.array(batch.classes)
        for tile, tile_classes in zip(pixels, classes, strict=True):
            for cell, class_id in enumerate(tile_classes):
                expected = expected_colours(CLASSES[class_id])
                if expected is None:
                    continue
                row, column = divmod(cell, 8)
                pixel = denormalized(tile[16 * row + 8, 16 * column + 8])
                checked += 1
                agreeing += any(np.abs(pixel - c).max() <= 40 for c in expected)
    assert checked > 40
    assert agreeing / checked > 0.9


def test_text_targets_lie_on_the_glyphs(tmp_path):
    """Every patch given a text target shows its label's text colour within the patch, and
    every button's label has such patches in the tiles of the split screen."""
    _, processor = load(DEMO_MODEL)
    batcher = TileBatcher(processor, 64)
    rng = random.Random(5)
    for k in range(6):
        scene = synth.sample_screen_scene(rng)
        synth.render(scene).save(tmp_path / f"{k}.png")
        batch = batcher([SceneImage(tmp_path / f"{k}.png", scene)])
        pixels, text = np.array(batch.pixels), np.array(batch.text_classes)
        colours = {f"button {b.label}": synth.BUTTON_STYLES[b.style][1] for b in scene.buttons}
        colours[f"title {scene.title}"] = synth.BLACK
        for tile, patch in zip(*np.nonzero(text), strict=True):
            row, column = divmod(patch, 8)
            block = denormalized(
                pixels[tile, 16 * row : 16 * row + 16, 16 * column : 16 * column + 16]
            )
            colour = colours[CLASSES[text[tile, patch]]]
            assert (np.abs(block - colour).max(-1) <= 100).any()  # antialiased, scaled
        read = {CLASSES[c] for c in text[:-1].ravel() if c}  # the tiles, not the overview
        assert read == set(colours)


def expected_colours(name: str) -> list | None:
    """The colours a cell centre can show, or None where text or a shape's edge may lie."""
    if name.endswith("square"):
        return [synth.COLORS[name.split()[0]]]
    if name.startswith("title"):
        return [synth.TITLE_BAR_FILL, synth.BLACK]
    if name == "nothing":
        return [synth.WHITE]
    return None


def write_scenes(folder, count: int) -> None:
    rng = random.Random(0)
    (folder / "images").mkdir(parents=True)
    records = []
    for k in range(count):
        scene = (synth.sample_shape_scene if k % 2 else synth.sample_screen_scene)(rng)
        name = f"images/{k}.png"
        synth.render(scene).save(folder / name)
        records.append(synth.scene_record(name, scene))
    (folder / "scenes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def dense_recipe(folder, model=DEMO_MODEL, out="out", *overrides: str):
    """A dense stage on `folder`/data's scenes: 4 steps of 4 images, validated every 2."""
    text = f"""
model = "{model}"
out = "{out}"
[dense]
scenes = ["data/scenes.jsonl"]
batch_size = 4
held_out = 4
[optimizer]
lr = 1e-3
warmup_steps = 1
[train]
steps = 4
[checkpoint]
every = 2
[log]
every = 1
eval_every = 2
"""
    (folder / "dense.toml").write_text(text)
    return load_recipe(folder / "dense.toml", list(overrides))


def changed_weights(before_folder, after_folder) -> set[str]:
    before, _ = load(before_folder)
    after, _ = load(after_folder)
    old, new = dict(tree_flatten(before.parameters())), dict(tree_flatten(after.parameters()))
    return {name for name in old if not mx.array_equal(old[name], new[name]).item()}


def test_a_dense_stage_trains_the_encoder_and_keeps_the_decoder(tmp_path):
    write_scenes(tmp_path / "data", 12)
    reports = []
    result = train(dense_recipe(tmp_path), reporter=lambda step, values: reports.append(values))
    assert [values["step"] for values in reports] == [1, 2, 3, 4]
    assert {"nothing_accuracy", "shape_accuracy", "box_error"} <= set(reports[1])
    assert "shape_accuracy" not in reports[0] and "shape_accuracy" in reports[3]
    assert result.summary.startswith("held-out cells: nothing_accuracy ")
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    changed = changed_weights(DEMO_MODEL, tmp_path / "out")
    assert any(name.startswith("vision.") for name in changed)
    assert any(name.startswith("connector.") for name in changed)
    assert not any(name.startswith("decoder.") for name in changed)


def test_an_encoder_with_a_conv_embedding_learns_to_read_through_it(tmp_path):
    """The reading head trains the convolutional embedding on the patches over text, and
    validation reports it."""
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    config["vision_config"]["conv_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    init_model_folder(tmp_path / "config.json", DEMO_MODEL, tmp_path / "model")
    write_scenes(tmp_path / "data", 12)
    reports = []
    recipe = dense_recipe(tmp_path, tmp_path / "model", "out", "train.steps=2")
    train(recipe, reporter=lambda step, values: reports.append(values))
    assert {"reading_accuracy", "text_accuracy", "button_accuracy"} <= set(reports[-1])
    assert "coordinate_error" in reports[-1]  # the demo tokenizer has a token per 0..1000
    assert "vision.conv_embed.conv1.weight" in changed_weights(tmp_path / "model", tmp_path / "out")


def test_gaussian_coordinate_targets_peak_at_the_written_number():
    boxes = mx.array([[0.0, 0.2504, 0.5, 1.0]])
    targets = np.array(gaussian_targets(boxes, sigma=10.0))
    assert targets.shape == (1, 4, 1001)
    assert np.allclose(targets.sum(-1), 1.0, atol=1e-5)
    assert targets.argmax(-1).tolist() == [[0, 250, 500, 1000]]
    # Width 10: one sigma away the weight is exp(-1/2) of the peak's.
    assert targets[0, 2, 510] / targets[0, 2, 500] == pytest.approx(np.exp(-0.5), rel=1e-4)


def test_the_coordinate_head_writes_with_the_decoders_number_embeddings():
    """The head's logits are its per-coordinate codes dotted with the decoder's embeddings of
    "0".."1000" (the first coordinate) and " 0".." 1000" (the others), which it does not train."""
    model, processor = load(DEMO_MODEL)
    net = DenseHeads(model, processor.tokenizer)
    assert "_numbers" not in dict(tree_flatten(net.trainable_parameters()))
    pixels = mx.random.normal((1, 128, 128, 3))
    outputs = net(pixels)
    tokens = net.connector(net.vision(pixels))[0, 5]
    codes = net.coordinates(tokens).reshape(4, -1)
    plain, spaced = number_token_ids(processor.tokenizer)
    table = model.token_embedding.weight
    assert mx.allclose(outputs.coordinates[0, 5, 0], table[mx.array(plain)] @ codes[0], atol=1e-4)
    assert mx.allclose(outputs.coordinates[0, 5, 3], table[mx.array(spaced)] @ codes[3], atol=1e-4)


def test_the_word_head_is_the_tokens_dotted_with_the_decoders_word_embeddings():
    """No head between: each group's logits are the token itself dotted with the decoder's
    embeddings of " red", " circle", ... (untrained here); a cell's error is the sum of its
    words' cross-entropies within their groups."""
    model, processor = load(DEMO_MODEL)
    net = DenseHeads(model, processor.tokenizer)
    assert not any("words" in name for name, _ in tree_flatten(net.trainable_parameters()))
    pixels = mx.random.normal((1, 128, 128, 3))
    outputs = net(pixels)
    token = net.connector(net.vision(pixels))[0, 5]
    table = model.token_embedding.weight

    def embedding(word):
        (token_id,) = processor.tokenizer.encode(" " + word, add_special_tokens=False)
        return table[token_id]

    colours, kinds, titles, labels = outputs.words
    assert colours.shape == (1, 64, 6) and labels.shape == (1, 64, 10)
    assert mx.allclose(colours[0, 5, 2], token @ embedding("blue"), atol=1e-4)
    assert mx.allclose(labels[0, 5, 2], token @ embedding("Send"), atol=1e-4)
    classes = mx.array([[CLASSES.index("blue circle"), CLASSES.index("button Send"), 0]])
    words = [logits[:, 5:8] for logits in outputs.words]
    errors = word_errors(words, classes)

    def cross_entropy(logits, target):
        return (mx.logsumexp(logits) - logits[target]).item()

    expected = cross_entropy(colours[0, 5], 2) + cross_entropy(kinds[0, 5], 0)
    assert errors[0, 0].item() == pytest.approx(expected, rel=1e-4)
    assert errors[0, 1].item() == pytest.approx(cross_entropy(labels[0, 6], 2), rel=1e-4)
    assert errors[0, 2].item() == 0


def mean_word_error(model_folder, data_folder) -> float:
    """The word loss per thing cell of a model's tokens over every scene in data_folder."""
    model, processor = load(model_folder)
    net = DenseHeads(model, processor.tokenizer)
    scenes = read_scenes([data_folder / "scenes.jsonl"])
    batch = TileBatcher(processor, model.config.num_image_tokens)(scenes)
    errors = word_errors(net(batch.pixels).words, batch.classes)
    return (errors.sum() / (batch.classes > 0).sum()).item()


def test_the_word_loss_keeps_the_tokens_naming_their_words(tmp_path):
    write_scenes(tmp_path / "data", 12)
    for out, weight in (("plain", 0), ("named", 1)):
        overrides = ("train.steps=8", "optimizer.lr=1e-3", f"dense.word_weight={weight}")
        train(dense_recipe(tmp_path, DEMO_MODEL, out, *overrides))
    plain = mean_word_error(tmp_path / "plain", tmp_path / "data")
    named = mean_word_error(tmp_path / "named", tmp_path / "data")
    # The demo model's tokens already name their words (0.09); 8 steps at 1e-3 without the
    # loss wear that away (2.91), with it much less (1.22).
    assert named < 0.8 * plain


def test_a_batch_larger_than_the_training_scenes_is_refused_before_work(tmp_path):
    write_scenes(tmp_path / "data", 12)  # 10 to train on, 2 held out (a fifth)
    recipe = dense_recipe(tmp_path, DEMO_MODEL, "out", "dense.batch_size=11")
    with pytest.raises(UserError, match="dense.batch_size 11 is more than the 10 training scenes"):
        train(recipe)
    assert not (tmp_path / "out").exists()


def test_the_word_loss_without_one_token_per_word_is_refused_before_work(tmp_path):
    make_tokenizer(tmp_path / "tokenizer")
    init_model_folder(DEMO_MODEL / "config.json", tmp_path / "tokenizer", tmp_path / "model")
    write_scenes(tmp_path / "data", 12)
    recipe = dense_recipe(tmp_path, tmp_path / "model", "out", "dense.word_weight=1")
    with pytest.raises(UserError, match="dense.word_weight needs a tokenizer with one token"):
        train(recipe)
    assert not (tmp_path / "out").exists()


def interrupt_at_step_3(step, values):
    if step == 3:
        raise KeyboardInterrupt


def test_an_interrupted_dense_stage_resumes_exactly(tmp_path):
    write_scenes(tmp_path / "data", 12)
    train(dense_recipe(tmp_path, DEMO_MODEL, "whole"))
    recipe = dense_recipe(tmp_path)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 3"):
        train(recipe, reporter=interrupt_at_step_3)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(UserError, match="--resume continues it"):
        train(recipe)
    train(recipe, resume=True)
    whole, resumed = (mx.load(str(tmp_path / n / "model.safetensors")) for n in ("whole", "out"))
    assert all(mx.array_equal(whole[name], resumed[name]).item() for name in whole)


def test_a_damaged_last_checkpoint_resumes_from_the_one_before(tmp_path, capsys):
    write_scenes(tmp_path / "data", 12)
    train(dense_recipe(tmp_path, DEMO_MODEL, "whole"))
    recipe = dense_recipe(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, reporter=interrupt_at_step_3)
    weights = tmp_path / "out" / "checkpoints" / "step-0000003" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk
    train(recipe, resume=True)
    assert "unreadable trainable.safetensors" in capsys.readouterr().err
    whole, resumed = (mx.load(str(tmp_path / n / "model.safetensors")) for n in ("whole", "out"))
    assert all(mx.array_equal(whole[name], resumed[name]).item() for name in whole)


def test_the_dense_heads_train_at_the_full_rate_with_their_own_decay_groups(tmp_path):
    """Every top-level module of what a stage trains is an optimizer group: the encoder and
    connector take [modules.*]'s multipliers, the heads the full learning rate."""
    write_scenes(tmp_path / "data", 12)
    recipe = dense_recipe(tmp_path, DEMO_MODEL, "out", "modules.vision.lr_multiplier=0")
    train(recipe)
    changed = changed_weights(DEMO_MODEL, tmp_path / "out")
    assert not any(name.startswith("vision.") for name in changed)
    assert any(name.startswith("connector.") for name in changed)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dense.scenes=[]"], "dense.scenes must be a non-empty list"),
        (["dense.scenes=['nope.jsonl']"], "nope.jsonl: no such file"),
        (["dense.batch_size=0"], "dense.batch_size must be"),
        (["dense.coordinate_sigma=0"], "dense.coordinate_sigma must be"),
        (["dense.button_weight=-1"], "dense.button_weight must be"),
        (["dense.coordinate_weight=1e300"], r"weight must be a finite number in \[0, 1000\]"),
        (["dense.box_weight=nan"], "dense.box_weight must be"),
        (["dense.held_out=0"], "dense.held_out must be"),
        (["dense.unknown=1"], "unknown key 'unknown'"),
        (["optimizer.lr='mm1'"], "a dense stage needs a number"),
        (["modules.decoder.trainable=true"], "does not train the decoder"),
        (["lora.rank=4"], "trains the encoder and connector in full"),
        (["data.sources=[{path='data/scenes.jsonl', format='caption'}]"], "no data sources"),
    ],
)
def test_a_bad_dense_recipe_is_one_line_before_work(tmp_path, overrides, message):
    write_scenes(tmp_path / "data", 6)
    with pytest.raises(UserError, match=message) as error:
        dense_recipe(tmp_path, DEMO_MODEL, "out", *overrides)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"image": "a.png", "type": "Cube"}\n', "scenes.jsonl:1: not a scene record"),
        (b'{"image": "\xff"}\n', "scenes.jsonl:1: not a scene record (not UTF-8 text"),
        (b"[" * 100_000 + b"\n", "nested too deeply"),
    ],
)
def test_a_bad_scenes_file_is_one_line_from_the_cli(tmp_path, content, message):
    write_scenes(tmp_path / "data", 6)
    dense_recipe(tmp_path)
    (tmp_path / "data" / "scenes.jsonl").write_bytes(content)
    code, _, err = run_cli("train", str(tmp_path / "dense.toml"))
    assert code == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_dense_stage_writing_over_its_inputs_is_refused(tmp_path):
    write_scenes(tmp_path / "data", 6)
    init_model_folder(DEMO_MODEL / "config.json", DEMO_MODEL, tmp_path / "model")
    dense_recipe(tmp_path, tmp_path / "model", ".")
    code, _, err = run_cli("train", str(tmp_path / "dense.toml"))
    assert code == 1 and "holds the input" in err, err

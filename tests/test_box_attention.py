"""The box-attention loss: which positions and image tokens it supervises, its value against a
plain softmax attention, and that training with it moves the head onto the boxes."""

import dataclasses
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from builders import CHAT_TEMPLATE, retokenized_copy
from PIL import Image, ImageDraw

import mm1_mlx
from mm1_mlx.errors import UserError
from mm1_mlx.train.box_attention import (
    AttentionInputs,
    BoxFinder,
    BoxQueries,
    box_attention_losses,
)
from mm1_mlx.train.data import DataLoader
from mm1_mlx.train.recipe import load_recipe
from mm1_mlx.train.sources import SourceConfig
from mm1_mlx.train.trainer import loss_sums, train

RECIPES = Path(__file__).resolve().parents[1] / "train" / "recipes"
# The tiny model sees a 48-px image as 2 x 2 cells: a square in one quadrant covers one cell.
CORNERS = [(4, 4), (28, 4), (4, 28), (28, 28)]  # a square's top left, one in each quadrant
SIDE = 16


def quadrant_box(corner: tuple[int, int]) -> str:
    x, y = corner
    return "[" + ", ".join(str(round(v * 1000 / 48)) for v in (x, y, x + SIDE, y + SIDE)) + "]"


def write_boxes(folder: Path, n: int) -> Path:
    """Chats asking where the square is, in a random quadrant; the answer is its box."""
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        corner = CORNERS[rng.integers(4)]
        image = Image.new("RGB", (48, 48), "white")
        ImageDraw.Draw(image).rectangle([*corner, corner[0] + SIDE, corner[1] + SIDE], "red")
        image.save(folder / f"images/{i}.png")
        messages = [
            {"role": "user", "content": "<image>\nWhere is the square?"},
            {"role": "assistant", "content": quadrant_box(corner)},
        ]
        lines.append(json.dumps({"images": [f"images/{i}.png"], "messages": messages}))
    path = folder / "boxes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def finder_for(processor, model) -> BoxFinder:
    return BoxFinder.for_tokenizer(processor, model.config.text_config["vocab_size"])


def first_batch(folder: Path, tiny_model, messages: list[dict], seq_len: int, strict=False):
    """The batch of one chat about folder/a.png, with its boxes found."""
    model, processor = tiny_model
    record = {"images": ["a.png"], "messages": messages}
    (folder / "chat.jsonl").write_text(json.dumps(record) + "\n")
    source = SourceConfig(str(folder / "chat.jsonl"), "chat")
    finder = finder_for(processor, model)
    loader = DataLoader([source], processor, seq_len, 1, strict=strict, box_finder=finder)
    return loader.next_batch()


def test_the_finder_marks_who_asks_for_or_about_each_box_and_the_tokens_inside_it(
    tiny_model, tmp_path
):
    model, processor = tiny_model
    Image.new("RGB", (48, 48), "white").save(tmp_path / "a.png")
    messages = [
        {"role": "user", "content": "<image>\nWhere is it?"},
        {"role": "assistant", "content": "[0, 0, 500, 1000]"},
        {"role": "user", "content": "What is at [600, 600, 1000, 1000]?"},
        {"role": "assistant", "content": "a square"},
        # A box past 1000 or an empty one is no box.
        {"role": "user", "content": "And at [5, 5, 1200, 9] or [9, 9, 9, 9]?"},
        {"role": "assistant", "content": "nothing"},
    ]
    batch = first_batch(tmp_path, (model, processor), messages, seq_len=160)
    boxes, ids = batch.boxes, batch.input_ids[0]
    assert not boxes.rows.any()
    image_positions = np.flatnonzero(ids == model.config.image_token_id)
    assert len(image_positions) == 4  # 2 x 2 cells, row-major
    answer = boxes.inside[:, image_positions[0]]  # the answer's box, the left half
    for box, cells in ((answer, [0, 2]), (~answer, [3])):  # the question's: the bottom right
        assert all(np.flatnonzero(inside).tolist() == image_positions[cells].tolist()
                   for inside in boxes.inside[box])  # fmt: skip
        assert np.isclose(boxes.weights[box].sum(), 1)
    asking, answering = boxes.positions[answer], boxes.positions[~answer]
    assert all(np.array_equal(p, np.arange(p[0], p[-1] + 1)) for p in (asking, answering))

    def text(start: int, end: int) -> str:
        return processor.decode(ids[start:end].tolist()).strip()

    # A box answer is asked for from the end of the image to its "[", whose output is x1.
    assert asking[0] == image_positions[-1] + 1 and batch.weights[0, asking[-1]] > 0
    assert text(asking[0], asking[-1]).startswith("Where is it?")
    assert text(asking[-1], asking[-1] + 32).startswith("[0, 0, 500, 1000]")
    # A question's box is asked about from its "]" to the answer's last token.
    assert text(answering[0], answering[0] + 1) == "]"
    assert text(answering[0] + 1, answering[-1] + 1).endswith("a square")
    # ... the last of which predicts the answer's end.
    assert batch.weights[0, answering[-1]] > 0 and batch.weights[0, answering[-1] + 1] == 0


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, None])  # None: "Assistant: " + answer
def test_each_phrase_box_of_an_answer_asks_for_its_thing_while_the_phrase_is_written(
    tiny_model_dir, tmp_path, template
):
    model_dir = retokenized_copy(tiny_model_dir, tmp_path / "model", chat_template=template)
    model, processor = mm1_mlx.load(model_dir)
    Image.new("RGB", (48, 48), "white").save(tmp_path / "a.png")
    answer = "a red square and a blue circle"
    boxes = [  # the left half, then the bottom right quadrant
        {"span": [0, 12], "box": [0, 0, 500, 1000]},
        {"span": [17, 30], "box": [600, 600, 1000, 1000]},
    ]
    messages = [
        {"role": "user", "content": "<image>\nDescribe it."},
        {"role": "assistant", "content": answer, "boxes": boxes},
    ]
    batch = first_batch(tmp_path, (model, processor), messages, seq_len=80)
    found, ids = batch.boxes, batch.input_ids[0]
    image_positions = np.flatnonzero(ids == model.config.image_token_id)
    first = found.inside[:, image_positions[0]]  # the first box holds the top left cell
    for phrase, cells, asking in (("a red square", [0, 2], first), ("a blue circle", [3], ~first)):
        assert all(np.flatnonzero(inside).tolist() == image_positions[cells].tolist()
                   for inside in found.inside[asking])  # fmt: skip
        positions = found.positions[asking]
        assert np.array_equal(positions, np.arange(positions[0], positions[-1] + 1))
        # The positions predict exactly the phrase's tokens: the first is the one before it.
        predicted = processor.decode(batch.targets[0, positions].tolist())
        assert predicted.strip() == phrase and batch.weights[0, positions].all()
        assert np.isclose(found.weights[asking].sum(), 1)


def test_phrase_boxes_on_a_llava_turn_are_the_same_as_on_a_chat_message(tiny_model, tmp_path):
    model, processor = tiny_model
    Image.new("RGB", (48, 48), "white").save(tmp_path / "a.png")
    boxes = [{"span": [0, 12], "box": [0, 0, 500, 1000]}]
    messages = [
        {"role": "user", "content": "<image>\nDescribe it."},
        {"role": "assistant", "content": "a red square", "boxes": boxes},
    ]
    chat = first_batch(tmp_path, tiny_model, messages, seq_len=80).boxes
    turns = [{"from": "human", "value": messages[0]["content"]},
             {"from": "gpt", "value": "a red square", "boxes": boxes, "id": 7}]  # fmt: skip
    record = {"image": "a.png", "conversations": turns}
    (tmp_path / "llava.jsonl").write_text(json.dumps(record) + "\n")
    source = SourceConfig(str(tmp_path / "llava.jsonl"), "chat")
    finder = finder_for(processor, model)
    llava = DataLoader([source], processor, 80, 1, box_finder=finder).next_batch().boxes
    assert len(chat.positions) > 0
    for mine, theirs in zip(dataclasses.astuple(chat), dataclasses.astuple(llava), strict=True):
        assert np.array_equal(mine, theirs)


def test_phrase_boxes_of_an_answer_the_template_rewrites_are_refused(tiny_model_dir, tmp_path):
    template = CHAT_TEMPLATE.replace("m['content']", "m['content'] | upper")
    model_dir = retokenized_copy(tiny_model_dir, tmp_path / "model", chat_template=template)
    tiny_model = mm1_mlx.load(model_dir)
    Image.new("RGB", (48, 48), "white").save(tmp_path / "a.png")
    messages = [
        {"role": "user", "content": "<image>\nDescribe it."},
        {
            "role": "assistant",
            "content": "a square",
            "boxes": [{"span": [2, 8], "box": [0, 0, 9, 9]}],
        },
    ]
    with pytest.raises(UserError, match="chat.jsonl:1: .*rewrites an answer that has phrase boxes"):
        first_batch(tmp_path, tiny_model, messages, seq_len=80, strict=True)


def reference_losses(queries, keys, scale, head, boxes, example_ids):
    """-log(attention inside the box), from the softmax of every score, one query at a time."""
    group = queries.shape[1] // keys.shape[1]
    losses = []
    for row, position, inside in zip(boxes.rows, boxes.positions, boxes.inside, strict=True):
        scores = keys[row, head // group] @ queries[row, head, position] * scale
        seen = np.arange(len(scores)) <= position
        if example_ids is not None:
            seen &= example_ids[row] == example_ids[row, position]
        weights = np.where(seen, np.exp(scores - scores[seen].max()), 0.0)
        weights /= weights.sum()
        losses.append(-np.log(weights[inside].sum()))
    return np.array(losses)


@pytest.mark.parametrize("packed", [False, True])
def test_the_loss_is_minus_the_log_of_the_attention_inside_the_box(packed):
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(2, 4, 12, 8)).astype(np.float32)
    keys = rng.normal(size=(2, 2, 12, 8)).astype(np.float32)  # two query heads per key head
    inside = np.zeros((3, 12), bool)
    inside[0, [1, 2]] = inside[1, [0, 8, 9]] = inside[2, [8, 9]] = True
    boxes = BoxQueries(np.array([0, 1, 1]), np.array([4, 9, 11]), inside, np.ones(3))
    example_ids = np.repeat([[0] * 7 + [1] * 5], 2, axis=0) if packed else None
    for head in range(4):
        seen = (mx.array(queries), mx.array(keys), 0.35)
        actual = np.array(box_attention_losses(seen, head, boxes, example_ids))
        expected = reference_losses(queries, keys, 0.35, head, boxes, example_ids)
        # Packed, the second row's queries see only their own example: token 0 is out of reach.
        assert np.allclose(actual, expected, rtol=1e-5), (head, actual, expected)


def test_the_recorder_keeps_each_layers_queries_and_changes_nothing(tiny_model):
    model, processor = tiny_model
    module_attention = AttentionInputs(model).module.scaled_dot_product_attention
    ids = mx.array([processor.tokenizer.encode("where is the square?")])
    plain = model(ids)
    with AttentionInputs(model) as attention:
        recorded = model(ids)
    assert np.array_equal(np.array(plain), np.array(recorded))
    assert len(attention.seen) == len(model.decoder.layers)
    queries, keys, _ = attention.seen[0]
    assert queries.shape[:3] == (1, 4, ids.shape[1]) and keys.shape[:3] == (1, 2, ids.shape[1])
    assert AttentionInputs(model).module.scaled_dot_product_attention is module_attention


def inside_attention(model, processor, data: Path, head: tuple[int, int]) -> float:
    """The mean attention inside the box at each "[" of a batch of `data`."""
    finder = finder_for(processor, model)
    source = SourceConfig(str(data), "chat")
    loader = DataLoader([source], processor, seq_len=96, batch_size=8, box_finder=finder)
    batch = loader.next_batch()
    with AttentionInputs(model) as attention:
        loss_sums(model, batch, 0.0)
    losses = box_attention_losses(attention.seen[head[0]], head[1], batch.boxes, None)
    return float(mx.exp(-losses).mean())


def box_run_folder(folder: Path, model_dir: Path, n: int) -> list[str]:
    """The tiny model, tiny-sft.toml and `n` box chats in `folder`; the settings that train
    tiny-sft.toml on them."""
    shutil.copytree(model_dir, folder / "model")
    shutil.copy(RECIPES / "tiny-sft.toml", folder / "tiny-sft.toml")
    write_boxes(folder / "data", n)
    return ["data.sources[0].path=data/boxes.jsonl", "data.validation[0].path=data/boxes.jsonl"]


def test_training_with_it_moves_the_head_onto_the_boxes(tmp_path, tiny_model_dir):
    data = [*box_run_folder(tmp_path, tiny_model_dir, 32), "train.steps=25"]
    head = (1, 2)

    def trained(out: str, weight: float) -> float:
        settings = [*data, f"train.box_attention={weight}", "train.box_attention_head=[1, 2]"]
        recipe = load_recipe(tmp_path / "tiny-sft.toml", settings, out=tmp_path / out)
        model, processor = mm1_mlx.load(train(recipe).out)
        return inside_attention(model, processor, tmp_path / "data/boxes.jsonl", head)

    start = inside_attention(*mm1_mlx.load(tmp_path / "model"), tmp_path / "data/boxes.jsonl", head)
    without, with_loss = trained("plain", 0), trained("boxes", 5)
    assert with_loss > 0.5 and with_loss > 2 * max(start, without), (start, without, with_loss)


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        (["train.box_attention_head=[2, 0]"], r"decoder's 2 layers and 4 heads, not \[2, 0\]"),
        (["train.box_attention_head=[0, 4]"], r"decoder's 2 layers and 4 heads, not \[0, 4\]"),
        (["train.gradient_checkpointing=true"], "does not work with train.gradient_checkpointing"),
    ],
)  # fmt: skip
def test_a_head_the_decoder_lacks_is_refused_before_any_work(
    tmp_path, tiny_model_dir, settings, error
):
    data = box_run_folder(tmp_path, tiny_model_dir, 4)
    overrides = [*data, "train.box_attention=1", *settings]
    recipe = load_recipe(tmp_path / "tiny-sft.toml", overrides, out=tmp_path / "out")
    with pytest.raises(UserError, match=error):
        train(recipe)
    assert not (tmp_path / "out").exists()


def test_a_dense_stage_refuses_it():
    overrides = ["train.box_attention=1"]
    with pytest.raises(UserError, match="a dense stage .* has no answers to look from"):
        load_recipe(RECIPES / "demo" / "dense.toml", overrides, out="unused")

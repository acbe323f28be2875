"""The synthetic world: scenes follow the spec, renderings match it, exact answers, the dataset
files the trainer reads, and `mm1-mlx data synth`."""

import itertools
import json
import random
import re

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

from mm1_mlx.boxes import format_box, to_coordinates
from mm1_mlx.errors import UserError
from mm1_mlx.train import synth
from mm1_mlx.train.data import DataLoader, SourceConfig
from mm1_mlx.train.synth import (
    Button,
    ScreenScene,
    Shape,
    ShapeScene,
    compare_question,
    dense_caption,
    render,
    sample_screen_scene,
    sample_shape_scene,
    screen_questions,
    shape_questions,
)

SHAPES_SIZE, SCREEN_SIZE = (128, 128), (160, 320)
WHITE = (255, 255, 255)


def sampled(sampler, count=300, seed=0) -> list:
    rng = random.Random(seed)
    return [sampler(rng) for _ in range(count)]


def inside(box, size) -> bool:
    return 0 <= box[0] < box[2] <= size[0] and 0 <= box[1] < box[3] <= size[1]


def apart(a, b, distance) -> bool:
    """At least `distance` empty pixels between the boxes along x or y."""
    return (
        a[2] + distance <= b[0]
        or b[2] + distance <= a[0]
        or a[3] + distance <= b[1]
        or b[3] + distance <= a[1]
    )


def answers(qas) -> dict[str, str]:
    return {qa.question: qa.answer for qa in qas}


# -- scenes follow the spec -----------------------------------------------------------------


def test_shape_scenes_follow_the_spec():
    scenes = sampled(sample_shape_scene)
    assert {len(scene.shapes) for scene in scenes} == {1, 2, 3, 4}
    for scene in scenes:
        looks = [(shape.kind, shape.color) for shape in scene.shapes]
        assert len(set(looks)) == len(looks)  # no two share colour and kind
        for shape in scene.shapes:
            x1, y1, x2, y2 = shape.box
            assert shape.kind in synth.KINDS and shape.color in synth.COLORS
            assert x2 - x1 == y2 - y1 and 20 <= x2 - x1 <= 40
            assert inside(shape.box, SHAPES_SIZE)
        for a, b in itertools.combinations(scene.shapes, 2):
            assert apart(a.box, b.box, 4)


def test_screens_follow_the_spec():
    scenes = sampled(sample_screen_scene)
    assert {len(scene.buttons) for scene in scenes} == {1, 2, 3, 4}
    for scene in scenes:
        assert scene.title in synth.TITLES
        labels = [button.label for button in scene.buttons]
        assert len(set(labels)) == len(labels) and set(labels) <= set(synth.LABELS)
        for button in scene.buttons:
            x1, y1, x2, y2 = button.box
            assert button.style in ("blue", "gray")
            assert 60 <= x2 - x1 <= 140 and 28 <= y2 - y1 <= 40
            assert y1 >= 40 and inside(button.box, SCREEN_SIZE)  # below the title bar
        for a, b in itertools.combinations(scene.buttons, 2):
            assert apart(a.box, b.box, 6)
    rows = [s for s in scenes if len({b.box[1] for b in s.buttons}) < len(s.buttons)]
    assert len(rows) > 20  # buttons sharing a row occur, so list order ties are trained


def test_sampling_is_deterministic_for_a_seed():
    for sampler in (sample_shape_scene, sample_screen_scene):
        assert sampled(sampler, 20, seed=7) == sampled(sampler, 20, seed=7)
        assert sampled(sampler, 20, seed=7) != sampled(sampler, 20, seed=8)


# -- renderings match the spec --------------------------------------------------------------


def covered(boxes, size, margin) -> np.ndarray:
    """A mask of the boxes grown by `margin` pixels."""
    mask = np.zeros((size[1], size[0]), bool)
    for x1, y1, x2, y2 in boxes:
        mask[max(0, y1 - margin) : y2 + margin, max(0, x1 - margin) : x2 + margin] = True
    return mask


def near(pixel, color, tolerance=2) -> bool:
    return all(abs(int(p) - c) <= tolerance for p, c in zip(pixel, color, strict=True))


# Lanczos rings a few pixels past an edge in the alt rendering.
MARGINS = {"plain": 1, "alt": 3}


def renderings(sampler, style: str, seed: int) -> list:
    """(scene, pixels) of 30 sampled scenes."""
    rng = random.Random(seed)
    return [(scene, np.asarray(render(scene, style, rng))) for scene in sampled(sampler, 30, seed)]


def assert_white_outside(pixels, boxes, style):
    """White but in the boxes, a margin for antialiasing aside."""
    height, width, _ = pixels.shape
    assert (pixels[~covered(boxes, (width, height), MARGINS[style])] == 255).all()


@pytest.mark.parametrize("style", ["plain", "alt"])
def test_shapes_are_drawn_in_their_boxes_in_their_colours(style):
    for scene, pixels in renderings(sample_shape_scene, style, seed=1):
        assert pixels.shape == (128, 128, 3)
        assert_white_outside(pixels, [shape.box for shape in scene.shapes], style)
        for shape in scene.shapes:
            x1, y1, x2, y2 = shape.box
            centre = pixels[(y1 + y2) // 2, (x1 + x2) // 2]  # inside triangles too
            assert near(centre, synth.COLORS[shape.color]), (shape, centre)
            if shape.kind == "triangle":  # apex up: the top corners of its box are empty
                assert near(pixels[y1 + 2, x1 + 2], WHITE, 30)
                assert near(pixels[y1 + 2, x2 - 3], WHITE, 30)
                assert near(pixels[y2 - 2, x1 + 2], synth.COLORS[shape.color], 40)


def ink_centre(pixels, box, fill) -> tuple[float, float]:
    """The centre of the pixels in `box` that are far from its fill colour (the text)."""
    x1, y1, x2, y2 = box
    region = pixels[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].astype(int)
    ys, xs = np.nonzero(np.abs(region - fill).sum(axis=2) > 120)
    assert len(xs) > 20, "no text drawn"
    return x1 + 2 + (xs.min() + xs.max()) / 2, y1 + 2 + (ys.min() + ys.max()) / 2


@pytest.mark.parametrize("style", ["plain", "alt"])
def test_screens_are_drawn_as_specified(style):
    for scene, pixels in renderings(sample_screen_scene, style, seed=2):
        assert pixels.shape == (320, 160, 3)
        boxes = [synth.TITLE_BAR, *(button.box for button in scene.buttons)]
        assert_white_outside(pixels, boxes, style)
        assert near(pixels[2, 2], synth.TITLE_BAR_FILL) and near(pixels[37, 157], (230, 230, 230))
        title_x, title_y = ink_centre(pixels, synth.TITLE_BAR, synth.TITLE_BAR_FILL)
        assert abs(title_x - 80) <= 3 and abs(title_y - 20) <= 3
        for button in scene.buttons:
            fill, text = synth.BUTTON_STYLES[button.style]
            x1, y1, x2, y2 = button.box
            assert near(pixels[y1 + 3, x1 + 3], fill) and near(pixels[y2 - 4, x2 - 4], fill)
            ink_x, ink_y = ink_centre(pixels, button.box, fill)
            assert abs(ink_x - (x1 + x2) / 2) <= 3 and abs(ink_y - (y1 + y2) / 2) <= 3
            inks = pixels[y1:y2, x1:x2].reshape(-1, 3)
            assert any(near(pixel, text, 60) for pixel in inks)  # white or black text


def test_the_alt_renderer_draws_the_same_scene_a_little_differently():
    rng = random.Random(3)
    for scene in [*sampled(sample_shape_scene, 5), *sampled(sample_screen_scene, 5)]:
        plain = np.asarray(render(scene, "plain"), float)
        alt = np.asarray(render(scene, "alt", rng), float)
        assert plain.shape == alt.shape
        assert 0 < np.abs(plain - alt).mean() < 5


def test_an_unknown_style_is_refused():
    with pytest.raises(Exception, match="unknown style"):
        render(sampled(sample_shape_scene, 1)[0], "fancy")


# -- answers --------------------------------------------------------------------------------

RED_CIRCLE = Shape("circle", "red", (10, 50, 30, 70))
GREEN_CIRCLE = Shape("circle", "green", (40, 90, 70, 120))
BLUE_SQUARE = Shape("square", "blue", (60, 10, 90, 40))
ORANGE_TRIANGLE = Shape("triangle", "orange", (100, 60, 124, 84))


def test_shape_answers():
    scene = ShapeScene((BLUE_SQUARE, ORANGE_TRIANGLE, RED_CIRCLE, GREEN_CIRCLE))
    qa = answers(shape_questions(scene))
    expected = "a red circle, a green circle, a blue square and an orange triangle"
    assert qa["Describe the image."] == expected  # left to right by box centre
    assert qa["What color is the square?"] == "blue"
    assert qa["What color is the triangle?"] == "orange"
    assert "What color is the circle?" not in qa  # two circles
    assert qa["How many circles are there?"] == "2"
    assert qa["How many squares are there?"] == qa["How many triangles are there?"] == "1"
    assert qa["How many objects are there?"] == "4"
    box = format_box(BLUE_SQUARE.box, SHAPES_SIZE)
    assert box == "[469, 78, 703, 312]"
    assert qa["Where is the blue square?"] == box
    assert qa["What is at [469, 78, 703, 312]?"] == "a blue square"
    assert qa[f"What is at {format_box(ORANGE_TRIANGLE.box, SHAPES_SIZE)}?"] == "an orange triangle"
    tasks = {item.task for item in shape_questions(scene)}
    assert tasks == set(synth.TASKS) - set(synth.SCREEN_TASKS) - {"compare"}


def test_short_descriptions_and_zero_counts():
    one = answers(shape_questions(ShapeScene((GREEN_CIRCLE,))))
    assert one["Describe the image."] == "a green circle"
    assert one["How many triangles are there?"] == "0"
    assert one["How many objects are there?"] == "1"
    two = answers(shape_questions(ShapeScene((GREEN_CIRCLE, RED_CIRCLE))))
    assert two["Describe the image."] == "a red circle and a green circle"


SEND = Button("Send", "blue", (90, 100, 150, 130))
OK = Button("OK", "gray", (10, 100, 70, 130))  # the same row as Send, left of it
BACK = Button("Back", "gray", (20, 50, 100, 80))


def test_screen_answers():
    scene = ScreenScene("Settings", (SEND, OK, BACK))
    qa = answers(screen_questions(scene))
    assert qa["What is the title of this screen?"] == "Settings"
    assert qa["How many buttons are there?"] == "3"
    assert qa["List the buttons."] == "Back, OK, Send"  # top to bottom, ties left to right
    box = format_box(SEND.box, SCREEN_SIZE)
    assert qa["Where is the Send button?"] == box == "[562, 312, 938, 406]"
    assert qa[f"What does the button at {box} say?"] == "Send"


def test_compare_answers():
    two = ShapeScene((RED_CIRCLE, BLUE_SQUARE))
    one = ShapeScene((GREEN_CIRCLE,))
    assert compare_question(two, one).answer == "the first"
    assert compare_question(one, two).answer == "the second"
    assert compare_question(one, two).question == (
        "Which image has more objects, the first or the second?"
    )


def test_dense_captions():
    shapes = ShapeScene((BLUE_SQUARE, RED_CIRCLE))
    assert dense_caption(shapes) == (
        "a red circle and a blue square. a red circle at [78, 391, 234, 547]. "
        "a blue square at [469, 78, 703, 312]."
    )
    screen = ScreenScene("Music", (SEND, OK))
    assert dense_caption(screen) == (
        "the Music screen with 2 buttons: OK, Send. the OK button at [62, 312, 438, 406]. "
        "the Send button at [562, 312, 938, 406]."
    )


# -- datasets -------------------------------------------------------------------------------

FORMATS = {"captions": "caption", "interleaved": "interleaved", "text": "text", "chat": "chat"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "world"
    synth.write_dataset(out, 12, seed=5, eval_per_task=2)
    return out


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_dataset_layout(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == [
        "captions.jsonl",
        "chat.jsonl",
        "eval",
        "grounding.jsonl",
        "images",
        "interleaved.jsonl",
        "scenes.jsonl",
        "text.jsonl",
    ]
    assert len(list((dataset / "images").iterdir())) == 12
    assert len(lines(dataset / "captions.jsonl")) == len(lines(dataset / "text.jsonl")) == 12
    chats = lines(dataset / "chat.jsonl")
    singles = [chat for chat in chats if len(chat["images"]) == 1]
    assert len(singles) == 12 and min(len(chat["messages"]) for chat in singles) >= 4
    assert len(chats) - len(singles) == 6  # a compare question per shape scene
    scenes = [synth.scene_from_record(record) for record in lines(dataset / "scenes.jsonl")]
    for chat, scene in zip(lines(dataset / "grounding.jsonl"), scenes, strict=True):
        turns = [message["content"].removeprefix("<image>\n") for message in chat["messages"]]
        grounded = {qa.question: qa.answer for qa in synth.questions(scene)
                    if qa.task.startswith("ground_")}  # fmt: skip
        assert dict(zip(turns[::2], turns[1::2], strict=True)) == grounded
    for task in synth.TASKS:
        examples = lines(dataset / "eval" / f"{task}.jsonl")
        assert len(examples) == 2 and all(example["task"] == task for example in examples)
        for example in examples:
            sizes = {Image.open(dataset / "eval" / image).size for image in example["images"]}
            assert sizes <= {SHAPES_SIZE, SCREEN_SIZE}
    for scene in lines(dataset / "scenes.jsonl"):
        size = SHAPES_SIZE if scene["type"] == "ShapeScene" else SCREEN_SIZE
        assert Image.open(dataset / scene["image"]).size == size


def test_list_answers_carry_the_box_of_each_item(dataset):
    scenes = {record["image"]: synth.scene_from_record(record)
              for record in lines(dataset / "scenes.jsonl")}  # fmt: skip
    listed = 0
    for chat in lines(dataset / "chat.jsonl"):
        scene = scenes[chat["images"][0]]
        if isinstance(scene, synth.ShapeScene):
            named = {shape.box: shape.phrase for shape in scene.shapes}
        else:
            named = {button.box: button.label for button in scene.buttons}
        names = {tuple(to_coordinates(box, scene.size)): name for box, name in named.items()}
        messages = chat["messages"]
        for question, answer in zip(messages[::2], messages[1::2], strict=True):
            asks_list = question["content"].endswith(("Describe the image.", "List the buttons."))
            assert asks_list == ("boxes" in answer)
            for item in answer.get("boxes", []):
                start, end = item["span"]
                assert answer["content"][start:end] == names[tuple(item["box"])]
            listed += asks_list
    assert listed >= 3


@pytest.mark.parametrize("name", FORMATS)
def test_the_trainer_reads_every_line(dataset, name, tiny_model):
    path = dataset / f"{name}.jsonl"
    source = SourceConfig(str(path), FORMATS[name])
    loader = DataLoader([source], tiny_model[1], seq_len=100_000, batch_size=1, strict=True)
    for _ in lines(path):
        example = loader.draw_example()
        assert any(example.trained)
        assert loader.example_tiles(example) or name == "text"
    assert not loader.skipped


def test_the_same_seed_writes_the_same_files(dataset, tmp_path):
    again = tmp_path / "again"
    synth.write_dataset(again, 12, seed=5, eval_per_task=2)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (dataset / name).read_bytes() == (again / name).read_bytes(), name


def test_write_eval_matches_the_datasets_eval_folder(dataset, tmp_path):
    synth.write_eval(tmp_path / "fresh", 2, seed=5)
    for task in synth.TASKS:
        expected = (dataset / "eval" / f"{task}.jsonl").read_text()
        assert (tmp_path / "fresh" / f"{task}.jsonl").read_text() == expected


def test_data_synth_cli_writes_once_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "world"
    args = ["data", "synth", "--out", str(out), "--n", "4", "--seed", "1", "--eval-per-task", "1"]
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    assert "wrote" in stdout and (out / "chat.jsonl").is_file()
    assert len(list((out / "eval").glob("*.jsonl"))) == len(synth.TASKS)
    code, _, stderr = run_cli(*args)
    assert code == 1 and "already exists" in stderr and len(stderr.splitlines()) == 1
    assert run_cli(*args, "--force")[0] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_data_synth_cli_refuses_an_unknown_style(tmp_path):
    code, _, stderr = run_cli(
        "data", "synth", "--out", str(tmp_path / "x"), "--n", "1", "--style", "x"
    )
    assert code == 1 and "unknown style" in stderr
    assert not (tmp_path / "x").exists()


def test_no_training_answer_gives_another_away():
    """A later answer copied from an earlier one teaches nothing about the image: one side of
    each rival pair of tasks per conversation, and no box both asked for and given."""
    rng = random.Random(3)
    seen = set()
    for i in range(300):
        scene = synth.sample_shape_scene(rng) if i % 2 else synth.sample_screen_scene(rng)
        qas = synth.conversation_questions(scene, rng)
        tasks = {qa.task for qa in qas}
        seen |= tasks
        for one_side, other_side in synth.RIVAL_TASKS:
            assert not (tasks & one_side and tasks & other_side)
        boxes = [
            re.search(r"\[.*\]", qa.answer + qa.question).group()
            for qa in qas
            if qa.task.startswith(("ground_", "refer_"))
        ]
        assert len(boxes) == len(set(boxes)) == len(scene_objects(scene))
    assert seen == set(synth.TASKS) - {"compare"}


def scene_objects(scene: synth.Scene) -> tuple:
    return scene.shapes if isinstance(scene, synth.ShapeScene) else scene.buttons


def test_scene_records_read_back_as_the_same_scenes():
    for sampler in (sample_shape_scene, sample_screen_scene):
        for scene in sampled(sampler, 20, seed=4):
            record = json.loads(json.dumps(synth.scene_record("images/x.png", scene)))
            assert synth.scene_from_record(record) == scene
    with pytest.raises(UserError, match="not a scene record: type 'Cube'"):
        synth.scene_from_record({"type": "Cube"})

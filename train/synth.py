"""The synthetic world of the demo model: shape scenes and UI screens, their questions and exact
answers, two renderers, and the dataset writers (docs/synthetic-world.md is the specification).

A scene is a spec (what is where, boxes in pixels); `render` draws it. Everything random comes
from one `random.Random` passed in, so a seed gives the same scenes, images and files.
"""

import json
import random
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, ImageDraw, ImageFont

from mm1_mlx.boxes import PixelBox, format_box, to_coordinates
from mm1_mlx.errors import UserError

RGB = tuple[int, int, int]

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
COLORS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
}
KINDS = ("circle", "square", "triangle")
MAX_OBJECTS = 4
SHAPE_SIDE = (20, 40)
SHAPE_GAP = 4
CENTRE_SPREAD = 6  # sampler's choice: box centres this far apart in x, so left-to-right is clear

TITLES = ("Settings", "Messages", "Profile", "Photos", "Music", "Weather", "Notes", "Calendar")
LABELS = ("OK", "Cancel", "Send", "Back", "Next", "Save", "Delete", "Share", "Search", "Login")
TITLE_BAR: PixelBox = (0, 0, 160, 40)
TITLE_BAR_FILL: RGB = (230, 230, 230)
BUTTON_STYLES: dict[str, tuple[RGB, RGB]] = {  # name -> (fill, text)
    "blue": ((40, 80, 220), WHITE),
    "gray": ((200, 200, 200), BLACK),
}
MAX_BUTTONS = 4
BUTTON_WIDTH = (60, 140)
BUTTON_HEIGHT = (28, 40)
BUTTON_GAP = 6
ROW_SPREAD = 8  # sampler's choice: button tops are equal (a row) or this far apart
JOIN_ROW = 0.5  # sampler's choice: how often a button is first tried beside an earlier one
FONT_SIZE = 16

STYLES = ("plain", "alt")
SUPERSAMPLE = 4  # the alt renderer draws this much larger, then downsamples
JITTER = 2  # the alt renderer moves each element up to this many supersampled pixels
ATTEMPTS = 100  # placements tried per box before a scene is drawn again
IMAGE = "<image>"

TASKS = (
    "describe",
    "color",
    "count_kind",
    "count_objects",
    "ground_shape",
    "refer_shape",
    "title",
    "count_buttons",
    "list_buttons",
    "ground_button",
    "refer_button",
    "compare",
)
SCREEN_TASKS = ("title", "count_buttons", "list_buttons", "ground_button", "refer_button")
COMPARE_QUESTION = "Which image has more objects, the first or the second?"
ORDINALS = ("first", "second", "third", "fourth")
WORLD_FACTS = (
    "The colors are red, green, blue, yellow, purple and orange.",
    "The shapes are circles, squares and triangles.",
    "A triangle points up: its apex is at the top and its base is at the bottom.",
    "A box [x1, y1, x2, y2] gives the left, top, right and bottom edges on a grid from 0 to "
    "1000 across the image.",
    "In a box, x grows to the right and y grows downwards; [0, 0, 1000, 1000] is the whole image.",
    "A screen has a title bar at the top and buttons below it.",
    "Buttons are listed from top to bottom, and from left to right in the same row.",
    "Objects are described from left to right.",
)


# -- scenes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: PixelBox

    @property
    def phrase(self) -> str:
        """E.g. "a red circle", "an orange square"."""
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.kind}"


@dataclass(frozen=True)
class ShapeScene:
    shapes: tuple[Shape, ...]
    size: ClassVar[tuple[int, int]] = (128, 128)


@dataclass(frozen=True)
class Button:
    label: str
    style: str  # a key of BUTTON_STYLES
    box: PixelBox


@dataclass(frozen=True)
class ScreenScene:
    title: str
    buttons: tuple[Button, ...]
    size: ClassVar[tuple[int, int]] = (160, 320)


Scene = ShapeScene | ScreenScene


@dataclass(frozen=True)
class QA:
    task: str
    question: str
    answer: str
    # A list answer's items: each one's [start, end) in `answer` and its thing's box (0..1000).
    phrases: tuple[tuple[int, int, tuple[int, ...]], ...] = ()


def gap(a: PixelBox, b: PixelBox) -> int:
    """Empty pixels between two boxes along the axis that separates them most (< 0: overlap)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def centre(box: PixelBox) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def place_boxes(
    count: int,
    propose: Callable[[list[PixelBox]], PixelBox],
    accept: Callable[[PixelBox, list[PixelBox]], bool],
) -> list[PixelBox] | None:
    """`count` boxes by rejection: a proposal is kept if `accept`ed next to the boxes so far;
    None when one finds no place (the caller starts the scene over)."""
    boxes: list[PixelBox] = []
    for _ in range(count):
        for _ in range(ATTEMPTS):
            box = propose(boxes)
            if accept(box, boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def sample_shape_scene(rng: random.Random) -> ShapeScene:
    width, height = ShapeScene.size

    def propose(boxes: list[PixelBox]) -> PixelBox:
        side = rng.randint(*SHAPE_SIDE)
        x, y = rng.randint(0, width - side), rng.randint(0, height - side)
        return x, y, x + side, y + side

    def accept(box: PixelBox, boxes: list[PixelBox]) -> bool:
        return all(
            gap(box, other) >= SHAPE_GAP and abs(centre(box)[0] - centre(other)[0]) >= CENTRE_SPREAD
            for other in boxes
        )

    while True:
        count = rng.randint(1, MAX_OBJECTS)
        looks = rng.sample([(kind, color) for kind in KINDS for color in COLORS], count)
        boxes = place_boxes(count, propose, accept)
        if boxes is not None:
            return ShapeScene(tuple(Shape(k, c, b) for (k, c), b in zip(looks, boxes, strict=True)))


def span_beside(row: PixelBox, width: int, rng: random.Random) -> tuple[int, int] | None:
    """x1, x2 of a button left or right of `row`, BUTTON_GAP away; None without room."""
    free = [(0, row[0] - BUTTON_GAP), (row[2] + BUTTON_GAP, width)]
    free = [(start, end) for start, end in free if end - start >= BUTTON_WIDTH[0]]
    if not free:
        return None
    start, end = rng.choice(free)
    w = rng.randint(BUTTON_WIDTH[0], min(BUTTON_WIDTH[1], end - start))
    x = rng.randint(start, end - w)
    return x, x + w


def sample_screen_scene(rng: random.Random) -> ScreenScene:
    width, height = ScreenScene.size
    top = TITLE_BAR[3]

    def propose(boxes: list[PixelBox]) -> PixelBox:
        h = rng.randint(*BUTTON_HEIGHT)
        # Often beside an earlier button, top edges equal: rows make "ties left to right" occur.
        row = rng.choice(boxes) if boxes and rng.random() < JOIN_ROW else None
        span = span_beside(row, width, rng) if row else None
        if row and span:
            (x1, x2), y = span, row[1]
        else:
            w = rng.randint(*BUTTON_WIDTH)
            x1, y = rng.randint(0, width - w), rng.randint(top, height - h)
            x2 = x1 + w
        return x1, y, x2, y + h

    def accept(box: PixelBox, boxes: list[PixelBox]) -> bool:
        return box[3] <= height and all(
            gap(box, other) >= BUTTON_GAP
            and (box[1] == other[1] or abs(box[1] - other[1]) >= ROW_SPREAD)
            for other in boxes
        )

    while True:
        title = rng.choice(TITLES)
        count = rng.randint(1, MAX_BUTTONS)
        labels = rng.sample(LABELS, count)
        styles = [rng.choice(list(BUTTON_STYLES)) for _ in range(count)]
        boxes = place_boxes(count, propose, accept)
        if boxes is not None:
            buttons = zip(labels, styles, boxes, strict=True)
            return ScreenScene(title, tuple(Button(*button) for button in buttons))


def sample_pair(rng: random.Random) -> tuple[ShapeScene, ShapeScene]:
    """Two shape scenes with different object counts (for the compare question)."""
    first = sample_shape_scene(rng)
    while True:
        second = sample_shape_scene(rng)
        if len(second.shapes) != len(first.shapes):
            return first, second


# -- rendering ------------------------------------------------------------------------------


@cache
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def render(scene: Scene, style: str = "plain", rng: random.Random | None = None) -> Image.Image:
    """The scene as an RGB image. "plain" draws it directly (crisp edges, the 16-px font);
    "alt" is another renderer within the same spec: drawn 4x larger with the font at 64 px,
    each element moved by a sub-pixel jitter from `rng`, then downsampled with Lanczos
    (antialiased edges, differently rasterised text)."""
    if style == "plain":
        return draw_scene(scene, 1, lambda: (0, 0))
    if style == "alt":
        rng = rng or random.Random(0)
        big = draw_scene(scene, SUPERSAMPLE, lambda: random_shift(rng))
        return big.resize(scene.size, Image.Resampling.LANCZOS)
    raise UserError(f"unknown style {style!r} ({', '.join(STYLES)})")


def random_shift(rng: random.Random) -> tuple[int, int]:
    return rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)


def draw_scene(scene: Scene, scale: int, jitter: Callable[[], tuple[int, int]]) -> Image.Image:
    """The scene drawn `scale` times larger; `jitter()` moves each drawn element."""
    width, height = scene.size
    image = Image.new("RGB", (width * scale, height * scale), WHITE)
    draw = ImageDraw.Draw(image)
    if isinstance(scene, ShapeScene):
        for shape in scene.shapes:
            draw_shape(draw, shape, scale, jitter())
    else:
        draw.rectangle(pixel_rect(TITLE_BAR, scale, (0, 0)), fill=TITLE_BAR_FILL)
        draw_label(draw, scene.title, TITLE_BAR, BLACK, scale, jitter())
        for button in scene.buttons:
            fill, text = BUTTON_STYLES[button.style]
            shift = jitter()
            draw.rectangle(pixel_rect(button.box, scale, shift), fill=fill)
            draw_label(draw, button.label, button.box, text, scale, shift)
    return image


def pixel_rect(box: PixelBox, scale: int, shift: tuple[int, int]) -> PixelBox:
    """A box's edges -> Pillow's inclusive pixel rectangle, scaled and shifted."""
    dx, dy = shift
    x1, y1, x2, y2 = (value * scale for value in box)
    return x1 + dx, y1 + dy, x2 - 1 + dx, y2 - 1 + dy


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, scale: int, shift: tuple[int, int]) -> None:
    x1, y1, x2, y2 = pixel_rect(shape.box, scale, shift)
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x1, y1, x2, y2), fill=fill)
    else:  # apex at the top centre, base on the bottom edge
        draw.polygon([((x1 + x2) / 2, y1), (x1, y2), (x2, y2)], fill=fill)


def draw_label(
    draw: ImageDraw.ImageDraw,
    text: str,
    box: PixelBox,
    fill: RGB,
    scale: int,
    shift: tuple[int, int],
) -> None:
    """`text` centred in `box` in Pillow's default font (16 px, times `scale`)."""
    x, y = centre(box)
    position = (x * scale + shift[0], y * scale + shift[1])
    draw.text(position, text, fill=fill, font=font(FONT_SIZE * scale), anchor="mm")


# -- questions and answers ------------------------------------------------------------------


def join_phrases(phrases: list[str]) -> str:
    """E.g. "a", "a and b", "a, b and c"."""
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def left_to_right(scene: ShapeScene) -> list[Shape]:
    return sorted(scene.shapes, key=lambda shape: centre(shape.box))


def reading_order(scene: ScreenScene) -> list[Button]:
    """Top to bottom by top edge, ties left to right."""
    return sorted(scene.buttons, key=lambda button: (button.box[1], button.box[0]))


def kind_count(scene: ShapeScene, kind: str) -> int:
    return sum(shape.kind == kind for shape in scene.shapes)


def lone_shapes(scene: ShapeScene) -> list[Shape]:
    """The shapes whose kind occurs once (the colour question needs one)."""
    return [shape for shape in scene.shapes if kind_count(scene, shape.kind) == 1]


def describe(scene: ShapeScene) -> str:
    return join_phrases([shape.phrase for shape in left_to_right(scene)])


def item_spans(answer: str, items: list[tuple[str, PixelBox]], scene: Scene) -> tuple:
    """QA.phrases of an answer that names `items` (name, box) in order."""
    spans, start = [], 0
    for name, box in items:
        start = answer.index(name, start)
        spans.append((start, start + len(name), tuple(to_coordinates(box, scene.size))))
        start += len(name)
    return tuple(spans)


def where(box: PixelBox, scene: Scene) -> str:
    return format_box(box, scene.size)


def shape_questions(scene: ShapeScene) -> list[QA]:
    """Every question the spec asks of a shape scene, with its exact answer."""
    answer = describe(scene)
    items = [(shape.phrase, shape.box) for shape in left_to_right(scene)]
    qas = [QA("describe", "Describe the image.", answer, item_spans(answer, items, scene))]
    qas += [QA("color", f"What color is the {s.kind}?", s.color) for s in lone_shapes(scene)]
    for kind in KINDS:
        qas.append(QA("count_kind", f"How many {kind}s are there?", str(kind_count(scene, kind))))
    qas.append(QA("count_objects", "How many objects are there?", str(len(scene.shapes))))
    named = [(f"{shape.color} {shape.kind}", shape.box, shape.phrase) for shape in scene.shapes]
    return qas + grounding(scene, named, "shape", "What is at {box}?")


def screen_questions(scene: ScreenScene) -> list[QA]:
    """Every question the spec asks of a screen, with its exact answer."""
    items = [(button.label, button.box) for button in reading_order(scene)]
    answer = ", ".join(label for label, _ in items)
    qas = [
        QA("title", "What is the title of this screen?", scene.title),
        QA("count_buttons", "How many buttons are there?", str(len(scene.buttons))),
        QA("list_buttons", "List the buttons.", answer, item_spans(answer, items, scene)),
    ]
    named = [(f"{button.label} button", button.box, button.label) for button in scene.buttons]
    return qas + grounding(scene, named, "button", "What does the button at {box} say?")


def grounding(
    scene: Scene, named: list[tuple[str, PixelBox, str]], noun: str, refer: str
) -> list[QA]:
    """Per (name, box, answer): "Where is the {name}?" -> its box (task ground_{noun}), and
    `refer` with its box filled in -> the answer (task refer_{noun})."""
    qas = []
    for name, box_px, answer in named:
        box = where(box_px, scene)
        qas.append(QA(f"ground_{noun}", f"Where is the {name}?", box))
        qas.append(QA(f"refer_{noun}", refer.format(box=box), answer))
    return qas


def questions(scene: Scene) -> list[QA]:
    return shape_questions(scene) if isinstance(scene, ShapeScene) else screen_questions(scene)


# Answers that give others away: the description names every colour and count, the button
# list counts the buttons. Asked in one conversation, the later answer would be copied from
# the earlier one instead of read from the image, and held-out questions come first.
RIVAL_TASKS = (
    ({"describe"}, {"color", "count_kind", "count_objects"}),
    ({"list_buttons"}, {"count_buttons"}),
)


def conversation_questions(scene: Scene, rng: random.Random) -> list[QA]:
    """The questions of one training conversation about `scene`, in random order: one side of
    each rival pair of tasks, and per object its box or what is at it (never both)."""
    dropped = {task for pair in RIVAL_TASKS for task in rng.choice(pair)}
    kept, ground = [], None
    for qa in questions(scene):
        if qa.task.startswith("ground_"):
            ground = qa  # grounding() yields each object's ground question, then its refer one
        elif qa.task.startswith("refer_"):
            kept.append(rng.choice([ground, qa]))
        elif qa.task not in dropped:
            kept.append(qa)
    rng.shuffle(kept)
    return kept


def compare_question(first: ShapeScene, second: ShapeScene) -> QA:
    more = "first" if len(first.shapes) > len(second.shapes) else "second"
    return QA("compare", COMPARE_QUESTION, f"the {more}")


# -- text about scenes ----------------------------------------------------------------------


def dense_caption(scene: Scene) -> str:
    """The describe answer (or the screen's title and buttons), then every box."""
    if isinstance(scene, ShapeScene):
        boxes = [f"{shape.phrase} at {where(shape.box, scene)}." for shape in left_to_right(scene)]
        return f"{describe(scene)}. {' '.join(boxes)}"
    buttons = reading_order(scene)
    labels = ", ".join(button.label for button in buttons)
    boxes = [f"the {button.label} button at {where(button.box, scene)}." for button in buttons]
    summary = f"the {scene.title} screen with {counted(len(buttons), 'button')}: {labels}."
    return f"{summary} {' '.join(boxes)}"


def count_phrase(scene: Scene) -> str:
    if isinstance(scene, ShapeScene):
        return counted(len(scene.shapes), "object")
    return counted(len(scene.buttons), "button")


def facts(scene: Scene) -> str:
    """Text-only sentences about a scene: counts, colours and boxes, no image needed."""
    if isinstance(scene, ScreenScene):
        return f"A screen titled {scene.title}: {dense_caption(scene)}"
    kinds = join_phrases([counted(kind_count(scene, kind), kind) for kind in KINDS])
    sentences = [f"A picture of {describe(scene)} has {count_phrase(scene)}: {kinds}."]
    sentences += [f"The {shape.kind} is {shape.color}." for shape in lone_shapes(scene)]
    return " ".join([*sentences, dense_caption(scene)])


def comparison_fact(first: ShapeScene, second: ShapeScene) -> str:
    answer = compare_question(first, second).answer
    return (
        f"If the first image has {count_phrase(first)} and the second "
        f"{count_phrase(second)}, {answer} has more objects."
    )


# -- records --------------------------------------------------------------------------------


def user_turn(question: str, num_images: int = 0) -> dict[str, str]:
    return {"role": "user", "content": f"{IMAGE}\n" * num_images + question}


def conversation(qas: list[QA], num_images: int) -> list[dict[str, str]]:
    """Many turns about the same image(s): the images go with the first question."""
    messages = []
    for k, qa in enumerate(qas):
        messages.append(user_turn(qa.question, num_images if k == 0 else 0))
        messages.append({"role": "assistant", "content": qa.answer})
        if qa.phrases:
            boxes = [{"span": [start, end], "box": list(box)} for start, end, box in qa.phrases]
            messages[-1]["boxes"] = boxes
    return messages


def chat_records(names: list[str], scenes: list[Scene], rng: random.Random) -> list[dict]:
    """Per image one conversation (`conversation_questions`); per shape scene a compare
    question with another shape scene of a different count; all shuffled."""
    records = []
    for name, scene in zip(names, scenes, strict=True):
        qas = conversation_questions(scene, rng)
        records.append({"images": [name], "messages": conversation(qas, 1)})
    shapes = [(n, s) for n, s in zip(names, scenes, strict=True) if isinstance(s, ShapeScene)]
    if len({len(scene.shapes) for _, scene in shapes}) > 1:  # else no pair differs
        for name, scene in shapes:
            pair = [(name, scene), partner(scene, shapes, rng)]
            rng.shuffle(pair)
            qa = compare_question(pair[0][1], pair[1][1])
            records.append({"images": [pair[0][0], pair[1][0]], "messages": conversation([qa], 2)})
    rng.shuffle(records)
    return records


def grounding_records(names: list[str], scenes: list[Scene], rng: random.Random) -> list[dict]:
    """Per image one conversation of nothing but its objects' boxes ("Where is the ...?" for
    each object, in random order): grounding on its own, for a grounding curriculum or a short
    probe of how a model learns it."""
    records = []
    for name, scene in zip(names, scenes, strict=True):
        qas = [qa for qa in questions(scene) if qa.task.startswith("ground_")]
        rng.shuffle(qas)
        records.append({"images": [name], "messages": conversation(qas, 1)})
    return records


def partner(
    scene: ShapeScene, shapes: list[tuple[str, ShapeScene]], rng: random.Random
) -> tuple[str, ShapeScene]:
    """A random (name, scene) of `shapes` with another object count than `scene`."""
    while True:
        name, other = rng.choice(shapes)
        if len(other.shapes) != len(scene.shapes):
            return name, other


def interleaved_records(names: list[str], scenes: list[Scene], rng: random.Random) -> list[dict]:
    """Documents of 2-4 consecutive images, each after "Image k:" and before its caption, then
    a sentence with every image's count."""
    records, start = [], 0
    while start < len(scenes):
        end = min(start + rng.randint(2, len(ORDINALS)), len(scenes))
        content: list[dict[str, str]] = []
        counts = []
        for k in range(start, end):
            content.append({"text": f"Image {k - start + 1}: "})
            content.append({"image": names[k]})
            content.append({"text": f" {dense_caption(scenes[k])}\n"})
            counts.append(f"the {ORDINALS[k - start]} has {count_phrase(scenes[k])}")
        content.append({"text": f"{join_phrases(counts).capitalize()}."})
        records.append({"content": content})
        start = end
    return records


def text_records(scenes: list[Scene], rng: random.Random) -> list[dict]:
    """A line per scene: its facts, a general fact of the world and, for shape scenes, a
    comparison with the previous shape scene."""
    records, previous = [], None
    for scene in scenes:
        sentences = [facts(scene), rng.choice(WORLD_FACTS)]
        if isinstance(scene, ShapeScene):
            if previous and len(previous.shapes) != len(scene.shapes):
                sentences.append(comparison_fact(previous, scene))
            previous = scene
        records.append({"text": " ".join(sentences)})
    return records


def scene_record(name: str, scene: Scene) -> dict[str, Any]:
    return {"image": name, "type": type(scene).__name__, **asdict(scene)}


def scene_from_record(record: dict[str, Any]) -> Scene:
    """The scene a line of scenes.jsonl describes (`scene_record` in reverse)."""
    if record.get("type") == "ShapeScene":
        return ShapeScene(
            tuple(Shape(s["kind"], s["color"], tuple(s["box"])) for s in record["shapes"])
        )
    if record.get("type") == "ScreenScene":
        buttons = (Button(b["label"], b["style"], tuple(b["box"])) for b in record["buttons"])
        return ScreenScene(record["title"], tuple(buttons))
    raise UserError(f"not a scene record: type {record.get('type')!r}")


def inside(x: float, y: float, box: PixelBox) -> bool:
    return box[0] <= x < box[2] and box[1] <= y < box[3]


def label_box(text: str, box: PixelBox) -> tuple[float, float, float, float]:
    """Where the glyphs of `text`, drawn centred in `box` at the spec's font size, lie."""
    x, y = centre(box)
    left, top, right, bottom = font(FONT_SIZE).getbbox(text, anchor="mm")
    return x + left, y + top, x + right, y + bottom


def labels(scene: Scene) -> list[tuple[str, tuple[float, float, float, float]]]:
    """The scene's text as (thing name, the glyphs' box): the title's, then each button's."""
    if isinstance(scene, ShapeScene):
        return []
    return [(f"title {scene.title}", label_box(scene.title, TITLE_BAR))] + [
        (f"button {button.label}", label_box(button.label, button.box)) for button in scene.buttons
    ]


def thing_at(scene: Scene, x: float, y: float) -> tuple[str, PixelBox] | None:
    """What lies at pixel (x, y), as (name, box): "red circle", "title Settings", "button Send";
    None on the background. Used as per-patch labels by dense pre-training (train/dense.py)."""
    if isinstance(scene, ShapeScene):
        things = [(f"{shape.color} {shape.kind}", shape.box) for shape in scene.shapes]
    else:
        things = [(f"title {scene.title}", TITLE_BAR)]
        things += [(f"button {button.label}", button.box) for button in scene.buttons]
    return next(((name, box) for name, box in things if inside(x, y, box)), None)


THING_NAMES = (
    *(f"{color} {kind}" for color in COLORS for kind in KINDS),
    *(f"title {title}" for title in TITLES),
    *(f"button {label}" for label in LABELS),
)


# -- writing --------------------------------------------------------------------------------


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")


def save_image(folder: Path, name: str, scene: Scene, style: str, rng: random.Random) -> str:
    """Render `scene` to folder/name; style "mixed" picks plain or alt per image."""
    if style == "mixed":
        style = rng.choice(STYLES)
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    render(scene, style, rng).save(path)
    return name


def check_style(style: str) -> None:
    if style not in (*STYLES, "mixed"):
        raise UserError(f"unknown style {style!r} (plain, alt or mixed)")


def replacing(out: Path, overwrite: bool) -> AbstractContextManager[Path]:
    """A temporary folder that replaces `out` once written. Imported here: mm1_mlx.loading
    pulls in mlx-lm (seconds), which sampling and rendering scenes do not need."""
    from mm1_mlx.loading import atomic_folder

    return atomic_folder(Path(out), overwrite)


# Every training scene and its records are held until the files that pair and shuffle them
# are written (~6 KB each): the cap keeps that near a gigabyte. Image names have 6 and 5 digits.
MAX_TRAINING_IMAGES = 200_000
MAX_EVAL_PER_TASK = 10_000
# On disk, about: a training image, its lines in five JSONL files; a held-out image, its line.
TRAINING_BYTES = 8_000
EVAL_BYTES = 5_000


def check_counts(n: int, eval_per_task: int, out: Path, overwrite: bool) -> None:
    """Refuse counts outside what write_dataset can hold, an `out` that cannot be written, or
    more than the disk under it has room for, before any scene is drawn."""
    from mm1_mlx.loading import check_writable  # pulls in mlx-lm: see `replacing`

    if not 1 <= n <= MAX_TRAINING_IMAGES:
        raise UserError(
            f"--n must be from 1 to {MAX_TRAINING_IMAGES:,} training images, not {n:,} "
            "(a run holds its scenes in memory: write more with other seeds)"
        )
    if not 0 <= eval_per_task <= MAX_EVAL_PER_TASK:
        raise UserError(
            f"--eval-per-task must be from 0 to {MAX_EVAL_PER_TASK:,}, not {eval_per_task:,}"
        )
    check_writable(Path(out), overwrite)
    needed = n * TRAINING_BYTES + (count_images(n, eval_per_task) - n) * EVAL_BYTES
    existing = next(folder for folder in Path(out).absolute().parents if folder.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise UserError(
            f"{out}: the dataset takes about {needed / 1e6:,.0f} MB, and {existing} has "
            f"{free / 1e6:,.0f} MB free"
        )


@contextmanager
def disk_errors(out: Path) -> Iterator[None]:
    """A write that fails (a full disk, a folder made read-only meanwhile) is one line; the
    temporary folder is gone by then."""
    try:
        yield
    except OSError as error:
        raise UserError(f"{out}: cannot be written ({error.strerror or error})") from None


def count_images(n: int, eval_per_task: int) -> int:
    """Images write_dataset writes (compare examples have two)."""
    return n + eval_per_task * (len(TASKS) + 1)


def write_dataset(
    out: Path,
    n: int,
    seed: int,
    style: str = "mixed",
    eval_per_task: int = 200,
    overwrite: bool = False,
    on_image: Callable[[], None] = lambda: None,
) -> None:
    """`n` training scenes (even: shapes, odd: screens) as pre-training files (captions,
    interleaved, text), SFT chats, grounding-only chats and scenes.jsonl, plus held-out
    eval/<task>.jsonl sets of `eval_per_task` examples. Written to a temporary folder that
    replaces `out` at the end."""
    check_style(style)
    check_counts(n, eval_per_task, out, overwrite)
    rng = random.Random(seed)
    with disk_errors(out), replacing(out, overwrite) as tmp:
        samplers = (sample_shape_scene, sample_screen_scene)
        scenes = [samplers[i % 2](rng) for i in range(n)]
        names = []
        for i, scene in enumerate(scenes):
            names.append(save_image(tmp, f"images/{i:06d}.png", scene, style, rng))
            on_image()
        write_jsonl(tmp / "scenes.jsonl", map(scene_record, names, scenes))
        captions = [
            {"image": name, "text": dense_caption(scene)}
            for name, scene in zip(names, scenes, strict=True)
        ]
        write_jsonl(tmp / "captions.jsonl", captions)
        write_jsonl(tmp / "interleaved.jsonl", interleaved_records(names, scenes, rng))
        write_jsonl(tmp / "text.jsonl", text_records(scenes, rng))
        write_jsonl(tmp / "chat.jsonl", chat_records(names, scenes, rng))
        write_jsonl(tmp / "grounding.jsonl", grounding_records(names, scenes, rng))
        write_eval_files(tmp / "eval", eval_per_task, seed, style, on_image)


def write_eval(
    out: Path,
    n_per_task: int,
    seed: int,
    style: str = "mixed",
    overwrite: bool = False,
    on_image: Callable[[], None] = lambda: None,
) -> None:
    """Fresh held-out sets: out/<task>.jsonl for every task, `n_per_task` examples each, one
    question per example. The same as write_dataset's eval/ folder for the same seed."""
    check_style(style)
    check_counts(1, n_per_task, out, overwrite)
    with disk_errors(out), replacing(out, overwrite) as tmp:
        write_eval_files(tmp, n_per_task, seed, style, on_image)


def eval_example(task: str, rng: random.Random) -> tuple[list[Scene], QA]:
    """Fresh scene(s) and one question of `task` about them."""
    if task == "compare":
        first, second = sample_pair(rng)
        return [first, second], compare_question(first, second)
    sampler = sample_screen_scene if task in SCREEN_TASKS else sample_shape_scene
    while True:  # e.g. "color" needs a kind that occurs once
        scene = sampler(rng)
        candidates = [qa for qa in questions(scene) if qa.task == task]
        if candidates:
            return [scene], rng.choice(candidates)


def write_eval_files(
    folder: Path, n_per_task: int, seed: int, style: str, on_image: Callable[[], None]
) -> None:
    rng = random.Random(f"eval-{seed}")  # a stream apart from the training scenes'
    folder.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        records = []
        for i in range(n_per_task):
            scenes, qa = eval_example(task, rng)
            names = []
            for k, scene in enumerate(scenes):
                names.append(
                    save_image(folder, f"images/{task}/{i:05d}-{k}.png", scene, style, rng)
                )
                on_image()
            messages = [user_turn(qa.question, len(scenes))]
            records.append(
                {"task": task, "images": names, "messages": messages, "answer": qa.answer}
            )
        write_jsonl(folder / f"{task}.jsonl", records)

"""The benchmarks: per task, the parquet columns it reads (the datasets' own names), how a row
becomes examples (id, images, prompt, reference), which metric scores an answer, and how long an
answer may be.

Prompts are lmms-eval's default ones (lmms_eval/tasks/<task>/*.yaml and utils.py), except that
RefCOCO and ScreenSpot ask for boxes in this project's convention (0..1000 integers, MM1.5's)
instead of lmms-eval's 0..1 floats. Images come first, before the text, as lmms-eval's default
(non-interleaved) prompts give them; MMMU's "<image 1>" references stay in its text.
"""

import ast
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mm1_mlx.boxes import Size
from mm1_mlx.errors import UserError
from mm1_mlx.processor import read_image_size
from mm1_mlx.tasks import metrics

Row = dict[str, Any]  # a parquet row: column -> value; an image is a {bytes, path} struct


@dataclass(frozen=True)
class Example:
    id: int | str  # the dataset's question id, as --out and --predictions write it
    images: list[bytes]  # encoded image files (empty where the image columns were not read)
    prompt: str
    reference: Any  # what the task's metric compares an answer with
    origin: str  # "FILE row N", for messages

    @property
    def key(self) -> str:
        """The id as matched against --out and --predictions lines (7 and "7" are one)."""
        return str(self.id)


@dataclass(frozen=True)
class Task:
    name: str
    source: str  # where its parquet files come from
    metric: str  # one line: what the score is
    columns: tuple[str, ...]  # the columns examples are made from, images aside
    image_columns: tuple[str, ...]
    examples: Callable[[Row, int, str], list[Example]]  # (row, row index, origin) -> examples
    score: Callable[[str, Example], float]  # (answer, example) -> 0..1
    max_tokens: int
    # RefCOCO scores boxes in pixels, so its images are read even to score saved predictions.
    scores_need_images: bool = False
    # A list column with one example per item (RefCOCO's referring expressions), else None.
    per_item: str | None = None


SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
BOX_FORMAT = (
    "Bounding box coordinates are specified in the format [x1, y1, x2, y2] (top-left x, "
    "top-left y, bottom-right x, bottom-right y). All values are integers from 0 to 1000 "
    "across the image's width and height."
)


# -- reading a row's cells ------------------------------------------------------------------


def text(row: Row, column: str, origin: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise UserError(f"{origin}: {column} is {type(value).__name__}, not text")
    return value


def texts(row: Row, column: str, origin: str) -> list[str]:
    """A non-empty list of strings; VQAv2's {answer, answer_confidence, answer_id} items give
    their answer."""
    items = row.get(column)
    if isinstance(items, list):
        items = [item.get("answer") if isinstance(item, dict) else item for item in items]
    if not items or not all(isinstance(item, str) for item in items):
        raise UserError(
            f"{origin}: {column} is not a list of strings (a test split, without answers?)"
        )
    return items


def question_id(row: Row, column: str, origin: str) -> int | str:
    value = row.get(column)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{origin}: {column} is {value!r}, not a question id")
    return value


def numbers(row: Row, column: str, origin: str, count: int) -> list[float]:
    values = row.get(column)
    valid = isinstance(values, list) and len(values) == count
    if not valid or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise UserError(f"{origin}: {column} is {values!r}, not {count} finite numbers")
    return [float(v) for v in values]


def images(row: Row, columns: tuple[str, ...], origin: str) -> list[bytes]:
    """The encoded files of the image cells that are there and not empty."""
    found = []
    for column in columns:
        cell = row.get(column)
        if cell is None:
            continue
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not isinstance(data, bytes) or not data:
            raise UserError(f"{origin}: {column} holds no image bytes (only a path?)")
        found.append(data)
    return found


def image_size(image: bytes, origin: str) -> Size:
    try:
        return read_image_size(image)
    except UserError as error:
        raise UserError(f"{origin}: {error}") from None


def with_short_answer(question: str) -> str:
    return f"{question}\n{SHORT_ANSWER}"


def options_text(options: list[str]) -> str:
    return "\n".join(
        f"{letter}. {option}"
        for letter, option in zip(metrics.letters(len(options)), options, strict=True)
    )


# -- short answers: VQAv2, TextVQA, DocVQA --------------------------------------------------


def short_answer_task(
    id_column: str, capitalize: bool = False
) -> Callable[[Row, int, str], list[Example]]:
    """A question about one image, answered in a word or phrase, against a list of answers.
    TextVQA capitalises the question (Python's capitalize(), which lower-cases the rest)."""

    def read(row: Row, index: int, origin: str) -> list[Example]:
        question = text(row, "question", origin)
        prompt = with_short_answer(question.capitalize() if capitalize else question)
        answers = texts(row, "answers", origin)
        found = images(row, ("image",), origin)
        return [Example(question_id(row, id_column, origin), found, prompt, answers, origin)]

    return read


def vqav2_score(answer: str, example: Example) -> float:
    return metrics.vqa_accuracy(answer, example.reference, metrics.vqa_normalize)


def textvqa_score(answer: str, example: Example) -> float:
    return metrics.vqa_accuracy(answer, example.reference, metrics.evalai_normalize)


def docvqa_score(answer: str, example: Example) -> float:
    return metrics.anls(answer, example.reference)


# -- MMMU ----------------------------------------------------------------------------------

MMMU_IMAGES = tuple(f"image_{n}" for n in range(1, 8))
IMAGE_REFERENCE = re.compile(r"<image (\d+)>")


@dataclass(frozen=True)
class MMMUReference:
    multiple_choice: bool
    options: list[str]
    answers: list[str]  # a letter for multiple choice; an open question may list several


def literal_list(value: str, origin: str, column: str) -> list[str] | None:
    """A Python list written as text (MMMU's options, some open answers), as strings; None
    when the text is no Python literal."""
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(parsed, list) and all(isinstance(item, (str, int, float)) for item in parsed):
        return [str(item) for item in parsed]
    raise UserError(f"{origin}: {column} is not a list of strings")


def mmmu_examples(row: Row, index: int, origin: str) -> list[Example]:
    question, answer = text(row, "question", origin), text(row, "answer", origin)
    options = literal_list(text(row, "options", origin), origin, "options")
    multiple_choice = text(row, "question_type", origin) == "multiple-choice"
    if options is None or (multiple_choice and not options):
        raise UserError(f"{origin}: options is not a list of the choices")
    if multiple_choice:
        prompt = f"{question}\n{options_text(options)}\n\n{LETTER_ANSWER}"
    else:
        prompt = f"{question}\n\n{SHORT_ANSWER}"
    # The images the text refers to, in order of their number, as lmms-eval's doc_to_visual.
    shown = sorted({f"image_{n}" for n in IMAGE_REFERENCE.findall(prompt)})
    unknown = [column for column in shown if column not in MMMU_IMAGES]
    if unknown:
        raise UserError(f"{origin}: the question refers to {unknown[0]}, which MMMU has not")
    empty = [column for column in shown if column in row and row[column] is None]
    if empty:
        raise UserError(f"{origin}: the question shows <image {empty[0][6:]}>; {empty[0]} is empty")
    answers = literal_list(answer, origin, "answer") if answer.startswith("[") else None
    reference = MMMUReference(multiple_choice, options, answers or [answer])
    found = images(row, tuple(shown), origin)
    return [Example(question_id(row, "id", origin), found, prompt, reference, origin)]


def mmmu_score(answer: str, example: Example) -> float:
    reference: MMMUReference = example.reference
    if reference.multiple_choice:
        chosen = metrics.mmmu_choice(answer, reference.options, seed=example.key)
        return float(chosen in reference.answers)
    return float(metrics.mmmu_open_correct(answer, reference.answers))


# -- ScienceQA-IMG -------------------------------------------------------------------------


def scienceqa_examples(row: Row, index: int, origin: str) -> list[Example]:
    """The dataset has no question id: an example's id is its row's index over the files, in
    the order given (0-based, as lmms-eval's doc_id)."""
    question, hint = text(row, "question", origin), row.get("hint")
    choices, answer = texts(row, "choices", origin), row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise UserError(f"{origin}: answer is {answer!r}, not the index of one of the choices")
    context = f"Context: {hint}\n" if hint else ""
    prompt = f"{context}{question}\n{options_text(choices)}\n{LETTER_ANSWER}"
    letter = metrics.letters(len(choices))[answer]
    return [Example(index, images(row, ("image",), origin), prompt, letter, origin)]


def scienceqa_score(answer: str, example: Example) -> float:
    return float(metrics.scienceqa_correct(answer, example.reference))


# -- RefCOCO and ScreenSpot ----------------------------------------------------------------


def refcoco_examples(row: Row, index: int, origin: str) -> list[Example]:
    """One example per referring expression (lmms-eval's refcoco_bbox_rec explodes `answer`),
    with id "<question_id>#<n>"; the reference is the true box in pixels (COCO's
    [x, y, width, height] made corners) and the image size."""
    qid = question_id(row, "question_id", origin)
    expressions = texts(row, "answer", origin)
    truth = metrics.xywh_box(numbers(row, "bbox", origin, 4))
    found = images(row, ("image",), origin)
    if not found:
        raise UserError(f"{origin}: image is empty; RefCOCO's boxes are in its pixels")
    reference = (truth, image_size(found[0], origin))
    return [
        Example(f"{qid}#{n}", found, refcoco_prompt(expression), reference, origin)
        for n, expression in enumerate(expressions)
    ]


def refcoco_prompt(expression: str) -> str:
    return (
        f"{BOX_FORMAT} Please provide the bounding box coordinate of the region this sentence "
        f"describes: {expression}"
    )


def refcoco_score(answer: str, example: Example) -> float:
    truth, size = example.reference
    return float(metrics.box_hit(answer, truth, size))


def screenspot_examples(row: Row, index: int, origin: str) -> list[Example]:
    """rootsautomation/ScreenSpot gives `bbox` as [x1, y1, x2, y2] in fractions (0..1) of the
    image's width and height: its card says SeeClick's pixel [x, y, w, h] became corners, and
    lmms-eval's screenspot/utils_rec.py compares it unscaled with 0..1 answers. A box outside
    0..1 means a file in another convention, refused rather than misread. No question id: an
    example's id is its row's index over the files (0-based)."""
    box = numbers(row, "bbox", origin, 4)
    if not all(-0.001 <= value <= 1.001 for value in box):
        raise UserError(f"{origin}: bbox {box} is not in fractions 0..1 of the image")
    prompt = (
        f"{BOX_FORMAT} Please provide the bounding box coordinates of the region that "
        f"corresponds to the command: {text(row, 'instruction', origin)}"
    )
    return [Example(index, images(row, ("image",), origin), prompt, box, origin)]


def screenspot_score(answer: str, example: Example) -> float:
    return float(metrics.point_in_box(answer, example.reference))


# -- the table ------------------------------------------------------------------------------

TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task(
            "vqav2",
            "lmms-lab/VQAv2, validation split (data/validation-*.parquet)",
            "VQA accuracy (EvalAI normalisation, min(1, matches/3) over 10 leave-one-out sets)",
            ("question_id", "question", "answers"),
            ("image",),
            short_answer_task("question_id"),
            vqav2_score,
            max_tokens=16,
        ),
        Task(
            "textvqa",
            "lmms-lab/textvqa, validation split (data/validation-*.parquet)",
            "VQA accuracy with EvalAI's full answer processor",
            ("question_id", "question", "answers"),
            ("image",),
            short_answer_task("question_id", capitalize=True),
            textvqa_score,
            max_tokens=16,  # lmms-eval sets none; the prompt asks for a word or phrase
        ),
        Task(
            "docvqa",
            "lmms-lab/DocVQA, config DocVQA, validation split (DocVQA/validation-*.parquet)",
            "ANLS, threshold 0.5",
            ("questionId", "question", "answers"),
            ("image",),
            short_answer_task("questionId"),
            docvqa_score,
            max_tokens=32,
        ),
        Task(
            "mmmu",
            "lmms-lab/MMMU, validation split (data/validation-*.parquet)",
            "accuracy: MMMU's multiple-choice and open-answer parsing",
            ("id", "question", "options", "answer", "question_type"),
            MMMU_IMAGES,
            mmmu_examples,
            mmmu_score,
            max_tokens=128,
        ),
        Task(
            "scienceqa_img",
            "lmms-lab/ScienceQA, config ScienceQA-IMG, test split (ScienceQA-IMG/test-*.parquet)",
            "accuracy: the option letter, or an answer starting 'X.'",
            ("question", "choices", "answer", "hint"),
            ("image",),
            scienceqa_examples,
            scienceqa_score,
            max_tokens=16,
        ),
        Task(
            "refcoco",
            "lmms-lab/RefCOCO, split val, test, testA or testB (data/val-*.parquet, ...)",
            "accuracy: the answer's first box has IoU >= 0.5 with the true box",
            ("question_id", "answer", "bbox"),
            ("image",),
            refcoco_examples,
            refcoco_score,
            max_tokens=32,  # a box is about 20 tokens
            scores_need_images=True,
            per_item="answer",
        ),
        Task(
            "screenspot",
            "rootsautomation/ScreenSpot, test split (data/test-*.parquet)",
            "accuracy: the answer's box centre (or point) lies in the true box",
            ("instruction", "bbox"),
            ("image",),
            screenspot_examples,
            screenspot_score,
            max_tokens=32,
        ),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    return TASKS[name]

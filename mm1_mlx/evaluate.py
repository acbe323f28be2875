"""Per-task accuracy of a model on held-out questions (docs/synthetic-world.md, "Evaluation").

An example is a JSONL line `{"task", "images", "messages", "answer"}`, image paths relative to
the file. The model answers greedily through the chat template. An answer is correct when it
equals the truth after trimming and lower-casing; when the truth is a box, when it is one box
(nothing else) whose IoU with the truth is at least 0.5.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm1_mlx.boxes import COORDINATE_MAX, ParsedBox, Size, parse_boxes
from mm1_mlx.errors import UserError
from mm1_mlx.generate import check_context, generate, model_context
from mm1_mlx.jsonl import BadLine, parse_object
from mm1_mlx.model import MM1Model
from mm1_mlx.processor import Processor, read_image_size

IOU_THRESHOLD = 0.5
ROLES = ("system", "user", "assistant")


@dataclass
class EvalExample:
    task: str
    images: list[Path]
    messages: list[dict[str, Any]]  # ends with the user's question
    answer: str
    origin: str  # "file:line"
    image_sizes: list[Size] = field(default_factory=list)  # (width, height), from the headers


@dataclass
class Result:
    example: EvalExample
    prediction: str
    correct: bool


@dataclass
class TaskScore:
    n: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "correct": self.correct, "accuracy": self.accuracy}


@dataclass
class EvalReport:
    results: list[Result] = field(default_factory=list)

    def scores(self) -> dict[str, TaskScore]:
        """Per task, in the order tasks first occur."""
        scores: dict[str, TaskScore] = {}
        for result in self.results:
            score = scores.setdefault(result.example.task, TaskScore())
            score.n += 1
            score.correct += result.correct
        return scores

    def overall(self) -> TaskScore:
        return TaskScore(len(self.results), sum(result.correct for result in self.results))

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(task, n, correct, accuracy) as text, each task then "all"."""
        scores = [*self.scores().items(), ("all", self.overall())]
        return [(name, str(s.n), str(s.correct), f"{s.accuracy:.1%}") for name, s in scores]

    def to_json(self) -> dict[str, Any]:
        return {
            "tasks": {task: score.to_json() for task, score in self.scores().items()},
            "all": self.overall().to_json(),
            "examples": [
                {
                    "task": result.example.task,
                    "origin": result.example.origin,
                    "question": result.example.messages[-1]["content"],
                    "answer": result.example.answer,
                    "prediction": result.prediction,
                    "correct": result.correct,
                }
                for result in self.results
            ],
        }


# -- scoring --------------------------------------------------------------------------------


def whole_box(text: str, image_size: Size) -> ParsedBox | None:
    """The box `text` is, once trimmed; None when it is anything else."""
    text = text.strip()
    boxes = parse_boxes(text, image_size)
    return boxes[0] if len(boxes) == 1 and boxes[0].span == (0, len(text)) else None


def iou(a: ParsedBox, b: ParsedBox) -> float:
    width = min(a.x2, b.x2) - max(a.x1, b.x1)
    height = min(a.y2, b.y2) - max(a.y1, b.y1)
    overlap = max(0.0, width) * max(0.0, height)
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - overlap
    return overlap / union if union > 0 else 0.0


def is_correct(prediction: str, answer: str, image_size: Size) -> bool:
    truth = whole_box(answer, image_size)
    if truth is None:
        return prediction.strip().lower() == answer.strip().lower()
    predicted = whole_box(prediction, image_size)
    return predicted is not None and iou(predicted, truth) >= IOU_THRESHOLD


# -- reading --------------------------------------------------------------------------------


def load_examples(path: Path, limit: int | None = None) -> list[EvalExample]:
    """The examples of a JSONL file (the first `limit`); a bad line is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such eval file")
    examples = []
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            if limit is not None and len(examples) >= limit:
                break
            if line.strip():
                examples.append(parse_example(line, path.parent, f"{path}:{number}"))
    if not examples:
        raise UserError(f"{path}: no examples")
    return examples


def parse_example(line: bytes | str, folder: Path, origin: str) -> EvalExample:
    try:
        record = parse_object(line)
    except BadLine as error:
        raise UserError(f"{origin}: {error}") from None
    task, answer = record.get("task"), record.get("answer")
    images, messages = record.get("images", []), record.get("messages")
    if not isinstance(task, str) or not task or not isinstance(answer, str):
        raise UserError(f"{origin}: needs a non-empty string 'task' and a string 'answer'")
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise UserError(f"{origin}: 'images' is a list of file names")
    if not valid_messages(messages):
        raise UserError(
            f"{origin}: 'messages' is a list of {{role, content}} turns ending with the user's"
        )
    paths = [folder / image for image in images]
    sizes = []
    for image in paths:  # its header: a file that is no image fails before the model loads
        try:
            sizes.append(read_image_size(image))
        except UserError as error:
            raise UserError(f"{origin}: {error}") from None
    return EvalExample(task, paths, messages, answer, origin, sizes)


def valid_messages(messages: Any) -> bool:
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in messages
        )
        and messages[-1]["role"] == "user"
    )


# -- evaluating -----------------------------------------------------------------------------


def check_prompts(model: MM1Model, processor: Processor, examples: list[EvalExample]) -> None:
    """Lay out every example's prompt from its images' headers, before any is answered: image
    markers that do not match the images, or a prompt over the model's context, fail here
    naming the line rather than after the lines before it were answered."""
    context = model_context(model)
    for example in examples:
        try:
            messages, _ = processor.flatten_messages(example.messages, example.images)
            text = processor.render(messages, add_generation_prompt=True)
            grids = processor.image_grids(example.image_sizes)
            check_context(len(processor.layout_ids(text, grids)), context)
        except UserError as error:
            raise UserError(f"{example.origin}: {error}") from None


def evaluate(
    model: MM1Model,
    processor: Processor,
    examples: list[EvalExample],
    max_tokens: int = 32,
    on_example: Callable[[], None] = lambda: None,
) -> EvalReport:
    """Answer every example greedily and score it."""
    report = EvalReport()
    for example in examples:
        try:
            prediction = generate(
                model, processor, example.messages, example.images, max_tokens=max_tokens
            )
        except UserError as error:  # e.g. image markers that do not match the images
            raise UserError(f"{example.origin}: {error}") from None
        # Boxes are about the first image; without one they stay in 0-1000 coordinates.
        size = example.image_sizes[0] if example.images else (COORDINATE_MAX, COORDINATE_MAX)
        report.results.append(
            Result(example, prediction, is_correct(prediction, example.answer, size))
        )
        on_example()
    return report

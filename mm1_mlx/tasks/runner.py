"""Running a benchmark: stream its parquet files, answer each example (the model, or saved
predictions), score it, append a line per example to --out as it comes, and sum up.

Every user value is checked before the model loads or a row is answered. --out is the run's
record: an example whose id is already in it is not answered again and its score counts, so an
interrupted run resumes where it stopped (a last line cut off mid-write is dropped).
"""

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mm1_mlx.errors import UserError
from mm1_mlx.generate import generate
from mm1_mlx.jsonl import BadLine, parse_object
from mm1_mlx.loading import import_parquet
from mm1_mlx.tasks.definitions import Example, Task

BATCH_ROWS = 16  # rows decoded at a time: image datasets hold ~100 kB to 1 MB per row

Answer = Callable[[Example], str | None]  # None: no answer to score (no saved prediction)


# -- the data files -------------------------------------------------------------------------


def check_files(task: Task, files: list[Path]) -> None:
    """Each file exists once, is parquet, and has the task's columns."""
    pq = import_parquet()
    if not files:
        raise UserError(f"{task.name}: no data files (--data, the dataset's parquet files)")
    seen = set()
    for path in map(Path, files):
        if not path.is_file():
            raise UserError(f"{path}: no such data file")
        if path.resolve() in seen:
            raise UserError(f"{path}: given twice")
        seen.add(path.resolve())
        try:
            names = pq.read_schema(path).names
        except (OSError, ValueError) as error:  # pyarrow's errors derive from these
            raise UserError(f"{path}: not a readable parquet file ({error})") from None
        missing = [column for column in task.columns + task.image_columns if column not in names]
        if missing:
            raise UserError(
                f"{path}: no column {missing[0]!r}, which {task.name} reads (from {task.source}; "
                f"this file has {', '.join(names)})"
            )


def count_examples(task: Task, files: list[Path]) -> int:
    """How many examples the files hold, from their footers (or, for a task with an example
    per list item, that one column's list lengths)."""
    pq = import_parquet()
    if task.per_item is None:
        return sum(pq.ParquetFile(path).metadata.num_rows for path in files)
    import pyarrow.compute as pc

    column = task.per_item
    return sum(
        pc.sum(pc.list_value_length(pq.read_table(path, columns=[column])[column])).as_py() or 0
        for path in files
    )


def read_examples(
    task: Task, files: list[Path], with_images: bool, limit: int | None = None
) -> Iterator[Example]:
    """The examples of `files` in order, at most `limit`, a few rows decoded at a time. Image
    columns are read only `with_images` (scoring saved predictions rarely needs them)."""
    columns = list(task.columns + (task.image_columns if with_images else ()))
    count, index = 0, 0  # examples, and rows over all files (ids of tasks without one)
    for path in files:
        for number, row in enumerate(parquet_rows(path, columns)):
            for example in task.examples(row, index, f"{path} row {number}"):
                if limit is not None and count >= limit:
                    return
                count += 1
                yield example
            index += 1


def parquet_rows(path: Path, columns: list[str]) -> Iterator[dict[str, Any]]:
    """The rows of a parquet file as dicts, BATCH_ROWS decoded at a time."""
    pq = import_parquet()
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns):
            yield from batch.to_pylist()
    except (OSError, ValueError) as error:  # pyarrow's errors derive from these
        raise UserError(f"{path}: not a readable parquet file ({error})") from None


# -- --out and --predictions ----------------------------------------------------------------


@dataclass
class Done:
    """What --out already holds: each example's score by id, and where appending starts."""

    scores: dict[str, float] = field(default_factory=dict)
    keep: int = 0  # bytes to keep: a torn last line is cut off
    newline: bool = False  # the last whole line lacks its newline


def json_id(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def read_done(path: Path, task: Task) -> Done:
    """The results already in `path`. A bad line is an error, unless it is the last and has no
    newline: a line cut off mid-write, which resuming drops."""
    done = Done()
    if not path.exists():
        return done
    data = path.read_bytes()
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        torn = number == len(lines)  # the part after the last newline
        if not line.strip():
            done.keep += len(line) + (not torn)
            continue
        try:
            key, score = result_line(line, task)
        except UserError as error:
            if torn:
                break
            raise UserError(f"{path}:{number}: {error}") from None
        done.scores[key] = score
        done.keep += len(line) + (not torn)
        done.newline = torn
    return done


def result_line(line: bytes, task: Task) -> tuple[str, float]:
    try:
        record = parse_object(line)
    except BadLine as error:
        raise UserError(str(error)) from None
    score = record.get("score")
    if record.get("task", task.name) != task.name:
        raise UserError(f"a result of task {record['task']!r}, not {task.name!r}: another --out")
    if not json_id(record.get("id")):
        raise UserError("not a result line: no string or integer 'id'")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
        raise UserError("not a result line: 'score' is not a number from 0 to 1")
    return str(record["id"]), float(score)


def read_predictions(path: Path) -> dict[str, str]:
    """{id: answer} from a JSONL file of {"id", "answer"} lines."""
    if not path.is_file():
        raise UserError(f"{path}: no such predictions file")
    answers: dict[str, str] = {}
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            origin = f"{path}:{number}"
            try:
                record = parse_object(line)
            except BadLine as error:
                raise UserError(f"{origin}: {error}") from None
            if not json_id(record.get("id")) or not isinstance(record.get("answer"), str):
                raise UserError(
                    f'{origin}: a prediction is {{"id": <question id>, "answer": "<text>"}}'
                )
            key = str(record["id"])
            if key in answers:
                raise UserError(f"{origin}: id {record['id']!r} was already given")
            answers[key] = record["answer"]
    if not answers:
        raise UserError(f"{path}: no predictions")
    return answers


class ResultWriter:
    """Appends one JSON line per example to --out, flushed at once, after dropping a torn
    last line."""

    def __init__(self, path: Path, done: Done):
        self.path, self.done = path, done
        self.file: IO[bytes] | None = None

    def __enter__(self) -> "ResultWriter":
        try:
            self.file = self.path.open("ab")
            self.file.truncate(self.done.keep)
            if self.done.newline:
                self.file.write(b"\n")
        except OSError as error:
            raise UserError(f"{self.path}: cannot be written ({error.strerror})") from None
        return self

    def write(self, task: Task, example: Example, prediction: str, score: float) -> None:
        record = {"task": task.name, "id": example.id, "prediction": prediction, "score": score}
        assert self.file is not None
        self.file.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        self.file.flush()

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


# -- answering and scoring ------------------------------------------------------------------


def model_answers(model: Any, processor: Any, max_tokens: int) -> Answer:
    """Greedy answers of the model, through its chat template (as `evaluate` asks)."""

    def answer(example: Example) -> str:
        try:
            text = generate(model, processor, example.prompt, example.images, max_tokens=max_tokens)
        except UserError as error:  # an image that is not one, a prompt past the context
            raise UserError(f"{example.origin}: {error}") from None
        return text.strip()

    return answer


def saved_answers(predictions: dict[str, str]) -> Answer:
    return lambda example: predictions.get(example.key)


@dataclass
class Tally:
    n: int = 0
    total: float = 0.0
    resumed: int = 0  # scores taken from --out
    unanswered: int = 0  # examples without a saved prediction

    @property
    def score(self) -> float:
        return self.total / self.n if self.n else 0.0

    def add(self, score: float) -> None:
        self.n += 1
        self.total += score


def run(
    task: Task,
    examples: Iterator[Example],
    answer: Answer,
    done: Done | None = None,
    writer: ResultWriter | None = None,
    on_example: Callable[[Tally], None] = lambda tally: None,
) -> Tally:
    """Score each example (or take its score from `done`), writing each new result."""
    tally, seen = Tally(), set()
    for example in examples:
        if example.key in seen:
            raise UserError(f"{example.origin}: id {example.id!r} came before (a file twice?)")
        seen.add(example.key)
        if done is not None and example.key in done.scores:
            tally.add(done.scores[example.key])
            tally.resumed += 1
        elif (prediction := answer(example)) is None:
            tally.unanswered += 1
        else:
            score = task.score(prediction, example)
            if writer is not None:
                writer.write(task, example, prediction, score)
            tally.add(score)
        on_example(tally)
    return tally

"""`mm1-mlx eval --task`: check everything, then run a benchmark with a progress bar showing the
running score, and print a summary table."""

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from mm1_mlx.errors import UserError
from mm1_mlx.loading import check_file_writable, check_not_over_inputs, write_text_atomic
from mm1_mlx.tasks import runner
from mm1_mlx.tasks.definitions import Task, get_task


@dataclass
class BenchmarkRun:
    """What `mm1-mlx eval --task` was asked: the parquet files and where answers come from."""

    task: str
    data: list[Path]
    model: str | None = None
    predictions: Path | None = None
    limit: int | None = None
    out: Path | None = None
    max_tokens: int | None = None
    json_out: Path | None = None


def check_outputs(run: BenchmarkRun) -> None:
    inputs = [*run.data, *([run.predictions] if run.predictions else [])]
    outputs = [path for path in (run.out, run.json_out) if path is not None]
    for path in outputs:
        check_file_writable(path)
        check_not_over_inputs(path, inputs)
    if len(outputs) == 2 and Path(outputs[0]).resolve() == Path(outputs[1]).resolve():
        raise UserError(f"{run.out}: --out and --json are one file")


def answering(run: BenchmarkRun, task: Task, predictions: dict[str, str] | None):
    """(the answer function, whether images are read): the model's or the saved answers."""
    if predictions is not None:
        return runner.saved_answers(predictions), task.scores_need_images
    from mm1_mlx.loading import load, model_or_default

    model, processor = load(model_or_default(run.model))
    return runner.model_answers(model, processor, run.max_tokens or task.max_tokens), True


def evaluate_benchmark(run: BenchmarkRun) -> runner.Tally:
    """Check every value, then answer and score; prints progress and the summary."""
    from rich.console import Console

    task = get_task(run.task)
    if run.limit is not None and run.limit < 1:
        raise UserError(f"--limit must be at least 1, not {run.limit}")
    if run.model is not None and run.predictions is not None:
        raise UserError("--predictions scores saved answers: it takes no --model")
    runner.check_files(task, run.data)
    check_outputs(run)
    done = runner.read_done(Path(run.out), task) if run.out else None
    predictions = runner.read_predictions(Path(run.predictions)) if run.predictions else None
    total = runner.count_examples(task, run.data)
    total = min(total, run.limit) if run.limit else total
    answer, with_images = answering(run, task, predictions)
    examples = runner.read_examples(task, run.data, with_images, run.limit)
    writer = runner.ResultWriter(Path(run.out), done) if run.out else nullcontext()
    with writer as output, progress_bar(task.name, total) as advance:
        tally = runner.run(task, examples, answer, done, output, on_example=advance)
    if tally.n == 0 and tally.unanswered:
        raise UserError(f"{run.predictions}: no prediction has the id of an example of the data")
    console = Console()
    console.print(summary_table(task, tally))
    for note in notes(task, tally, run):
        console.print(note)
    if run.json_out is not None:
        record = {"task": task.name, "n": tally.n, "score": tally.score}
        write_text_atomic(Path(run.json_out), json.dumps(record, indent=2) + "\n")
    return tally


class progress_bar:
    """A rich progress bar over the examples whose text shows the running score; entering it
    gives the function to call after each example."""

    def __init__(self, name: str, total: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        columns = [TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn()]
        columns += [TextColumn("score {task.fields[score]}"), TimeRemainingColumn()]
        self.progress = Progress(*columns)
        self.bar = self.progress.add_task(name, total=total, score="-")

    def __enter__(self):
        self.progress.__enter__()

        def advance(tally: runner.Tally) -> None:
            score = f"{tally.score:.1%}" if tally.n else "-"
            self.progress.update(self.bar, advance=1, score=score)

        return advance

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


def summary_table(task: Task, tally: runner.Tally):
    from rich.table import Table

    table = Table()
    for column in ("task", "n", "score"):
        table.add_column(column, justify="left" if column == "task" else "right")
    table.add_row(task.name, str(tally.n), f"{tally.score:.2%}")
    return table


def notes(task: Task, tally: runner.Tally, run: BenchmarkRun) -> list[str]:
    source = run.predictions or run.model or "the demo model"
    lines = [f"answers: {source}; score: {task.metric}"]
    if tally.resumed:
        lines.append(f"{tally.resumed} of the {tally.n} scores were already in {run.out}")
    if tally.unanswered:
        lines.append(f"{tally.unanswered} examples had no prediction and were not scored")
    return lines

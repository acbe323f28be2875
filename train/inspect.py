"""`mm1-mlx data inspect`: a source's first examples as the trainer sees them.

Each example is laid out by the training loader itself (train/data.py) with the model's
processor, so what is shown is what trains: the text the tokens decode to, `<image>` where an
image's tokens go (one per tile), and the tokens that carry loss between ⟦ and ⟧ (and green on
a terminal). Sources are read in file order (no shuffling), from the first record.
"""

import itertools
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.text import Text

from mm1_mlx.errors import UserError
from mm1_mlx.processor import ImageBytes, Processor
from mm1_mlx.train.data import DataLoader, Example, image_size
from mm1_mlx.train.sources import SourceConfig, SourceError, source_files, source_kind

LOSS_OPEN, LOSS_CLOSE = "⟦", "⟧"
DEFAULT_FORMATS = {"tar": "caption", "json": "chat"}  # the kinds that hold one format
# Longer than any sensible example: the trainer's limit is the recipe's seq_len, which a source
# does not know (examples over it are skipped there, and counted).
SEQ_LEN = 1 << 16
OPTIONS = {"path": "SOURCE", "format": "--format"}  # a setting's name on the command line


@dataclass
class InspectSettings:
    """The source as `data inspect` was given it (paths relative to the working directory)."""

    path: str
    format: str | None = None  # None: the one format of tar shards or LLaVA JSON
    images: str | None = None
    caption_field: str | None = None
    image_column: str | None = None
    text_column: str | None = None


def inspect_source(settings: InspectSettings, model: str | Path | None, count: int) -> None:
    """Print the first `count` examples of the source (fewer if it holds fewer)."""
    source = source_config(settings)
    processor = load_processor(model)
    try:
        loader = DataLoader([source], processor, seq_len=SEQ_LEN, batch_size=1)
    except SourceError as error:
        option = OPTIONS.get(error.key, "--" + error.key.replace("_", "-"))
        raise UserError(f"{option}: {error.detail}") from None
    console = Console(highlight=False, soft_wrap=True)
    for number in range(1, count + 1):
        example = loader.draw_example()
        if example.record.epoch > 0:  # the source starts over: every example was shown
            break
        console.print(heading(number, example))
        console.print(example_text(processor, example))
        for line in image_lines(example):
            console.print(line)
    if loader.skipped:
        console.print(loader.skipped_summary())


def source_config(settings: InspectSettings) -> SourceConfig:
    files = source_files(settings.path)
    kind = source_kind(files)
    fmt = settings.format or DEFAULT_FORMATS.get(kind)
    missing = next((file for file in files if not file.is_file()), None)
    if fmt is None and missing is not None:  # that, not the format, is what is wrong
        raise UserError(f"SOURCE: {missing}: no such data file")
    if fmt is None:
        raise UserError(f"--format: needed for {settings.path} (caption, interleaved, text, chat)")
    values = {**vars(settings), "format": fmt}
    shuffle = None if kind == "jsonl" else 0  # in file order: the first records are shown
    return SourceConfig(**values, shuffle_buffer=shuffle)


def load_processor(model: str | Path | None) -> Processor:
    """The model's processor alone: inspecting needs its tokenizer and image layout, no weights."""
    from mm1_mlx import loading

    folder = loading.resolve_path(loading.model_or_default(model))
    return loading.load_processor(folder, loading.read_config(folder))


def heading(number: int, example: Example) -> Text:
    loss = sum(example.trained)
    images = len(example.images)
    counts = f"{len(example.tokens)} tokens, {loss} with loss, {images} image{'s' * (images != 1)}"
    return Text(f"── {number}. {example.record.origin} ({counts})", style="bold")


def example_text(processor: Processor, example: Example) -> Text:
    """The example's tokens as text: a tile's image tokens as one `<image>`, and the runs of
    tokens with loss bracketed. Runs are decoded as differences of decoded prefixes, so a
    tokenizer's spacing at a run's start comes out as in the whole text."""
    image_id = processor.config.image_token_id
    per_tile = processor.config.num_image_tokens
    text, decoded, end = Text(), "", 0

    def kind(index: int) -> str:
        token = example.tokens[index]
        return "image" if token == image_id else "loss" if example.trained[index] else "text"

    for run_kind, run in itertools.groupby(range(len(example.tokens)), kind):
        length = len(list(run))
        end += length
        whole = processor.decode(example.tokens[:end])
        if run_kind == "image":
            text.append(processor.image_token * (length // per_tile), style="cyan")
            decoded = whole
            continue
        piece = whole[len(decoded) :] if whole.startswith(decoded) else whole
        if run_kind == "loss":
            text.append(LOSS_OPEN + piece + LOSS_CLOSE, style="green")
        else:
            text.append(piece)
        decoded = whole
    return text


def image_lines(example: Example) -> list[str]:
    lines = []
    for index, (image, grid) in enumerate(zip(example.images, example.grids, strict=True), 1):
        width, height = image_size(image)
        name = image.name if isinstance(image, ImageBytes) else image
        lines.append(f"  image {index}: {name} ({width}x{height}, tiles {grid[0]}x{grid[1]})")
    return lines

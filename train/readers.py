"""Readers: a source's records one at a time, resumable (train/sources.py says what each holds).

Every reader has the same interface, which DataLoader uses:
- `next_record(describe_skips)`: the next Record; at the end of the data the next epoch begins
  (a source without one usable example is an error, not an endless loop);
- `reread(position)`: the Record at a Record.position again (a checkpoint's carried example);
- `state_dict()` / `load_state_dict(state)`: JSON to resume at the exact record;
- `epoch`, `used_in_epoch` (examples taken this epoch; the loader counts them).
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mm1_mlx.errors import UserError
from mm1_mlx.jsonl import BadLine, parse_object
from mm1_mlx.train.containers import CURSORS, position_ok
from mm1_mlx.train.sources import (
    DEFAULT_SHUFFLE_BUFFER,
    ImageFolder,
    ImageZip,
    Position,
    Read,
    Record,
    Skip,
    SourceConfig,
    image_store,
    source_files,
    source_kind,
)


@dataclass
class SourceReader:
    """A JSONL file read a line at a time from a byte offset, never whole; at its end it starts
    over. `used_in_epoch` (examples taken this epoch) stops a file of only bad lines from
    looping forever."""

    path: Path
    offset: int = 0  # of the next line
    line_number: int = 0  # of the last line read
    epoch: int = 0
    used_in_epoch: int = 0
    store: ImageFolder | ImageZip | None = None  # None: the file's folder
    file: BinaryIO | None = field(default=None, repr=False)

    def __post_init__(self):
        self.store = self.store or ImageFolder(self.path.parent)

    def next_record(self, describe_skips: Callable[[], str]) -> Record:
        offset, number, raw = self.next_line(describe_skips)
        return self.record(raw, offset, number, self.epoch)

    def reread(self, position: list) -> Record:
        offset, number, epoch = position
        return self.record(self.read_at(offset), offset, number, epoch)

    def record(self, raw: bytes, offset: int, number: int, epoch: int) -> Record:
        try:
            value = parse_object(raw)
        except BadLine as error:
            value = Skip("unparsable line", str(error))
        return Record(value, [offset, number, epoch], f"{self.path}:{number}", epoch, self.store)

    def next_line(self, describe_skips: Callable[[], str]) -> tuple[int, int, bytes]:
        """(offset, line number, bytes) of the next non-blank line."""
        while True:
            offset, raw = self.offset, self.read_at(self.offset)
            if not raw:
                self.start_next_epoch(describe_skips)
                continue
            self.offset += len(raw)
            self.line_number += 1
            if raw.strip():
                return offset, self.line_number, raw

    def read_at(self, offset: int) -> bytes:
        if self.file is None:
            self.file = self.path.open("rb")
        self.file.seek(offset)  # within the read buffer this is free
        return self.file.readline()

    def start_next_epoch(self, describe_skips: Callable[[], str]) -> None:
        if self.used_in_epoch == 0:
            raise UserError(f"{self.path}: not one usable example in the file ({describe_skips()})")
        self.offset, self.line_number, self.used_in_epoch = 0, 0, 0
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        keys = ("offset", "line_number", "epoch", "used_in_epoch")
        return {"path": str(self.path), **{key: getattr(self, key) for key in keys}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Resolved: a checkpoint may name the file relative to the working directory.
        if Path(state["path"]).resolve() != self.path.resolve():
            raise UserError(f"the data state is for {state['path']}, not {self.path}")
        counts = state["line_number"], state["epoch"], state["used_in_epoch"]
        if not self.starts_a_line(state["offset"]) or min(counts) < 0:
            raise ValueError(f"{self.path}: the data state's position is not one of the file's")
        self.offset, self.line_number = state["offset"], state["line_number"]
        self.epoch, self.used_in_epoch = state["epoch"], state["used_in_epoch"]

    def starts_a_line(self, offset: int) -> bool:
        """Whether `offset` is where one of the file's lines starts (or its end)."""
        if not 0 <= offset <= self.path.stat().st_size:
            return False
        if offset == 0:
            return True
        with self.path.open("rb") as file:
            file.seek(offset - 1)
            return file.read(1) == b"\n"


class ContainerReader:
    """A tar, parquet or JSON source, read a block of `shuffle_buffer` records at a time and
    given out in a seeded order (train/sources.py, "Shuffling")."""

    def __init__(self, source: SourceConfig, seed: list[int]):
        self.source, self.seed = source, seed
        self.files = source_files(source.path)
        self.kind = source_kind(self.files)
        self.cursor = CURSORS[self.kind]
        buffer = source.shuffle_buffer
        self.buffer = DEFAULT_SHUFFLE_BUFFER if buffer is None else max(buffer, 1)
        self.store = image_store(source, self.files[0].parent)
        self.epoch, self.used_in_epoch = 0, 0  # used: examples taken (set by the loader)
        self.start, self.blocks, self.taken = Position(0, 0, 0), 0, 0
        self.block: list[Record] | None = None  # read when first needed
        self.order: list[int] = []
        self.end = self.start  # where the block ends: the next one starts
        self.stream: Iterator[Read] | None = None  # reading from `end` on

    def next_record(self, describe_skips: Callable[[], str]) -> Record:
        while True:
            if self.block is None:
                self.read_block()
            if self.taken < len(self.block):
                position = [self.epoch, self.blocks, list(self.start), self.taken]
                record = self.block[self.order[self.taken]]
                record.position = position  # its block's start and its place in the block's order
                self.taken += 1
                return record
            if not self.block:
                self.start_next_epoch(describe_skips)
            else:
                self.start, self.blocks, self.taken, self.block = self.end, self.blocks + 1, 0, None

    def read_block(self) -> None:
        if self.stream is None or self.end != self.start:
            files = self.files_in_order(self.epoch)
            self.stream, self.end = self.cursor(files, self.start, self.source), self.start
        self.block = []
        for read in self.stream:
            self.block.append(
                Record(read.value, [], read.origin, self.epoch, self.store, read.embedded)
            )
            self.end = read.next
            if len(self.block) == self.buffer:
                break
        self.order = list(range(len(self.block)))
        if self.buffer > 1:
            rng = np.random.default_rng([*self.seed, self.epoch, 1, self.blocks])
            self.order = rng.permutation(len(self.block)).tolist()

    def files_in_order(self, epoch: int) -> list[Path]:
        if self.buffer == 1:
            return self.files
        rng = np.random.default_rng([*self.seed, epoch, 0])
        return [self.files[i] for i in rng.permutation(len(self.files))]

    def start_next_epoch(self, describe_skips: Callable[[], str]) -> None:
        if self.used_in_epoch == 0:
            raise UserError(f"{self.source.path}: not one usable example ({describe_skips()})")
        self.epoch, self.used_in_epoch = self.epoch + 1, 0
        self.start, self.blocks, self.taken, self.block = Position(0, 0, 0), 0, 0, None
        self.stream = None

    def reread(self, position: list) -> Record:
        """The record at a `Record.position`, for the example a checkpoint carried over."""
        epoch, blocks, start, taken = position
        again = ContainerReader(self.source, self.seed)
        again.epoch, again.blocks, again.start, again.taken = epoch, blocks, Position(*start), taken
        again.used_in_epoch = 1  # the data may have changed: that is the caller's error to say
        return again.next_record(lambda: "")

    def state_dict(self) -> dict[str, Any]:
        return {
            "path": self.source.path,
            "epoch": self.epoch,
            "used_in_epoch": self.used_in_epoch,
            "start": list(self.start),
            "blocks": self.blocks,
            "taken": self.taken,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = [path.resolve() for path in source_files(state["path"])]
        if saved != [path.resolve() for path in self.files]:
            raise UserError(f"the data state is for {state['path']}, not {self.source.path}")
        start = Position(*state["start"])
        counts = state["epoch"], state["used_in_epoch"], state["blocks"], state["taken"]
        files = self.files_in_order(state["epoch"])
        if min(counts) < 0 or not position_ok(self.kind, files, start):
            raise ValueError(f"{self.source.path}: the data state's position is not one of its")
        self.epoch, self.used_in_epoch, self.blocks, self.taken = counts
        self.start, self.block, self.stream = start, None, None


def make_reader(source: SourceConfig, seed: list[int]) -> SourceReader | ContainerReader:
    """The reader of a source's kind; `seed` (the loader's seed and the source's index) orders
    a container source's files and blocks."""
    files = source_files(source.path)
    if source_kind(files) == "jsonl":
        return SourceReader(files[0], store=image_store(source, files[0].parent))
    return ContainerReader(source, seed)

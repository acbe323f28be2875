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
    """A tar, parquet or JSON source, shuffled through a sliding buffer of `shuffle_buffer`
    records (train/sources.py, "Shuffling")."""

    def __init__(self, source: SourceConfig, seed: list[int]):
        self.source, self.seed = source, seed
        self.files = source_files(source.path)
        self.kind = source_kind(self.files)
        self.cursor = CURSORS[self.kind]
        buffer = source.shuffle_buffer
        self.size = DEFAULT_SHUFFLE_BUFFER if buffer is None else max(buffer, 1)
        self.store = image_store(source, self.files[0].parent)
        self.epoch, self.used_in_epoch = 0, 0  # used: examples taken (set by the loader)
        self.draws = 0  # records given out this epoch: each draw's random slot is seeded by it
        self.end = Position(0, 0, 0)  # where the stream goes on: the buffer holds what is before
        self.held: list[Position] = []  # where the buffered records start, in buffer order
        self.buffer: list[Record] | None = []  # None: to be read again at `held` (a resume)
        self.stream: Iterator[Read] | None = None  # reading from `end` on

    def next_record(self, describe_skips: Callable[[], str]) -> Record:
        while True:
            if self.buffer is None:
                self.buffer = self.read_held()
            self.fill()
            if self.buffer:
                return self.draw()
            self.start_next_epoch(describe_skips)

    def fill(self) -> None:
        if self.stream is None:
            self.stream = self.cursor(self.files_in_order(self.epoch), self.end, self.source)
        while len(self.buffer) < self.size:
            read = next(self.stream, None)
            if read is None:
                return
            self.held.append(self.end)
            self.buffer.append(self.record(read))
            self.end = read.next

    def draw(self) -> Record:
        """A seeded random record of the buffer; the last takes its slot (the order of the
        others does not matter: each draw picks uniformly)."""
        slot = 0
        if self.size > 1:
            rng = np.random.default_rng([*self.seed, self.epoch, 1, self.draws])
            slot = int(rng.integers(len(self.buffer)))
        self.buffer[slot], self.buffer[-1] = self.buffer[-1], self.buffer[slot]
        self.held[slot], self.held[-1] = self.held[-1], self.held[slot]
        record, start = self.buffer.pop(), self.held.pop()
        record.position = [self.epoch, list(start)]
        self.draws += 1
        return record

    def record(self, read: Read) -> Record:
        return Record(read.value, [], read.origin, self.epoch, self.store, read.embedded)

    def read_held(self) -> list[Record]:
        """The buffered records again, read in one pass from the first of them to `end`."""
        if not self.held:
            return []
        wanted = {start: slot for slot, start in enumerate(self.held)}
        records: list[Record | None] = [None] * len(self.held)
        start = min(self.held)
        stream = self.cursor(self.files_in_order(self.epoch), start, self.source)
        while start < self.end:
            read = next(stream, None)
            if read is None:
                break
            if start in wanted:
                records[wanted[start]] = self.record(read)
            start = read.next
        if any(record is None for record in records):
            raise ValueError(f"{self.source.path}: the data state's buffer is not in its files")
        return records

    def files_in_order(self, epoch: int) -> list[Path]:
        if self.size == 1:
            return self.files
        rng = np.random.default_rng([*self.seed, epoch, 0])
        return [self.files[i] for i in rng.permutation(len(self.files))]

    def start_next_epoch(self, describe_skips: Callable[[], str]) -> None:
        if self.used_in_epoch == 0:
            raise UserError(f"{self.source.path}: not one usable example ({describe_skips()})")
        self.epoch, self.used_in_epoch, self.draws = self.epoch + 1, 0, 0
        self.end, self.held, self.buffer, self.stream = Position(0, 0, 0), [], [], None

    def reread(self, position: list) -> Record:
        """The record at a `Record.position`, for the example a checkpoint carried over."""
        epoch, start = position
        files = self.files_in_order(epoch)
        read = next(self.cursor(files, Position(*start), self.source), None)
        if read is None:
            raise ValueError(f"{self.source.path}: the carried example is not in its files")
        return self.record(read)

    def state_dict(self) -> dict[str, Any]:
        return {
            "path": self.source.path,
            "epoch": self.epoch,
            "used_in_epoch": self.used_in_epoch,
            "draws": self.draws,
            "end": list(self.end),
            "held": [list(start) for start in self.held],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = [path.resolve() for path in source_files(state["path"])]
        if saved != [path.resolve() for path in self.files]:
            raise UserError(f"the data state is for {state['path']}, not {self.source.path}")
        end, held = Position(*state["end"]), [Position(*start) for start in state["held"]]
        counts = state["epoch"], state["used_in_epoch"], state["draws"]
        files = self.files_in_order(state["epoch"])
        starts_ok = all(start < end and position_ok(self.kind, files, start) for start in held)
        end_ok = position_ok(self.kind, files, end)
        if min(counts) < 0 or len(held) > self.size or not (starts_ok and end_ok):
            raise ValueError(f"{self.source.path}: the data state's position is not one of its")
        self.epoch, self.used_in_epoch, self.draws = counts
        self.end, self.held, self.buffer, self.stream = end, held, None, None


def make_reader(source: SourceConfig, seed: list[int]) -> SourceReader | ContainerReader:
    """The reader of a source's kind; `seed` (the loader's seed and the source's index) orders
    a container source's files and blocks."""
    files = source_files(source.path)
    if source_kind(files) == "jsonl":
        return SourceReader(files[0], store=image_store(source, files[0].parent))
    return ContainerReader(source, seed)

"""Reading the container kinds of data source, in storage order from a position: webdataset
tar shards, parquet files and LLaVA's JSON list (train/sources.py says what each holds).

A cursor (read_tar, read_parquet, read_json_list) yields a Read per record: the record as the
JSONL formats' dict (or the Skip that says why it cannot be one), its origin for messages, its
images, and the Position where the next record starts, so reading can resume there.
"""

import codecs
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from mm1_mlx.jsonl import BadLine, check_strings, parse_object
from mm1_mlx.loading import import_parquet
from mm1_mlx.processor import ImageBytes
from mm1_mlx.train.sources import (
    IMAGE_SUFFIXES,
    Position,
    Read,
    Skip,
    SourceConfig,
    parquet_columns,
)

Cursor = Callable[[list[Path], Position, SourceConfig], Iterator[Read]]

# -- webdataset shards --------------------------------------------------------------------------


def read_tar(files: list[Path], start: Position, source: SourceConfig) -> Iterator[Read]:
    """Samples of plain .tar shards from `start`. A shard that breaks off (truncated, corrupt)
    is one unreadable record and its rest is passed over."""
    for index in range(start.file, len(files)):
        path = files[index]
        offset, number = start[1:] if index == start.file else (0, 0)
        try:
            with path.open("rb") as file:
                file.seek(offset)  # tarfile starts reading headers where the file is
                with tarfile.open(fileobj=file, mode="r:") as tar:
                    for key, members, next_offset in tar_samples(tar):
                        number += 1
                        value, embedded = caption_sample(path, key, members, source)
                        yield Read(
                            value, f"{path}:{key}", embedded, Position(index, next_offset, number)
                        )
        except (tarfile.TarError, OSError, EOFError) as error:
            skip = Skip("unreadable shard", f"not a readable tar past sample {number} ({error})")
            yield Read(skip, str(path), {}, Position(index + 1, 0, 0))


def tar_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """(KEY, {suffix: bytes}, offset of the next sample's first header) for each run of
    consecutive members that share a KEY (webdataset's grouping)."""
    key, members = None, {}
    while (member := tar.next()) is not None:
        tar.members.clear()  # tarfile keeps every header read; a shard has many
        if not member.isfile():
            continue
        member_key, suffix = split_member_name(member.name)
        if key is not None and member_key != key:
            yield key, members, member.offset
            members = {}
        key = member_key
        members[suffix] = tar.extractfile(member).read()
    if key is not None:
        yield key, members, tar.offset


def split_member_name(name: str) -> tuple[str, str]:
    """ "dir/0001.seg.png" -> ("dir/0001", "seg.png"): the key ends at the basename's first dot."""
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def caption_sample(
    path: Path, key: str, members: dict[str, bytes], source: SourceConfig
) -> tuple[dict[str, Any] | Skip, dict[str, ImageBytes]]:
    suffix = next((suffix for suffix in IMAGE_SUFFIXES if suffix in members), None)
    if suffix is None:
        return Skip("invalid record", "no image member (.jpg, .jpeg, .png or .webp)"), {}
    try:
        caption = sample_caption(members, source.caption_field or "caption")
    except Skip as skip:
        return skip, {}
    name = f"{key}.{suffix}"
    image = ImageBytes(f"{path}:{name}", members[suffix])
    return {"image": name, "text": caption}, {name: image}


def sample_caption(members: dict[str, bytes], caption_field: str) -> str:
    """KEY.txt as it is, else the caption field of KEY.json (stripped: files end in newlines)."""
    if "txt" in members:
        try:
            return members["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise Skip("unparsable record", "the .txt caption is not UTF-8") from None
    if "json" not in members:
        raise Skip("invalid record", "no caption member (.txt or .json)")
    try:
        caption = parse_object(members["json"]).get(caption_field)
    except BadLine as error:
        raise Skip("unparsable record", f"the .json member: {error}") from None
    if not isinstance(caption, str):
        raise Skip("invalid record", f"the .json member has no text {caption_field!r}")
    return caption.strip()


def tar_position_ok(path: Path, offset: int) -> bool:
    """Whether a tar header (or the archive's end) starts at `offset`."""
    if offset % tarfile.BLOCKSIZE or not 0 <= offset <= path.stat().st_size:
        return False
    with path.open("rb") as file:
        file.seek(offset)
        block = file.read(tarfile.BLOCKSIZE)
    try:
        return not block.strip(b"\0") or bool(tarfile.TarInfo.frombuf(block, "utf-8", "strict"))
    except tarfile.TarError:
        return False


# -- parquet ------------------------------------------------------------------------------------


def read_parquet(files: list[Path], start: Position, source: SourceConfig) -> Iterator[Read]:
    """Rows from `start`, a row group at a time (the hub's image datasets keep them small)."""
    pq = import_parquet()
    image_column, text_column = parquet_columns(source)
    columns = [column for column in (image_column, text_column) if column]
    for index in range(start.file, len(files)):
        path, row = files[index], start.offset if index == start.file else 0
        try:
            parquet = pq.ParquetFile(path)
            first_group, first = row_group_at(parquet.metadata, row)
            for group in range(first_group, parquet.num_row_groups):
                rows = parquet.read_row_group(group, columns=columns).to_pylist()
                for number in range(max(row, first), first + len(rows)):
                    origin = f"{path}:row {number}"
                    value, embedded = parquet_record(rows[number - first], source, origin)
                    yield Read(value, origin, embedded, Position(index, number + 1, number + 1))
                first += len(rows)
        except (OSError, ValueError) as error:  # pyarrow's errors derive from these
            skip = Skip("unreadable file", f"not a readable parquet file past row {row} ({error})")
            yield Read(skip, str(path), {}, Position(index + 1, 0, 0))


def row_group_at(metadata, row: int) -> tuple[int, int]:
    """(the row group holding `row`, its first row)."""
    first = 0
    for group in range(metadata.num_row_groups):
        size = metadata.row_group(group).num_rows
        if row < first + size:
            return group, first
        first += size
    return metadata.num_row_groups, first


def parquet_record(
    row: dict[str, Any], source: SourceConfig, origin: str
) -> tuple[dict[str, Any] | Skip, dict[str, ImageBytes]]:
    """A row as the JSONL format's dict, and the images it holds."""
    image_column, text_column = parquet_columns(source)
    embedded: dict[str, ImageBytes] = {}
    text = row[text_column]
    try:
        if source.format == "text":
            return {"text": text}, {}
        if source.format == "caption":
            name = image_name(row[image_column], image_column, origin, embedded)
            return {"image": name, "text": text}, embedded
        images = row[image_column]
        if source.format == "interleaved":
            return interleaved_record(images, text, image_column, origin, embedded), embedded
        return chat_record(images, text, image_column, origin, embedded), embedded
    except Skip as skip:
        return skip, {}


def image_name(value: Any, where: str, origin: str, embedded: dict[str, ImageBytes]) -> str:
    """The name a record calls a parquet image cell by: `where` for bytes (kept in `embedded`),
    the path for a path alone (found in the source's image folder)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes) and value:
        embedded[where] = ImageBytes(f"{origin}:{where}", value)
        return where
    if isinstance(value, str) and value:
        return value
    raise Skip("invalid record", f"{where} is no image ({{bytes, path}}, bytes or a path)")


def interleaved_record(
    images: Any, texts: Any, column: str, origin: str, embedded: dict[str, ImageBytes]
) -> dict[str, Any]:
    """OBELICS' aligned lists (at each index an image or a text, None for the other) ->
    {"content": [...]}. Consecutive texts are paragraphs: a blank line goes between them."""
    if not isinstance(images, list) or not isinstance(texts, list) or len(images) != len(texts):
        raise Skip("invalid record", "images and texts are lists of the same length")
    content: list[dict[str, str]] = []
    for index, (image, text) in enumerate(zip(images, texts, strict=True)):
        if image is not None:
            content.append({"image": image_name(image, f"{column}[{index}]", origin, embedded)})
        elif content and "text" in content[-1] and isinstance(text, str):
            content.append({"text": "\n\n" + text})
        else:
            content.append({"text": text})
    return {"content": content}


def chat_record(
    images: Any, messages: Any, column: str, origin: str, embedded: dict[str, ImageBytes]
) -> dict[str, Any]:
    """An images cell (one image, a list, or None) and a conversation in either form:
    {"role", "content"} messages or LLaVA's {"from", "value"} turns."""
    images = [] if images is None else images if isinstance(images, list) else [images]
    names = [
        image_name(image, f"{column}[{i}]", origin, embedded) for i, image in enumerate(images)
    ]
    if not isinstance(messages, list):
        raise Skip("invalid record", "the messages are a list")
    turns = [without_nulls(message) for message in messages]
    llava = bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]
    return {"conversations" if llava else "messages": turns, "images": names}


def without_nulls(value: Any) -> Any:
    """Parquet gives a struct every field of its column, None where a message lacks it."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


# -- LLaVA's JSON list --------------------------------------------------------------------------


END = object()  # JsonListParser.next_item at the list's end
WHITESPACE = re.compile(r"[ \t\r\n\ufeff]*")  # JSON's, and a byte-order mark
DECODER = json.JSONDecoder()


class JsonListParser:
    """The items of a file holding one JSON list, parsed one at a time from a buffered read
    (json.JSONDecoder.raw_decode), so memory holds an item and a chunk, never the list.
    Offsets are in bytes: text is decoded with surrogateescape, so encoding a span back gives
    its exact length (a byte that is not UTF-8 becomes a lone surrogate, refused per item).
    Offset 0 is before the list's "["; any other is just after an item."""

    CHUNK = 1 << 20
    MAX_ITEM = 64 << 20  # an item that does not end within this is broken JSON

    def __init__(self, file: BinaryIO, offset: int, number: int):
        file.seek(offset)
        self.file, self.offset, self.number, self.opened = file, offset, number, offset > 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.text, self.pos, self.done = "", 0, False

    def next_item(self) -> Any:
        """The next item, or END; BadLine where the JSON breaks (nothing after it is found)."""
        if not self.opened:
            self.take("[")
            self.opened = True
            if self.peek() == "]":
                return END
        elif self.take(",]") == "]":
            return END
        self.peek()
        while True:
            try:
                item, end = DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as error:
                if self.done or len(self.text) - self.pos > self.MAX_ITEM:
                    raise BadLine(f"not JSON ({error.msg} at byte {self.offset})") from None
                self.read()  # the item may go on in the next chunk
                continue
            except RecursionError:
                raise BadLine("not JSON (nested too deeply)") from None
            self.advance(end)
            self.number += 1
            return item

    def take(self, allowed: str) -> str:
        char = self.peek()
        if not char or char not in allowed:
            found = repr(char) if char else "the end of the file"
            raise BadLine(f"not a JSON list ({' or '.join(allowed)} expected, {found} found)")
        self.advance(self.pos + 1)
        return char

    def peek(self) -> str:
        """The next character past whitespace ("" at the file's end), not taken."""
        while True:
            self.advance(WHITESPACE.match(self.text, self.pos).end())
            if self.pos < len(self.text) or self.done:
                return self.text[self.pos : self.pos + 1]
            self.read()

    def advance(self, end: int) -> None:
        self.offset += len(self.text[self.pos : end].encode("utf-8", "surrogateescape"))
        self.pos = end
        if self.pos > self.CHUNK:  # drop what is parsed
            self.text, self.pos = self.text[self.pos :], 0

    def read(self) -> None:
        chunk = self.file.read(self.CHUNK)
        self.done = not chunk
        self.text += self.decoder.decode(chunk, final=self.done)


def read_json_list(files: list[Path], start: Position, source: SourceConfig) -> Iterator[Read]:
    """LLaVA's items from `start`. JSON broken mid-list ends the file's reading (one unparsable
    record): where the next item starts cannot be known."""
    if start.file >= len(files):
        return
    path = files[start.file]
    with path.open("rb") as file:
        parser = JsonListParser(file, start.offset, start.number)
        while True:
            origin = f"{path}:[{parser.number}]"
            try:
                item = parser.next_item()
            except BadLine as error:
                skip = Skip("unparsable record", f"{error}; the rest of the file is not read")
                yield Read(skip, origin, {}, Position(start.file + 1, 0, 0))
                return
            if item is END:
                return
            next_start = Position(start.file, parser.offset, parser.number)
            yield Read(llava_item(item), origin, {}, next_start)


def llava_item(item: Any) -> dict[str, Any] | Skip:
    if not isinstance(item, dict):
        return Skip("invalid record", "a list item is a JSON object")
    try:
        check_strings(item)
    except BadLine as error:
        return Skip("unparsable record", str(error))
    return item


def json_position_ok(path: Path, offset: int) -> bool:
    return 0 <= offset <= path.stat().st_size


CURSORS: dict[str, Cursor] = {"tar": read_tar, "parquet": read_parquet, "json": read_json_list}


def position_ok(kind: str, files: list[Path], position: Position) -> bool:
    """Whether a saved position can be one of the files' (a damaged checkpoint's cannot)."""
    if min(position) < 0 or position.file > len(files):
        return False
    if position.file == len(files) or position.offset == 0:
        return True
    path = files[position.file]
    if kind == "tar":
        return tar_position_ok(path, position.offset)
    if kind == "json":
        return json_position_ok(path, position.offset)
    return position.offset <= import_parquet().ParquetFile(path).metadata.num_rows

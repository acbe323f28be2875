"""Training data sources: where the loader's records come from (docs/architecture.md, "Training").

The kind of a source follows from its files' names:
- `.tar`: webdataset shards (LAION/DataComp layout): members `KEY.jpg|jpeg|png|webp` and
  `KEY.txt` (the caption) or `KEY.json` (the caption in `caption_field`), grouped by KEY.
- `.parquet`: the hub's datasets layout; images are `{bytes, path}` structs (or lists of them),
  `image_column` and `text_column` name the columns.
- `.json`: LLaVA's one JSON list of `{"id", "image", "conversations"}`, parsed an item at a time.
- anything else: the project's JSONL, one record a line (SourceReader).

Every reader turns its data into the dicts the JSONL formats hold (so data.py renders them all
the same way) and gives them as Records. Images inside a container travel as ImageBytes; image
names are found in the record's own images first, then in the source's `images` folder or zip.

Shuffling (all kinds but JSONL, which is read in file order): files in a seeded order per epoch,
then a sliding buffer of `shuffle_buffer` records, as webdataset and tf.data shuffle: each
record given out is drawn at a seeded random slot of the buffer, and the next record read takes
its place, so records mix across the whole stream, not within fixed blocks. The state is small:
where the stream goes on, where each buffered record starts, and the draws so far this epoch
(they seed the next slot); resuming reads the buffered records again in one pass from the first
of them, so a run resumes at the exact record.
"""

import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from mm1_mlx.errors import UserError
from mm1_mlx.loading import import_parquet
from mm1_mlx.processor import ImageBytes

DEFAULT_SHUFFLE_BUFFER = 1000
MAX_SHUFFLE_BUFFER = 1_000_000
MAX_FILES = 1_000_000  # a brace pattern expanding further is surely a typo
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
FORMATS = {  # the formats each kind of source holds
    "jsonl": ("caption", "interleaved", "text", "chat"),
    "tar": ("caption",),
    "parquet": ("caption", "interleaved", "text", "chat"),
    "json": ("chat",),
}
DEFAULT_COLUMNS = {  # format -> (image column, text column) of a parquet source
    "caption": ("image", "text"),
    "interleaved": ("images", "texts"),
    "text": (None, "text"),
    "chat": ("images", "messages"),
}


@dataclass
class SourceConfig:
    path: str | list[str]  # a file, a brace pattern ("shards/{000..009}.tar") or a list of files
    format: str  # "caption" | "interleaved" | "text" | "chat"
    weight: float = 1.0
    shuffle_buffer: int | None = None  # None: DEFAULT_SHUFFLE_BUFFER (JSONL: read in order)
    images: str | None = None  # folder or .zip that image names are in; None: the data's folder
    caption_field: str | None = None  # .tar: the caption's field in KEY.json ("caption")
    image_column: str | None = None  # .parquet: None: DEFAULT_COLUMNS by format
    text_column: str | None = None  # .parquet: the captions, texts or messages/conversations


class Skip(Exception):
    """An example that cannot be used; `reason` is its key in DataLoader.skipped."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class SourceError(UserError):
    """A source setting outside its domain; `key` names the setting (e.g. "image_column")."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.detail = key, message


# -- files --------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion, as webdataset names shards: "a{0..2}" -> a0 a1 a2 (zero
    padding kept: {000..009}), "{x,y}z" -> xz yz; groups nest and multiply."""
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise UserError(f"{pattern!r}: a '}}' without its '{{'")
        return [pattern]
    end = _closing_brace(pattern, start)
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    rest = expand_braces(tail)
    names = [head + choice + after for choice in _alternatives(body) for after in rest]
    if len(names) > MAX_FILES:
        raise UserError(f"{pattern!r}: expands to over {MAX_FILES:,} names")
    return names


def _closing_brace(pattern: str, start: int) -> int:
    depth = 0
    for index in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[index], 0)
        if depth == 0:
            return index
    raise UserError(f"{pattern!r}: a '{{' without its '}}'")


def _alternatives(body: str) -> list[str]:
    """What one brace group stands for: a numeric range, or its comma-separated choices."""
    numbers = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numbers:
        first, last = numbers.groups()
        step = 1 if int(last) >= int(first) else -1
        width = len(first) if first.startswith("0") or last.startswith("0") else 0
        return [f"{n:0{width}d}" for n in range(int(first), int(last) + step, step)]
    parts, depth, begin = [], 0, 0
    for index, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(body[begin:index])
            begin = index + 1
    parts.append(body[begin:])
    if len(parts) == 1:
        raise UserError(f"{{{body}}}: a brace group is {{A..B}} or {{x,y,...}}")
    return [name for part in parts for name in expand_braces(part)]


def source_files(path: str | list[str]) -> list[Path]:
    """The files a source's `path` names, in order."""
    names = path if isinstance(path, list) else expand_braces(path)
    return [Path(name) for name in names]


def source_kind(files: list[Path]) -> str:
    kinds = {_kind_of(file) for file in files}
    if len(kinds) > 1:
        raise SourceError("path", f"mixes kinds of files ({', '.join(sorted(kinds))})")
    return kinds.pop()


def _kind_of(file: Path) -> str:
    suffix = file.suffix.lower()
    return {".tar": "tar", ".parquet": "parquet", ".json": "json"}.get(suffix, "jsonl")


# -- images -------------------------------------------------------------------------------------


@dataclass
class ImageFolder:
    """Image names relative to a folder (read later, by path, as the JSONL loader always has)."""

    folder: Path

    def find(self, name: str) -> Path | ImageBytes:
        if name.startswith(("http://", "https://")):
            raise Skip("missing image", f"{name}: a URL (download the images first)")
        return self.folder / name


@dataclass
class ImageZip:
    """Image names as entries of a zip file, under a folder inside it or at its top (COCO's
    train2017.zip holds train2017/NAME.jpg, which LLaVA's JSON calls NAME.jpg)."""

    path: Path
    folder: str = ""  # inside the zip
    archive: zipfile.ZipFile | None = field(default=None, repr=False)

    def find(self, name: str) -> Path | ImageBytes:
        entry = f"{self.folder}/{name}" if self.folder else name
        if self.archive is None:
            self.archive = zipfile.ZipFile(self.path)
        try:
            return ImageBytes(f"{self.path}:{entry}", self.archive.read(entry))
        except KeyError:
            raise Skip("missing image", f"{self.path}: no entry {entry!r}") from None
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise Skip("corrupt image", f"{self.path}:{entry}: {error}") from None


def image_store(source: SourceConfig, default: Path) -> ImageFolder | ImageZip:
    """Where a source's image names are: `images` (a folder, a .zip, or a folder in a .zip:
    "train2017.zip/train2017"), else the data file's folder."""
    if source.images is None:
        return ImageFolder(default)
    images = Path(source.images)
    for index, part in enumerate(images.parts):
        if part.lower().endswith(".zip"):
            return ImageZip(Path(*images.parts[: index + 1]), "/".join(images.parts[index + 1 :]))
    return ImageFolder(images)


# -- records ------------------------------------------------------------------------------------


@dataclass
class Record:
    """One record of a source: as the JSONL formats hold it, or why it cannot be used."""

    value: dict[str, Any] | Skip
    position: list  # JSON: what the reader's `reread` takes to give this record again
    origin: str  # "file:line", "shard.tar:KEY", "file.parquet:row N", "file.json:[N]"
    epoch: int  # the source's pass it was read in: a bad record is counted in the first only
    store: ImageFolder | ImageZip
    embedded: dict[str, ImageBytes] = field(default_factory=dict)  # images inside the record

    def image(self, name: str) -> Path | ImageBytes:
        """The image a rendered record names, for data.image_size and load_image."""
        return self.embedded[name] if name in self.embedded else self.store.find(name)


class Position(NamedTuple):
    """Where a container source's next record starts."""

    file: int  # index into the epoch's file order
    offset: int  # byte offset (tar, json) or row (parquet) in that file
    number: int  # records before it in that file


class Read(NamedTuple):
    """What a cursor gives: a record (or Skip), its origin, its images, where the next starts."""

    value: dict[str, Any] | Skip
    origin: str
    embedded: dict[str, ImageBytes]
    next: Position


# -- checking -----------------------------------------------------------------------------------

SETTING_KINDS = {  # the source settings that only some kinds of source have
    "shuffle_buffer": ("tar", "parquet", "json"),
    "images": ("jsonl", "parquet", "json"),
    "caption_field": ("tar",),
    "image_column": ("parquet",),
    "text_column": ("parquet",),
}
KIND_NAMES = {
    "jsonl": "JSONL file",
    "tar": "webdataset shard (.tar)",
    "parquet": "parquet file",
    "json": "LLaVA JSON file",
}


def check_source(source: SourceConfig) -> None:
    """Every setting of a source against what it can be, before any example is read: a
    SourceError naming the setting. The format itself is checked by the caller (RENDERERS)."""
    try:
        files = source_files(source.path)
    except UserError as error:
        raise SourceError("path", str(error)) from None
    compressed = next((f for f in files if f.name.endswith((".tar.gz", ".tgz"))), None)
    if compressed is not None:  # read as JSONL otherwise, every line unparsable
        raise SourceError("path", f"{compressed}: compressed shards are not read (plain .tar)")
    kind = source_kind(files)
    if kind in ("jsonl", "json") and len(files) != 1:
        raise SourceError("path", f"a {KIND_NAMES[kind]} source is one file, not {len(files)}")
    missing = next((file for file in files if not file.is_file()), None)
    if missing is not None:
        raise SourceError("path", f"{missing}: no such data file")
    if source.format not in FORMATS[kind]:
        held = " or ".join(FORMATS[kind])
        raise SourceError("format", f"a {KIND_NAMES[kind]} holds {held}, not {source.format!r}")
    for key, kinds in SETTING_KINDS.items():
        if getattr(source, key) is not None and kind not in kinds:
            names = ", ".join(KIND_NAMES[name] for name in kinds)
            raise SourceError(key, f"is for {names} sources, not a {KIND_NAMES[kind]}")
    if source.images is not None:
        check_images(image_store(source, Path()))
    if kind == "parquet":
        check_columns(files, source)


def check_images(images: ImageFolder | ImageZip) -> None:
    if isinstance(images, ImageFolder):
        if not images.folder.is_dir():
            raise SourceError("images", f"{images.folder}: no such folder (or a .zip)")
        return
    if not zipfile.is_zipfile(images.path):
        raise SourceError("images", f"{images.path}: no such zip file, or not a readable one")
    if images.folder:
        with zipfile.ZipFile(images.path) as archive:
            if not any(name.startswith(images.folder + "/") for name in archive.namelist()):
                raise SourceError("images", f"{images.path} has no folder {images.folder!r}")


def check_columns(files: list[Path], source: SourceConfig) -> None:
    """Each file has the columns, holding what the format needs (read from the files' footers)."""
    pq = import_parquet()
    image_column, text_column = parquet_columns(source)
    wanted = {"text_column": (text_column, *TEXT_TYPES[source.format])}
    if image_column is not None:
        wanted["image_column"] = (image_column, *IMAGE_TYPES[source.format])
    for file in files:
        try:
            schema = pq.read_schema(file)
        except (OSError, ValueError) as error:
            raise SourceError("path", f"{file}: not a readable parquet file ({error})") from None
        for key, (column, test, allowed) in wanted.items():
            if column not in schema.names:
                names = ", ".join(schema.names)
                raise SourceError(key, f"{file} has no column {column!r} (it has {names})")
            if not test(schema.field(column).type):
                found = schema.field(column).type
                raise SourceError(key, f"{file}'s {column!r} holds {found}, not {allowed}")


def parquet_columns(source: SourceConfig) -> tuple[str | None, str]:
    """(image column or None, text column): the source's, else its format's defaults."""
    image_column, text_column = DEFAULT_COLUMNS[source.format]
    if image_column is not None:
        image_column = source.image_column or image_column
    return image_column, source.text_column or text_column


# What a parquet column may hold, per format: a test of its arrow type, and the words for it.
# (pyarrow is imported in the tests: it is optional, and only parquet sources need it.)


def is_text(kind) -> bool:
    from pyarrow import types

    return types.is_string(kind) or types.is_large_string(kind)


def is_struct(kind) -> bool:
    from pyarrow import types

    return types.is_struct(kind)


def is_image(kind) -> bool:
    """{bytes, path} (the hub's Image feature), bytes, or a path."""
    from pyarrow import types

    if types.is_struct(kind):
        return bool({"bytes", "path"} & {kind.field(i).name for i in range(kind.num_fields)})
    return types.is_binary(kind) or types.is_large_binary(kind) or is_text(kind)


def list_of(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def is_list(kind) -> bool:
        from pyarrow import types

        return (types.is_list(kind) or types.is_large_list(kind)) and test(kind.value_type)

    return is_list


TEXT_TYPES = {
    "caption": (is_text, "text"),
    "text": (is_text, "text"),
    "interleaved": (list_of(is_text), "a list of texts"),
    "chat": (list_of(is_struct), "a list of messages"),
}
IMAGE_TYPES = {
    "caption": (is_image, "an image ({bytes, path}, bytes or a path)"),
    "interleaved": (list_of(is_image), "a list of images ({bytes, path}, bytes or paths)"),
    "chat": (lambda kind: is_image(kind) or list_of(is_image)(kind), "an image or a list of them"),
}

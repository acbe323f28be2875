"""Training data: sources -> packed, loss-weighted batches (docs/architecture.md, "Training").

Top to bottom, what `DataLoader.next_batch` does:
1. Mixture: each draw picks a source with probability weight / sum(weights) (a seeded numpy
   Generator) and reads that source's next record (train/readers.py: JSONL lines, webdataset
   shards, parquet rows, LLaVA's JSON). Files are streamed: each source keeps where its next
   record starts; at the end of its data it starts again (its next epoch).
2. Layout: the record -> an Example: the token ids the processor makes for inference and which
   tokens carry loss. Images are read only as far as their headers (their sizes choose MM1.5
   split grids); nothing is decoded yet. Bad examples are counted in `skipped` and passed over
   (or raise a UserError naming file:record with strict=True).
3. Packing: examples fill rows of seq_len + 1 tokens in draw order (inputs = row[:-1],
   targets = row[1:]); one that does not fit starts the next row; the tail is padding. Each
   position is told which example it belongs to, so that the trainer can let every example
   attend only to itself (`attend_across_examples` False, the default).
4. Pixels: every rank lays out the whole global batch (cheap) so all ranks agree on it, but
   decodes only the images of its own rows (the expensive part).

Loss rules: an example's tokens carry loss where its format says (caption: the caption; text and
interleaved: all text; chat: the assistant turns, end-of-turn tokens included), then its EOS
when the token before it does. Never on image tokens, tile markers or padding, nor on an
example's first token (it would be predicted from an unrelated example's end).
"""

import collections
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from mm1_mlx.boxes import COORDINATE_MAX
from mm1_mlx.errors import UserError
from mm1_mlx.processor import (
    ImageBytes,
    Processor,
    common_prefix_length,
    load_image,
    read_image_size,
)
from mm1_mlx.splitting import Grid, num_tiles
from mm1_mlx.train.box_attention import BoxFinder, BoxQueries
from mm1_mlx.train.readers import make_reader
from mm1_mlx.train.sources import Record, Skip, SourceConfig, check_source

LOSS_WEIGHTINGS = ("token", "example", "turn")
Box = tuple[int, int, int, int]
CHAT_ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass
class Batch:
    """This rank's rows of a global batch. Position i of a row predicts targets[i]."""

    input_ids: np.ndarray  # int32 [rows, seq_len]
    targets: np.ndarray  # int32 [rows, seq_len]: the next token of each position
    weights: np.ndarray  # float32 [rows, seq_len]: loss weight of each target, 0 for none
    pixels: np.ndarray | None  # float32 [tiles, S, S, 3], in the order of the image tokens
    lengths: np.ndarray  # int32 [rows]: the positions of each row before its padding
    # int32 [rows, seq_len]: which of its row's packed examples each position belongs to
    # (padding: one past the last), or None where examples may attend to each other.
    example_ids: np.ndarray | None = None
    boxes: BoxQueries | None = None  # the boxes asked for or about, where the loader looks

    @property
    def token_mask(self) -> np.ndarray:
        """bool [rows, seq_len]: True on real tokens, False on padding."""
        return np.arange(self.input_ids.shape[1])[None, :] < self.lengths[:, None]


# -- examples -------------------------------------------------------------------------------


@dataclass
class Example:
    """One record as the model sees it."""

    tokens: list[int]  # ends with EOS
    trained: list[bool]  # per token: whether predicting it carries loss
    images: list[Path | ImageBytes]  # in the order of their image tokens
    grids: list[Grid]  # each image's tile grid (processor.WHOLE_IMAGE: not split)
    sizes: list[tuple[int, int]]  # each image's (width, height)
    source: int  # index into DataLoader.sources
    record: Record  # where it was read: origin, epoch, position
    # Per phrase box of its chat answers: the phrase's tokens [first, end) and its box (0..1000
    # coordinates of the last image before it).
    phrases: list[tuple[int, int, Box]] = field(default_factory=list)


@dataclass
class Rendered:
    """An example as text: growing prefixes, the last one the whole text. The tokens a prefix
    adds to the previous one carry loss when its flag is set. Prefixes rather than pieces,
    because a chat template renders a conversation as a whole."""

    prefixes: list[tuple[str, bool]]
    images: list[str]  # the files of its `<image>` markers, in order
    # Per phrase box: the text up to the phrase's start, up to its end, and its box.
    phrases: list[tuple[str, str, Box]] = field(default_factory=list)


def field_of(record: dict[str, Any], name: str, kind: type) -> Any:
    value = record.get(name)
    if not isinstance(value, kind) or not value:
        raise Skip("invalid record", f"needs a non-empty {kind.__name__} {name!r}")
    return value


def render_caption(record: dict[str, Any], processor: Processor) -> Rendered:
    image, caption = field_of(record, "image", str), field_of(record, "text", str)
    marker = processor.image_token
    return Rendered([(marker, False), (marker + caption, True)], [image])


def render_text(record: dict[str, Any], processor: Processor) -> Rendered:
    return Rendered([(field_of(record, "text", str), True)], [])


def render_interleaved(record: dict[str, Any], processor: Processor) -> Rendered:
    """Text and image parts joined as they are (the data carries its own spaces)."""
    text, prefixes, images = "", [], []
    for part in field_of(record, "content", list):
        keys = set(part) & {"text", "image"} if isinstance(part, dict) else set()
        if keys == {"text"} and isinstance(part["text"], str):
            text += part["text"]
            prefixes.append((text, True))
        elif keys == {"image"} and isinstance(part["image"], str):
            text += processor.image_token
            prefixes.append((text, False))
            images.append(part["image"])
        else:
            raise Skip(
                "invalid record", f"a content part is {{text}} or {{image}}, not {part!r:.60}"
            )
    return Rendered(prefixes, images)


def render_chat(record: dict[str, Any], processor: Processor) -> Rendered:
    """The conversation through the chat template. An assistant turn is what rendering the
    conversation up to it adds to rendering the turns before it with the generation prompt;
    a phrase of it is what the prompt and the answer's text up to the phrase's end add."""
    messages, images = chat_messages(record)
    phrase_boxes = [message_phrase_boxes(message) for message in messages]
    messages = [without_boxes(message) for message in messages]
    conversation, ordered_images = processor.flatten_messages(messages, images)
    if not all(isinstance(image, str) for image in ordered_images):
        raise Skip("invalid record", "images are file names")
    check_turns(conversation)
    prefixes, phrases = [], []
    for k, message in enumerate(conversation):
        if message["role"] == "assistant":
            prompt = processor.render(conversation[:k], True)
            turn = processor.render(conversation[: k + 1], False)
            prefixes += [(prompt, False), (turn, True)]
            phrases += placed_phrases(prompt, turn, messages[k]["content"], phrase_boxes[k])
    prefixes.append((processor.render(conversation, False), False))
    return Rendered(prefixes, ordered_images, phrases)


def placed_phrases(
    prompt: str, turn: str, content: str, boxes: list[tuple[tuple[int, int], Box]]
) -> list[tuple[str, str, Box]]:
    """Per phrase box, the rendered text up to the phrase's start and up to its end: the
    answer is where the chat template put it in `turn`, past the generation `prompt` (and
    whatever the template writes between, such as a space)."""
    if not boxes:
        return []
    at = turn.find(content, common_prefix_length(prompt, turn))
    if at < 0:
        raise Skip("invalid record", "the chat template rewrites an answer that has phrase boxes")
    return [(turn[: at + start], turn[: at + end], box) for (start, end), box in boxes]


def message_phrase_boxes(message: Any) -> list[tuple[tuple[int, int], Box]]:
    """An assistant message's `boxes`: [{"span": [start, end], "box": [x1, y1, x2, y2]}], a
    phrase of its content (character offsets) and where the thing it names lies (0..1000
    coordinates of the last image before it), as phrase-grounding data annotates answers."""
    if not isinstance(message, dict) or "boxes" not in message:
        return []
    content, boxes = message.get("content"), message["boxes"]
    if message.get("role") != "assistant" or not isinstance(content, str):
        raise Skip("invalid record", "only an assistant message with text content has boxes")
    if not isinstance(boxes, list):
        raise Skip("invalid record", f"a message's boxes are a list, not {boxes!r:.60}")
    found = []
    for item in boxes:
        if not (isinstance(item, dict) and set(item) == {"span", "box"}):
            raise Skip("invalid record", f"a phrase box is {{span, box}}, not {item!r:.60}")
        span, box = item["span"], item["box"]
        if not (integers(span, 2) and 0 <= span[0] < span[1] <= len(content)):
            raise Skip(
                "invalid record", f"a phrase span is [start, end] of the content: {span!r:.40}"
            )
        if not (integers(box, 4) and is_box(box)):
            raise Skip(
                "invalid record", f"a phrase box is [x1, y1, x2, y2] in 0..1000: {box!r:.60}"
            )
        found.append(((span[0], span[1]), tuple(box)))
    return found


def without_boxes(message: Any) -> Any:
    if not isinstance(message, dict):
        return message  # flatten_messages says what is wrong with it
    return {key: value for key, value in message.items() if key != "boxes"}


def is_box(box: list[int]) -> bool:
    x1, y1, x2, y2 = box
    return 0 <= x1 < x2 <= COORDINATE_MAX and 0 <= y1 < y2 <= COORDINATE_MAX


def integers(value: Any, count: int) -> bool:
    """Whether `value` is a list of `count` integers (JSON's true and false are not)."""
    return (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def check_turns(conversation: list[dict[str, Any]]) -> None:
    """Roles are the chat template's three, and the first turn past the system's is the
    user's: an assistant turn answers a prompt (with none, there is nothing to render it
    after)."""
    for message in conversation:
        if message["role"] not in CHAT_ROLES:
            roles = ", ".join(CHAT_ROLES)
            raise Skip("invalid record", f"a role is one of {roles}, not {message['role']!r:.40}")
    turns = [message["role"] for message in conversation if message["role"] != "system"]
    if turns[:1] != ["user"]:
        raise Skip(
            "invalid record", "the conversation starts with a user turn (after any system turn)"
        )


def chat_messages(record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """`messages` with `images`, or LLaVA's `conversations` with `image`."""
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list):
        raise Skip("invalid record", "'images' is a list of file names")
    if "messages" in record:
        return field_of(record, "messages", list), images
    turns = field_of(record, "conversations", list)
    if not all(isinstance(t, dict) and t.get("from") in LLAVA_ROLES for t in turns):
        raise Skip("invalid record", f"conversation turns need 'from' in {list(LLAVA_ROLES)}")
    return [llava_message(turn) for turn in turns], images


def llava_message(turn: dict[str, Any]) -> dict[str, Any]:
    """A LLaVA turn as a chat message: its phrase boxes travel with it, other extra keys
    (datasets add their own) are dropped."""
    message = {"role": LLAVA_ROLES[turn["from"]], "content": turn.get("value")}
    if "boxes" in turn:
        message["boxes"] = turn["boxes"]
    return message


RENDERERS: dict[str, Callable[[dict[str, Any], Processor], Rendered]] = {
    "caption": render_caption,
    "interleaved": render_interleaved,
    "text": render_text,
    "chat": render_chat,
}


def tokens_and_loss(
    processor: Processor, rendered: Rendered, grids: list[Grid]
) -> tuple[list[int], list[bool], list[tuple[int, int, Box]]]:
    """The whole text's tokens, which carry loss, and each phrase box's tokens [first, end):
    a prefix's new tokens are those past where its own tokens stop agreeing with the whole's
    (a BPE merge across the boundary moves the boundary, it cannot misplace it)."""
    marker = processor.image_token

    @cache
    def ids(text: str) -> tuple[int, ...]:
        return tuple(processor.layout_ids(text, grids[: text.count(marker)]))

    tokens = list(ids(rendered.prefixes[-1][0]))
    trained = [False] * len(tokens)
    start = common_prefix_length(ids(""), tokens)  # past a BOS the tokenizer adds
    for text, loss in rendered.prefixes:
        end = common_prefix_length(ids(text), tokens)
        for i in range(start, end):
            trained[i] = loss
        start = end
    phrases = []
    for before, through, box in rendered.phrases:
        first = common_prefix_length(ids(before), tokens)
        end = common_prefix_length(ids(through), tokens)
        if first < end:
            phrases.append((first, end, box))
    return tokens, trained, phrases


def image_size(image: Path | ImageBytes) -> tuple[int, int]:
    """Its (width, height) from its header, or Skip: a missing file, or a corrupt image."""
    try:
        exists = isinstance(image, ImageBytes) or image.is_file()
    except OSError as error:  # a name too long for the file system, say
        raise Skip("missing image", f"{image}: {error.strerror}") from None
    if not exists:
        raise Skip("missing image", f"{image}: no such image file")
    try:
        return read_image_size(image)
    except UserError as error:
        raise Skip("corrupt image", str(error)) from None


# -- packing --------------------------------------------------------------------------------


@dataclass
class Row:
    """A packed sequence of seq_len + 1 tokens (once padded) and where its examples lie."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # per token: loss weight of predicting it
    examples: list[tuple[int, Example]] = field(default_factory=list)  # (start, example)

    @property
    def num_images(self) -> int:
        return sum(len(example.images) for _, example in self.examples)

    def add(self, example: Example, weights: list[float]) -> None:
        self.examples.append((len(self.tokens), example))
        self.tokens += example.tokens
        self.weights += weights


class DataLoader:
    """Batches of packed sequences from a weighted mixture of data sources (module docstring).

    Every rank builds the same global batch of `batch_size` rows and returns its slice
    [rank * B / W, (rank + 1) * B / W), so the data does not depend on `world_size`.
    """

    def __init__(
        self,
        sources: list[SourceConfig],
        processor: Processor,
        seq_len: int,
        batch_size: int,
        max_images_per_sequence: int = 16,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        strict: bool = False,
        loss_weighting: str = "token",
        split_images: bool | None = None,
        attend_across_examples: bool = False,
        box_finder: BoxFinder | None = None,
    ):
        check_settings(sources, seq_len, batch_size, rank, world_size, loss_weighting)
        self.sources = sources
        self.processor = processor
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.max_images = max_images_per_sequence
        self.rank, self.world_size = rank, world_size
        self.strict = strict
        self.loss_weighting = loss_weighting
        self.split_images = split_images
        self.attend_across_examples = attend_across_examples
        self.box_finder = box_finder
        weights = np.array([source.weight for source in sources], np.float64)
        self.probabilities = weights / weights.sum()
        self.rng = np.random.default_rng(seed)
        self.readers = [make_reader(source, [seed, i]) for i, source in enumerate(sources)]
        self.pending: Example | None = None  # drawn but did not fit the last row: starts the next
        self.skipped: collections.Counter = collections.Counter()
        self.first_skips: dict[str, str] = {}  # reason -> "file:record: detail" of its first
        tokenizer = processor.tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = self.eos_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id

    # -- batches --

    def next_batch(self) -> Batch:
        rows = [self.pack_row() for _ in range(self.batch_size)]
        per_rank = self.batch_size // self.world_size
        mine = rows[self.rank * per_rank : (self.rank + 1) * per_rank]
        tiles = [tile for row in mine for tile in self.row_tiles(row)]  # zeroes corrupt examples
        lengths = np.array([min(len(row.tokens), self.seq_len) for row in mine], np.int32)
        example_ids = None if self.attend_across_examples else self.example_ids(mine)
        boxes = None if self.box_finder is None else self.box_finder(mine, self.seq_len)
        for row in mine:  # pad to seq_len + 1
            padding = self.seq_len + 1 - len(row.tokens)
            row.tokens += [self.pad_id] * padding
            row.weights += [0.0] * padding
        tokens = np.array([row.tokens for row in mine], np.int32)
        return Batch(
            input_ids=tokens[:, :-1],
            targets=tokens[:, 1:],
            weights=np.array([row.weights[1:] for row in mine], np.float32),
            pixels=np.stack(tiles) if tiles else None,
            lengths=lengths,
            example_ids=example_ids,
            boxes=boxes,
        )

    def example_ids(self, rows: list[Row]) -> np.ndarray:
        """int32 [rows, seq_len]: the index of the packed example at each input position."""
        ids = np.empty((len(rows), self.seq_len), np.int32)
        for index, row in enumerate(rows):
            starts = [start for start, _ in row.examples]
            ids[index] = np.searchsorted(starts, np.arange(self.seq_len), side="right") - 1
            ids[index, len(row.tokens) :] = len(starts)
        return ids

    def read_through(self) -> bool:
        """Whether a source has reached the end of its data and started it again."""
        return any(reader.epoch > 0 for reader in self.readers)

    def pack_row(self) -> Row:
        """Examples in draw order until the next one does not fit (it starts the next row)."""
        row = Row()
        while True:
            example = self.pending or self.draw_example()
            self.pending = None
            if row.examples and not self.fits(row, example):
                self.pending = example
                return row
            row.add(example, self.loss_weights(example))

    def fits(self, row: Row, example: Example) -> bool:
        tokens = len(row.tokens) + len(example.tokens)
        images = row.num_images + len(example.images)
        return tokens <= self.seq_len + 1 and images <= self.max_images

    def loss_weights(self, example: Example) -> list[float]:
        """Per token: with "token" weighting 1 where trained; with "example" the example's
        trained tokens share 1, so a short answer counts as much as a long one (all the turns
        of a chat share it: a conversation is one example); with "turn" each run of trained
        tokens (a chat's assistant turn) shares 1, so every answer counts the same."""
        if self.loss_weighting == "token":
            return [float(trained) for trained in example.trained]
        if self.loss_weighting == "example":
            spans = [example.trained]
        else:
            spans = [list(run) for _, run in itertools.groupby(example.trained)]
        weights = []
        for span in spans:
            share = 1.0 / max(sum(span), 1)
            weights += [share if trained else 0.0 for trained in span]
        return weights

    def row_tiles(self, row: Row) -> list[np.ndarray]:
        """Decode the row's images. An image that turns out corrupt only now gets zero tiles and
        its example zero loss, decided here alone, so other ranks need not know."""
        tiles = []
        for start, example in row.examples:
            try:
                tiles += self.example_tiles(example)
            except UserError as error:
                self.skip(example.record, Skip("corrupt image", str(error)))
                row.weights[start : start + len(example.tokens)] = [0.0] * len(example.tokens)
                size = self.processor.config.preprocess_config.image_size
                count = sum(num_tiles(grid) for grid in example.grids)
                tiles += [np.zeros((size, size, 3), np.float32)] * count
        return tiles

    def example_tiles(self, example: Example) -> list[np.ndarray]:
        """Tiles for the grids chosen at layout time, so they always match the tokens."""
        tiles = []
        for path, grid in zip(example.images, example.grids, strict=True):
            tiles += self.processor.image_tiles(load_image(path), grid)[0]
        return tiles

    # -- examples --

    def draw_example(self) -> Example:
        """The next usable example of the mixture; bad ones are counted and passed over."""
        while True:
            index = int(self.rng.choice(len(self.readers), p=self.probabilities))
            reader = self.readers[index]
            record = reader.next_record(self.skipped_summary)
            try:
                example = self.lay_out(index, record)
            except Skip as skip:
                self.skip(record, skip)
                continue
            reader.used_in_epoch += 1
            return example

    def lay_out(self, source: int, record: Record) -> Example:
        """A record -> an Example, or Skip."""
        if isinstance(record.value, Skip):
            raise record.value
        try:
            rendered = RENDERERS[self.sources[source].format](record.value, self.processor)
            if len(rendered.images) > self.max_images:
                count = len(rendered.images)
                raise Skip("too many images", f"{count} images, over {self.max_images}")
            images = [record.image(name) for name in rendered.images]
            sizes = [image_size(image) for image in images]
            grids = self.processor.image_grids(sizes, split=self.split_images)
            tokens, trained, phrases = tokens_and_loss(self.processor, rendered, grids)
        except UserError as error:  # from the processor: markers, messages, chat template
            raise Skip("invalid record", str(error)) from None
        if tokens[-1:] != [self.eos_id]:
            tokens.append(self.eos_id)
            trained.append(bool(trained) and trained[-1])
        trained[0] = False
        if len(tokens) > self.seq_len + 1:
            raise Skip("too long", f"{len(tokens)} tokens, over seq_len + 1 = {self.seq_len + 1}")
        if not any(trained):
            raise Skip("nothing to train on", "no tokens carry loss")
        return Example(tokens, trained, images, grids, sizes, source, record, phrases)

    def skip(self, record: Record, skip: Skip) -> None:
        if self.strict:
            raise UserError(f"{record.origin}: {skip}")
        if record.epoch > 0:  # later epochs meet the same bad records again
            return
        self.skipped[skip.reason] += 1
        self.first_skips.setdefault(skip.reason, f"{record.origin}: {skip}")

    def skipped_summary(self) -> str:
        """E.g. "skipped 3 examples: 2 missing image (first: a.jsonl:4: ...), 1 too long (...)"."""
        total = sum(self.skipped.values())
        if not total:
            return "skipped no examples"
        reasons = ", ".join(
            f"{count} {reason} (first: {self.first_skips[reason]})"
            for reason, count in self.skipped.most_common()
        )
        return f"skipped {total} example{'s' * (total != 1)}: {reasons}"

    # -- resuming --

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume exactly: the mixture's RNG, each source's position, the example
        carried into the next row (as its record's position: it is laid out again) and the
        skip counts. JSON-serialisable."""
        pending = None
        if self.pending is not None:
            pending = [self.pending.source, *self.pending.record.position]
        return {
            "rng": self.rng.bit_generator.state,
            "sources": [reader.state_dict() for reader in self.readers],
            "pending": pending,
            "skipped": dict(self.skipped),
            "first_skips": dict(self.first_skips),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.readers):
            raise UserError(
                f"the data state has {len(state['sources'])} sources, the loader "
                f"{len(self.readers)}"
            )
        for reader, reader_state in zip(self.readers, state["sources"], strict=True):
            reader.load_state_dict(reader_state)
        self.rng.bit_generator.state = state["rng"]
        self.skipped = collections.Counter(state["skipped"])
        self.first_skips = dict(state["first_skips"])
        self.pending = None
        if state["pending"] is not None:
            source, *position = state["pending"]
            self.pending = self.reread(source, position)

    def reread(self, source: int, position: list) -> Example:
        record = self.readers[source].reread(position)
        try:
            return self.lay_out(source, record)
        except Skip as skip:
            raise UserError(f"{record.origin} changed since the checkpoint: {skip}") from None


def check_settings(
    sources: list[SourceConfig],
    seq_len: int,
    batch_size: int,
    rank: int,
    world_size: int,
    loss_weighting: str,
) -> None:
    if not sources:
        raise UserError("no data sources")
    for source in sources:
        if source.format not in RENDERERS:
            raise UserError(
                f"{source.path}: unknown format {source.format!r} ({', '.join(RENDERERS)})"
            )
        check_source(source)
        if not source.weight >= 0:
            raise UserError(f"{source.path}: weight must be >= 0, not {source.weight}")
    total = sum(source.weight for source in sources)
    if total <= 0:
        raise UserError("the data sources' weights add up to 0")
    if not np.isfinite(total):  # each source is drawn with weight / total
        raise UserError(f"the data sources' weights add up to {total}; scale them down")
    if seq_len < 1 or batch_size < 1:
        raise UserError(f"seq_len and batch_size must be positive, not {seq_len} and {batch_size}")
    if not 0 <= rank < world_size or batch_size % world_size:
        raise UserError(
            f"batch size {batch_size} must split evenly over {world_size} ranks (rank {rank})"
        )
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise UserError(f"loss_weighting is {' or '.join(LOSS_WEIGHTINGS)}, not {loss_weighting!r}")

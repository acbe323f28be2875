"""Attention on the thing a box answer names: `[train] box_attention = WEIGHT`.

A grounded answer `[x1, y1, x2, y2]` (MM1.5's 0..1000 coordinates of its image) starts at its
"[": the output there is x1, which only the picture can give, so the decoder has to find the
thing the question names among the image tokens. A decoder that grounds has a head that looks
at the named thing from the question's name words; training runs in which none forms write
boxes barely conditioned on the picture (train/recipes/demo/README.md). This loss asks one
head (`box_attention_head = [layer, head]`) to be that head: at every position that asks for
a box whose answer carries loss (from the end of what came before, the image or the previous
answer, through the question to the answer's "["), its attention should fall on the image
tokens whose cells lie inside the box. A box in a question ("What is at [x1, y1, x2, y2]?",
MM1.5's referring) is the mirror case: the positions from its "]" to its answer's last token
must read what lies there, and attend to the same tokens. A phrase box of an answer (a chat
message's `boxes`: a span of its text and the box of the thing it names) asks the same of the
positions that write the phrase, the separator before it included: in a list ("a red circle
and a blue square") each item looks at its own thing, which is how a decoder can keep its
place instead of naming one thing twice. Each position adds -log(attention inside the box); a
box's positions share one weight, and the boxes of a micro-batch are averaged and scaled by
WEIGHT. Positions that cannot know the name yet ("Where is the") can only learn to look at
things in general; those after the name can find it. The targets come from the boxes in the
text and the phrase boxes, so any grounding, referring or phrase-grounded conversations in
this format supervise it (not captions, whose boxes follow one another in one trained run).
"""

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mm1_mlx.boxes import COORDINATE_MAX
from mm1_mlx.cells import cell_centres
from mm1_mlx.processor import Processor
from mm1_mlx.splitting import num_tiles
from mm1_mlx.train.coordinates import bracket_effects, token_texts

# The text after a "[" that makes it a box (checked to be one: within 0..1000, not empty).
BOX = re.compile(r"\s*(\d{1,4})\s*,\s*(\d{1,4})\s*,\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\]")
BOX_TOKENS = 32  # "[" and a box, even spelt one character per token (4 x 4 digits, ", ", "]")


@dataclass
class BoxQueries:
    """A micro-batch's boxes: each position that asks for or about one, and its targets."""

    rows: np.ndarray  # int32 [Q]: the row of each query
    positions: np.ndarray  # int32 [Q]: its input position
    inside: np.ndarray  # bool [Q, seq_len]: the row's image tokens whose cells lie in the box
    weights: np.ndarray  # float32 [Q]: each box's queries share 1


class BoxFinder:
    """Finds the boxes asked for or about in packed rows (`DataLoader` calls it on each
    micro-batch)."""

    def __init__(self, processor: Processor, brackets: np.ndarray):
        self.processor = processor
        self.brackets = brackets  # per token id: 1 opens a box, 0 closes one (bracket_effects)
        config = processor.config
        self.image_id = config.image_token_id
        self.tokens_per_tile = config.num_image_tokens
        self.side = round(config.num_image_tokens**0.5)

    @classmethod
    def for_tokenizer(cls, processor: Processor, vocab_size: int) -> "BoxFinder":
        return cls(processor, bracket_effects(token_texts(processor.tokenizer, vocab_size)))

    def __call__(self, rows: Sequence[Any], seq_len: int) -> BoxQueries:
        """`rows`: the loader's packed rows (tokens, per-token loss weights, examples)."""
        found = [
            (index, position, cells, 1 / len(span))
            for index, row in enumerate(rows)
            for start, example in row.examples
            for span, cells in self.example_boxes(row, start, example)
            for position in span
        ]
        inside = np.zeros((len(found), seq_len), bool)
        for k, (_, _, cells, _) in enumerate(found):
            inside[k, cells] = True
        return BoxQueries(
            rows=np.array([index for index, *_ in found], np.int32),
            positions=np.array([position for _, position, *_ in found], np.int32),
            inside=inside,
            weights=np.array([weight for *_, weight in found], np.float32),
        )

    def example_boxes(self, row: Any, start: int, example: Any):
        """(the row positions that ask for or about a box, the row positions of the image
        tokens inside it), for each box of the example: a box answer that carries loss, a box
        in a question that a trained answer follows, or a trained phrase box."""
        has_brackets = np.any(self.brackets[example.tokens] == 1)
        if not has_brackets and not example.phrases:  # most examples: no box to place
            return
        images = self.image_cells(start, example)
        yield from self.phrase_boxes(row, start, example, images)
        if has_brackets:
            yield from self.bracket_boxes(row, start, example, images)

    def bracket_boxes(self, row: Any, start: int, example: Any, images: list):
        """Per box written in the example's text: a trained answer's (asked for) or a
        question's (asked about)."""
        end = start + len(example.tokens)
        for position in range(start, end - 1):
            if self.brackets[row.tokens[position]] != 1:
                continue
            before = [image for image in images if image[0][0] < position]
            match = self.box_after(row.tokens[position : position + BOX_TOKENS])
            cells = None if match is None else self.cells_inside(match.groups(), before)
            if cells is None:
                continue
            if row.weights[position + 1]:
                span = self.asking(row.weights, row.tokens, start, position)
            else:
                span = self.answering(row.weights, row.tokens, position, end)
            if len(span):
                yield span, cells

    def phrase_boxes(self, row: Any, start: int, example: Any, images: list):
        """Per trained phrase box: the positions that predict the phrase's tokens (the first
        of them the separator before it, which must already know what comes next) and the
        image tokens inside its box."""
        for first, end, box in example.phrases:
            first, end = start + first, start + end
            before = [image for image in images if image[0][0] < first]
            cells = self.cells_inside(box, before)
            if cells is not None and any(row.weights[first:end]):
                yield range(first - 1, end - 1), cells

    def cells_inside(self, box: Sequence, images: list) -> np.ndarray | None:
        """The row positions of the image tokens inside `box` (0..1000 coordinates) in the
        last of `images`; None when it is no box or no cell lies in it."""
        box = np.array([int(value) for value in box])
        if not images or np.any(box > COORDINATE_MAX) or box[0] >= box[2] or box[1] >= box[3]:
            return None
        positions, centres, size = images[-1]
        left, top, right, bottom = box / COORDINATE_MAX * np.array([*size, *size])
        x, y = centres[:, 0], centres[:, 1]
        cells = positions[(left <= x) & (x <= right) & (top <= y) & (y <= bottom)]
        return cells if len(cells) else None

    def asking(self, weights: list[float], tokens: list[int], start: int, bracket: int) -> range:
        """The positions from the question to the box's "[": back past the answer's trained
        tokens before the "[", then past the untrained ones (the question, the template) to
        the previous answer, an image token or the example's start."""
        first = bracket
        while first > start and weights[first - 1]:
            first -= 1
        while first > start and not weights[first - 1] and tokens[first - 1] != self.image_id:
            first -= 1
        return range(first, bracket + 1)

    def answering(self, weights: list[float], tokens: list[int], bracket: int, end: int) -> range:
        """The positions from a question's box to its answer's last token: the box's "]", the
        rest of the question, the template and the answer, each predicting the next token
        (none when no trained answer follows before the example's `end`)."""
        close = bracket + 1
        while close < end - 1 and self.brackets[tokens[close]] != 0:
            close += 1
        answer = close + 1
        while answer < end and not weights[answer]:
            answer += 1
        last = answer
        while last + 1 < end and weights[last + 1]:
            last += 1
        return range(close, last) if answer < end else range(0)

    def box_after(self, tokens: list[int]) -> re.Match | None:
        """The box that follows the last "[" of the first token's text, if one does (the
        token may hold more than the bracket, as " [" does)."""
        opening = self.processor.decode(tokens[:1]).rfind("[")
        return BOX.match(self.processor.decode(tokens)[opening + 1 :])

    def image_cells(self, start: int, example: Any) -> list[tuple[np.ndarray, np.ndarray, Any]]:
        """Per image of the example: its tokens' row positions, their cells' centres in the
        image's pixels, and the image's size."""
        positions = start + np.flatnonzero(np.array(example.tokens) == self.image_id)
        config = self.processor.config.preprocess_config
        images, first = [], 0
        for size, grid in zip(example.sizes, example.grids, strict=True):
            count = num_tiles(grid) * self.tokens_per_tile
            centres = cell_centres(size, grid, config, self.side).reshape(-1, 2)
            images.append((positions[first : first + count], centres, size))
            first += count
        return images


class AttentionInputs:
    """While in use, keeps the queries and keys of each decoder layer's attention (after their
    rotary positions): stands in for the decoder module's scaled_dot_product_attention and
    calls it, so the decoder's output is unchanged."""

    def __init__(self, model: Any):
        self.module = sys.modules[type(model.decoder.layers[0].self_attn).__module__]
        self.seen: list[tuple[mx.array, mx.array, float]] = []  # per layer: queries, keys, scale

    def __enter__(self) -> "AttentionInputs":
        self.original = self.module.scaled_dot_product_attention
        self.module.scaled_dot_product_attention = self.attend
        return self

    def __exit__(self, *exc) -> None:
        self.module.scaled_dot_product_attention = self.original

    def attend(self, queries, keys, values, *args, scale: float, **kwargs):
        self.seen.append((queries, keys, scale))
        return self.original(queries, keys, values, *args, scale=scale, **kwargs)


def box_attention_losses(
    seen: tuple[mx.array, mx.array, float],
    head: int,
    boxes: BoxQueries,
    example_ids: np.ndarray | None,
) -> mx.array:
    """[Q]: -log of the attention that `head` of a layer (its `seen` queries and keys) gives,
    at each box's "[", to the image tokens inside the box. Causal; with `example_ids`, each
    position sees only its own example, as the decoder's mask does."""
    queries, keys, scale = seen
    group = queries.shape[1] // keys.shape[1]  # query heads per key head
    rows, positions = mx.array(boxes.rows), mx.array(boxes.positions)
    query = queries[:, head][rows, positions]  # [Q, D]
    key = keys[:, head // group][rows]  # [Q, L, D]
    scores = (key @ query[:, :, None])[..., 0] * scale
    visible = np.arange(scores.shape[-1])[None] <= boxes.positions[:, None]
    if example_ids is not None:
        own = example_ids[boxes.rows, boxes.positions]
        visible &= example_ids[boxes.rows] == own[:, None]
    scores = mx.where(mx.array(visible), scores, -mx.inf)
    log_weights = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
    return -mx.logsumexp(mx.where(mx.array(boxes.inside), log_weights, -mx.inf), axis=-1)


def mean_box_attention_loss(
    seen: tuple[mx.array, mx.array, float],
    head: int,
    boxes: BoxQueries | None,
    example_ids: np.ndarray | None,
) -> mx.array:
    """The mean of `box_attention_losses` over a micro-batch's boxes; 0 without boxes."""
    if boxes is None or not len(boxes.rows):
        return mx.array(0.0)
    losses = box_attention_losses(seen, head, boxes, example_ids)
    return (losses * mx.array(boxes.weights)).sum() / boxes.weights.sum()

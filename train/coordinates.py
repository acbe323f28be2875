"""Soft targets for box coordinates: `[train] box_smoothing = SIGMA`.

MM1.5 writes a box as text, `[x1, y1, x2, y2]` in 0..1000, and a tokenizer that makes every
integer one token turns each coordinate into a 1001-way choice. With exact targets, an answer
off by 3 is as wrong as one off by 900, so early in training the decoder gets no signal that it
is close, and it settles on a few frequent boxes. As SimCC does for keypoints, a coordinate's
target becomes a Gaussian of width SIGMA (in 0..1000 units) over the numbers around it, spelt
the same way (with or without the leading space). Only numbers inside square brackets count as
coordinates; counts and other numbers keep their exact targets.
"""

import math
import re

import numpy as np

NUMBER = re.compile(r" ?(0|[1-9][0-9]*)")
LARGEST = 1000  # MM1.5's box coordinates run 0..1000


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Each id's text, as the tokenizer decodes it alone ("" past the tokenizer's vocabulary)."""
    size = min(vocab_size, len(tokenizer.get_vocab()))
    return [tokenizer.decode([i]) for i in range(size)] + [""] * (vocab_size - size)


def bracket_effects(texts: list[str]) -> np.ndarray:
    """int8 per token id: what the token does to "inside a box": 1 opens ("[", " ["), 0 closes
    ("]", "]."), -1 neither. A token with both brackets counts by its last one."""
    effects = np.full(len(texts), -1, np.int8)
    for token_id, text in enumerate(texts):
        last = max(text.rfind("["), text.rfind("]"))
        if last >= 0:
            effects[token_id] = text[last] == "["
    return effects


class CoordinateSmoothing:
    """(input_ids, targets) [rows, T] -> (ids, weights) [rows, T, K]: each target as K token
    ids with weights summing to 1. An exact target is [target, ...] with weights [1, 0, ...]."""

    def __init__(self, texts: list[str], sigma: float):
        if sigma <= 0:
            raise ValueError("sigma must be positive")
        radius = max(1, math.ceil(3 * sigma))
        offsets = np.arange(-radius, radius + 1)
        self.bracket = bracket_effects(texts)
        numbers: dict[tuple[bool, int], int] = {}
        for token_id, text in enumerate(texts):
            match = NUMBER.fullmatch(text)
            if match and int(match[1]) <= LARGEST:
                numbers[text.startswith(" "), int(match[1])] = token_id
        # Tables for the number tokens only, row `number_row[id]`; the other tokens point at the
        # spare last row (-1), which the exact targets replace.
        self.number_row = np.full(len(texts), -1, np.int64)
        self.neighbour_ids = np.zeros((len(numbers) + 1, len(offsets)), np.int32)
        self.neighbour_weights = np.zeros((len(numbers) + 1, len(offsets)), np.float32)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        for row, ((spaced, value), token_id) in enumerate(numbers.items()):
            neighbours = [numbers.get((spaced, value + offset)) for offset in offsets]
            present = np.array([n is not None for n in neighbours])
            self.number_row[token_id] = row
            self.neighbour_ids[row] = [token_id if n is None else n for n in neighbours]
            self.neighbour_weights[row] = kernel * present / (kernel * present).sum()
        self.exact = np.zeros(len(offsets), np.float32)
        self.exact[0] = 1.0

    def inside_brackets(self, input_ids: np.ndarray) -> np.ndarray:
        """bool [rows, T]: whether the text up to and including each input token has an open
        square bracket (so the next token, the target, is inside a box)."""
        effect = self.bracket[input_ids]
        positions = np.where(effect >= 0, np.arange(input_ids.shape[1]), -1)
        last = np.maximum.accumulate(positions, axis=1)
        state = np.take_along_axis(effect, np.maximum(last, 0), axis=1)
        return (last >= 0) & (state == 1)

    def __call__(self, input_ids: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = self.number_row[targets]
        soft = (self.inside_brackets(input_ids) & (rows >= 0))[..., None]
        ids = np.where(soft, self.neighbour_ids[rows], targets[..., None])
        weights = np.where(soft, self.neighbour_weights[rows], self.exact)
        return ids.astype(np.int32), weights

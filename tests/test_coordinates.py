"""Soft targets for box coordinates (`[train] box_smoothing`): which targets, what weights, and
the loss they give against numpy."""

import mlx.core as mx
import numpy as np
import pytest
from builders import make_dataset
from transformers import AutoTokenizer

from mm1_mlx.train.coordinates import CoordinateSmoothing, token_texts
from mm1_mlx.train.data import Batch
from mm1_mlx.train.tokenizer import train_tokenizer
from mm1_mlx.train.trainer import loss_sums

# A made-up vocabulary: brackets, words, and the numbers 0..30 with and without a space.
TEXTS = [
    "[",
    "]",
    "].",
    " [",
    ",",
    " at",
    " 2x",
    *map(str, range(31)),
    *(f" {n}" for n in range(31)),
]
ID = {text: k for k, text in enumerate(TEXTS)}


def encode(*texts: str) -> np.ndarray:
    return np.array([[ID[t] for t in texts]])


def soft_targets(smoothing, *texts: str) -> list[dict[str, float]]:
    """Each target of the text (its tokens after the first) as {token text: weight}."""
    tokens = encode(*texts)
    ids, weights = smoothing(tokens[:, :-1], tokens[:, 1:])
    return [
        {TEXTS[i]: float(w) for i, w in zip(row_ids, row_weights, strict=True) if w > 0}
        for row_ids, row_weights in zip(ids[0], weights[0], strict=True)
    ]


def test_numbers_inside_brackets_get_a_gaussian_of_their_own_spelling():
    smoothing = CoordinateSmoothing(TEXTS, sigma=2.0)
    targets = soft_targets(smoothing, " at", " [", "12", ",", " 20", ",", " 30", "]", " 7")
    _, first, _, middle, _, last, _, after = targets
    assert set(first) == {str(n) for n in range(6, 19)}  # 12 +- 3 sigma, no leading space
    weights = np.array([first[str(n)] for n in range(6, 19)])
    expected = np.exp(-0.5 * ((np.arange(6, 19) - 12) / 2.0) ** 2)
    np.testing.assert_allclose(weights, expected / expected.sum(), rtol=1e-6)
    assert set(middle) == {f" {n}" for n in range(14, 27)}
    # cut at the vocabulary's end (here 30; 1000 in a real one) and renormalised
    assert set(last) == {f" {n}" for n in range(24, 31)} and sum(last.values()) == pytest.approx(1)
    assert after == {" 7": 1.0}  # after "]": a count or any other number stays exact


def test_targets_outside_boxes_stay_exact():
    smoothing = CoordinateSmoothing(TEXTS, sigma=2.0)
    # a number before any bracket, after "]." and the tokens of a box that are not numbers
    targets = soft_targets(smoothing, " at", " 3", "[", "4", ",", "].", "5", " 2x")
    assert targets == [
        {" 3": 1.0},
        {"[": 1.0},
        targets[2],
        {",": 1.0},
        {"].": 1.0},
        {"5": 1.0},
        {" 2x": 1.0},
    ]
    assert len(targets[2]) == 11  # "4" inside "[": 4 +- 6 without the part below 0


def test_a_vocabulary_without_numbers_keeps_every_target_exact():
    smoothing = CoordinateSmoothing(["[", "]", " at"], sigma=2.0)
    ids, weights = smoothing(np.array([[0, 2]]), np.array([[2, 1]]))
    assert ids[..., 0].tolist() == [[2, 1]] and weights[..., 0].tolist() == [[1, 1]]
    assert weights[..., 1:].sum() == 0


def test_soft_loss_is_the_cross_entropy_with_the_soft_targets():
    smoothing = CoordinateSmoothing(TEXTS, sigma=1.5)
    tokens = encode(" at", " [", "12", ",", " 20", ",", " 3", ",", " 30", "]", " 7", ",")
    rows = np.concatenate([tokens, tokens[:, ::-1]])
    batch = Batch(
        input_ids=rows[:, :-1].astype(np.int32),
        targets=rows[:, 1:].astype(np.int32),
        weights=np.random.default_rng(0).uniform(0, 2, rows[:, 1:].shape).astype(np.float32),
        pixels=None,
        lengths=np.full(2, rows.shape[1] - 1, np.int32),
    )
    logits = np.random.default_rng(1).normal(size=(*batch.targets.shape, len(TEXTS)))

    def model(input_ids, pixels, cache=None):
        return mx.array(logits.astype(np.float32))

    training, cross_entropy = loss_sums(model, batch, 0.0, smoothing)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids, soft = smoothing(batch.input_ids, batch.targets)
    dense = np.zeros_like(logits)
    for row, position, k in np.ndindex(ids.shape):
        dense[row, position, ids[row, position, k]] += soft[row, position, k]
    expected = (-(dense * log_probs).sum(-1) * batch.weights).sum()
    exact = -np.take_along_axis(log_probs, batch.targets[..., None], -1)[..., 0] * batch.weights
    assert training.item() == pytest.approx(expected, rel=1e-5)
    assert cross_entropy.item() == pytest.approx(exact.sum(), rel=1e-5)  # what is logged
    assert training.item() != pytest.approx(cross_entropy.item(), rel=1e-3)


def test_a_trained_tokenizer_smooths_its_coordinates(tmp_path):
    make_dataset(tmp_path / "data")
    train_tokenizer(sorted((tmp_path / "data").glob("*.jsonl")), tmp_path / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    smoothing = CoordinateSmoothing(token_texts(tokenizer, len(tokenizer) + 3), sigma=4.0)
    tokens = np.array([tokenizer.encode("How many? 3. The box is [480, 37, 999, 1000].")])
    ids, weights = smoothing(tokens[:, :-1], tokens[:, 1:])
    spread = {
        tokenizer.decode([tokens[0, k + 1]]): (weights[0, k] > 0).sum() for k in range(len(ids[0]))
    }
    coordinates = {"480": 25, " 37": 25, " 999": 14, " 1000": 13}  # 3 sigma = 12 each side
    assert {text: spread[text] for text in coordinates} == coordinates
    assert all(n == 1 for text, n in spread.items() if text not in coordinates)
    assert " 3" in spread  # the count before the box is a number, kept exact

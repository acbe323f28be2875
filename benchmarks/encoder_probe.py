"""Linear probes of a model's image tokens: does the encoder see what the questions ask about?

    python benchmarks/encoder_probe.py MODEL [MODEL ...] [--n 300] [--seed 7]

Draws `n` fresh shape scenes and `n` screens (half per renderer), makes the model's own tiles
and image tokens (connector output), and keeps the tokens whose cell centre lies on a thing
(`mm1_mlx.train.dense`: its labels). A ridge classifier on the frozen tokens of the first
three quarters of the scenes is scored on the last quarter, per question: the colour, the kind,
and both, of the shape under a token; the screen's title under a title-bar token; the label
under a button token. Chance is 1/6, 1/3, 1/18, 1/8 and 1/10. The last column is a ridge
regression of the shape's box from the same tokens: the mean error of a coordinate in the
answers' 0..1000 units (a grounded answer must copy it out). "word code", with no probe
trained: the share of all these tokens (shapes, titles, buttons) whose dot products with the
model's own embeddings of the words (" red", " circle", " Send", ...) name every word of their
thing, each among its group's words (`train/dense.py`'s word head; chance 1/18, 1/8, 1/10).
"""

import argparse
import random
import tempfile
from pathlib import Path

import mm1_mlx  # noqa: F401  (first: it loads OpenBLAS, which must precede mlx.core)

# isort: split
import mlx.core as mx
import numpy as np

from mm1_mlx.loading import load
from mm1_mlx.train import synth
from mm1_mlx.train.dense import (
    CLASS_IDS,
    CLASSES,
    SceneImage,
    TileBatcher,
    word_token_ids,
    words_right,
)

RIDGE = 10.0


def draw_scenes(folder: Path, sampler, n: int, seed: int) -> list[SceneImage]:
    rng = random.Random(seed)
    items = []
    for k in range(n):
        scene = sampler(rng)
        path = folder / f"{sampler.__name__}-{k}.png"
        synth.render(scene, synth.STYLES[k % 2], rng).save(path)
        items.append(SceneImage(path, scene))
    return items


def thing_tokens(model, processor, items: list[SceneImage]):
    """(tokens [cells, D], class names [cells], boxes [cells, 4] in 0..1, scene index [cells])
    of the cells on things."""
    batcher = TileBatcher(processor, model.config.num_image_tokens)
    tokens, names, boxes, scene_of = [], [], [], []
    for index, item in enumerate(items):
        pixels, classes, cell_boxes, _ = batcher([item])
        features = np.array(model.connector(model.vision(pixels)))
        classes = np.array(classes)
        keep = classes > 0
        tokens.append(features[keep])
        names += [CLASSES[c] for c in classes[keep]]
        boxes.append(np.array(cell_boxes)[keep])
        scene_of += [index] * int(keep.sum())
    return np.concatenate(tokens), np.array(names), np.concatenate(boxes), np.array(scene_of)


def ridge_fit(tokens: np.ndarray, targets: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Held-out predictions of a ridge regression (with a bias) on standardised tokens."""
    mean, std = tokens[train].mean(0), tokens[train].std(0) + 1e-6
    z = np.concatenate([(tokens - mean) / std, np.ones((len(tokens), 1))], axis=1)
    gram = z[train].T @ z[train] + RIDGE * np.eye(z.shape[1])
    return z[~train] @ np.linalg.solve(gram, z[train].T @ targets[train])


def probe_accuracy(tokens: np.ndarray, labels: np.ndarray, train: np.ndarray) -> float:
    """Held-out accuracy of a one-vs-rest ridge classifier."""
    classes = sorted(set(labels))
    targets = (labels[:, None] == np.array(classes)[None, :]).astype(np.float64)
    predicted = ridge_fit(tokens, targets, train).argmax(1)
    return float((predicted == targets[~train].argmax(1)).mean())


def word_code(model, processor, tokens: np.ndarray, names: np.ndarray) -> float:
    """The share of `tokens` that name their thing's words in the decoder's own embeddings."""
    ids = word_token_ids(processor.tokenizer)
    if ids is None:
        return float("nan")
    table = model.token_embedding.weight
    logits = [mx.array(tokens) @ table[mx.array(group)].T for group in ids]
    classes = mx.array([CLASS_IDS[name] for name in names])
    return float(np.array(words_right(logits, classes)).mean())


def probes(model, processor, shapes, screens) -> dict[str, float]:
    results = {}
    tokens, names, boxes, scene_of = thing_tokens(model, processor, shapes)
    shape_tokens, shape_names = tokens, names
    train = scene_of < 0.75 * len(shapes)
    for question, part in (("colour", 0), ("kind", 1), ("colour+kind", None)):
        labels = names if part is None else np.array([name.split()[part] for name in names])
        results[question] = probe_accuracy(tokens, labels, train)
    box_error = 1000 * np.abs(ridge_fit(tokens, boxes, train) - boxes[~train]).mean()
    tokens, names, _, scene_of = thing_tokens(model, processor, screens)
    train = scene_of < 0.75 * len(screens)
    for question in ("title", "button"):
        rows = np.array([name.startswith(question) for name in names])
        results[question] = probe_accuracy(tokens[rows], names[rows], train[rows])
    results["box error"] = float(box_error)
    all_tokens = np.concatenate([shape_tokens, tokens])
    results["word code"] = word_code(model, processor, all_tokens, np.append(shape_names, names))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--n", type=int, default=300, help="scenes of each kind")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shapes = draw_scenes(Path(tmp), synth.sample_shape_scene, args.n, args.seed)
        screens = draw_scenes(Path(tmp), synth.sample_screen_scene, args.n, args.seed + 1)
        rows = {name: probes(*load(name), shapes, screens) for name in args.models}
    questions = list(next(iter(rows.values())))
    print("| model | " + " | ".join(questions) + " |")
    print("|---|" + "---|" * len(questions))
    for name, result in rows.items():
        cells = [
            f"{result[q]:.0f}" if q == "box error" else f"{100 * result[q]:.1f}%" for q in questions
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

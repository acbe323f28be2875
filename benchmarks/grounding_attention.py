"""Which decoder heads find the shape that a grounding question names.

    python benchmarks/grounding_attention.py [--model M] [--n 60] [--seed 5]

Draws `n` fresh shape scenes (plain renderer) of two or more shapes with different names, asks
"Where is the <colour> <kind>?" about one of them, feeds the question with its true answer and
records every decoder head's attention weights. Prints, per layer and head, at the question's
colour word, at its kind word and at the answer's "[" (the position that writes x1), the share
of the attention on the scene's shapes that falls on the named one (a cell belongs to a shape
when its centre lies in the shape's box). A head that does not look at the name gives the
named shape its share of the shapes' cells, printed below the table.
"""

import argparse
import random
import sys
import tempfile
from pathlib import Path

import mm1_mlx  # noqa: F401  (first: it loads OpenBLAS, which must precede mlx.core)

# isort: split
import mlx.core as mx
import numpy as np

from mm1_mlx.loading import load, model_or_default
from mm1_mlx.train import synth


class AttentionRecorder:
    """Stands in for the decoder module's scaled_dot_product_attention while in use: computes
    the causal attention of one sequence explicitly and keeps each layer's weights."""

    def __init__(self, model):
        self.module = sys.modules[type(model.decoder.layers[0].self_attn).__module__]
        self.weights: list[mx.array] = []  # per layer: [heads, queries, keys]

    def __enter__(self) -> "AttentionRecorder":
        self.original = self.module.scaled_dot_product_attention
        self.module.scaled_dot_product_attention = self.attend
        return self

    def __exit__(self, *exc) -> None:
        self.module.scaled_dot_product_attention = self.original

    def attend(self, queries, keys, values, cache=None, scale=1.0, mask=None, **kwargs):
        scores = (queries * scale) @ keys.transpose(0, 1, 3, 2)
        length = scores.shape[-1]
        weights = mx.softmax(scores + mx.triu(mx.full((length, length), -mx.inf), k=1), axis=-1)
        self.weights.append(weights[0])
        return weights @ values


def cells_in(box: synth.PixelBox, grid: int, size: int) -> np.ndarray:
    """Which of a grid x grid tile's cells (row-major) have their centre inside `box`."""
    centres = (np.arange(grid) + 0.5) * size / grid
    x_in = (box[0] <= centres) & (centres <= box[2])
    y_in = (box[1] <= centres) & (centres <= box[3])
    return (y_in[:, None] & x_in[None, :]).ravel()


def last_position(ids: list[int], word: list[int]) -> int:
    """Where the last token of `word` sits at its last occurrence in `ids`."""
    for start in range(len(ids) - len(word), -1, -1):
        if ids[start : start + len(word)] == word:
            return start + len(word) - 1
    raise ValueError("word not in prompt")


def named_shares(model, processor, scene: synth.ShapeScene, k: int, image: str):
    """([layers, heads, 3]: at the colour word, the kind word and "[", the share of the
    attention on all shapes' cells that falls on shape k; shape k's share of those cells), or
    None where a cell grid cannot tell shape k from the others."""
    shape = scene.shapes[k]
    question = f"Where is the {shape.color} {shape.kind}?"
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": f"{processor.image_token}\n{question}"}], [image]
    )
    ids = list(prompt.input_ids)
    box = synth.where(shape.box, scene)
    answer = processor.tokenizer.encode(f" {box}", add_special_tokens=False)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    image_positions = [i for i, token in enumerate(ids) if token == image_id]
    grid = round(len(image_positions) ** 0.5)
    if grid * grid != len(image_positions):
        raise SystemExit("error: the model's shape scenes are not one square tile of tokens")
    named = cells_in(shape.box, grid, scene.size[0])
    others = [cells_in(s.box, grid, scene.size[0]) for s in scene.shapes if s is not shape]
    others = np.any(others, axis=0) & ~named
    if not named.any() or not others.any():
        return None

    def encoded(word: str) -> list[int]:
        return processor.tokenizer.encode(f" {word}", add_special_tokens=False)

    positions = [last_position(ids, encoded(shape.color)), last_position(ids, encoded(shape.kind))]
    positions.append(len(ids))  # the answer's "[", whose output is x1
    features = model.encode_images(mx.array(prompt.tiles))
    with AttentionRecorder(model) as recorder:
        model(mx.array([ids + answer]), image_features=features)
    shares = []
    for weights in recorder.weights:
        on_image = np.array(weights[:, mx.array(positions)][:, :, mx.array(image_positions)])
        on_named, on_others = on_image[..., named].sum(-1), on_image[..., others].sum(-1)
        shares.append(on_named / (on_named + on_others))
    return np.stack(shares), named.sum() / (named.sum() + others.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the shipped demo model")
    parser.add_argument("--n", type=int, default=60, help="questions")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    if args.n < 1:
        raise SystemExit("error: --n must be at least 1")
    model, processor = load(model_or_default(args.model))
    rng = random.Random(args.seed)
    shares, baselines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        while len(shares) < args.n:
            scene = synth.sample_shape_scene(rng)
            names = {(s.color, s.kind) for s in scene.shapes}
            if len(scene.shapes) < 2 or len(names) < len(scene.shapes):
                continue
            image = str(Path(tmp) / f"{len(shares)}.png")
            synth.render(scene, "plain").save(image)
            measured = named_shares(
                model, processor, scene, rng.randrange(len(scene.shapes)), image
            )
            if measured is not None:
                shares.append(measured[0])
                baselines.append(measured[1])
    mean = np.mean(shares, axis=0)
    print('| layer | head | colour word | kind word | answer\'s "[" |')
    print("|---|---|---|---|---|")
    for layer, heads in enumerate(mean):
        for head, row in enumerate(heads):
            print(f"| {layer} | {head} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    print(f"\nthe named shape's share of the shapes' cells: {np.mean(baselines):.2f}")
    print(f"command: python benchmarks/grounding_attention.py --n {args.n} --seed {args.seed}")


if __name__ == "__main__":
    main()

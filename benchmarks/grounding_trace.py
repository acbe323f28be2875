"""Where a grounded answer loses the box: image tokens, decoder states, the answer itself.

    python benchmarks/grounding_trace.py [--model M] [--n 1000] [--steps 1500] [--seed 2026]

Draws `n` fresh shape scenes (half per renderer) and asks of each "Where is the {colour}
{kind}?" about one of its shapes. Prints the mean error of each coordinate (0..1000 units) on
the last fifth of the scenes, read from three places:

- the image tokens (connector output): one attention layer queried by the shape's name,
  trained here for `steps` steps on the first four fifths (can the box be found at all?);
- the decoder's state at the position that writes the first coordinate, after each layer: a
  ridge regression (does the decoder bring the box there?);
- the model's answer: its most likely number at each coordinate, the true ones before it.

"always the mean box" is the error of knowing nothing about the picture.
"""

import argparse
import random

import mm1_mlx  # noqa: F401  (first: it loads OpenBLAS, which must precede mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from encoder_probe import ridge_fit  # the same ridge, on the tokens there
from mlx_lm.models.base import create_attention_mask

from mm1_mlx.loading import load, model_or_default
from mm1_mlx.train import synth
from mm1_mlx.train.tokenizer import number_token_ids

HELD_OUT = 0.2


class NameQueriedAttention(nn.Module):
    """One attention layer over image tokens whose query is the named shape's (kind, colour),
    then an MLP to its four coordinates in 0..1."""

    def __init__(self, dims: int, width: int = 128):
        super().__init__()
        self.kind = nn.Embedding(len(synth.KINDS), width)
        self.colour = nn.Embedding(len(synth.COLORS), width)
        self.norm = nn.LayerNorm(dims)
        self.to_key = nn.Linear(dims, width)
        self.to_value = nn.Linear(dims, width)
        self.out = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))

    def __call__(self, tokens: mx.array, names: mx.array) -> mx.array:
        tokens = self.norm(tokens)
        query = self.kind(names[:, 0]) + self.colour(names[:, 1])
        scores = (self.to_key(tokens) @ query[:, :, None])[..., 0] / query.shape[-1] ** 0.5
        attention = mx.softmax(scores, axis=-1)
        return self.out((attention[..., None] * self.to_value(tokens)).sum(1))


def token_probe_error(tokens, names, boxes, train: int, steps: int, seed: int) -> np.ndarray:
    mx.random.seed(seed)
    probe = NameQueriedAttention(tokens.shape[-1])
    optimizer = optim.Adam(learning_rate=1e-3)
    targets = mx.array(boxes / 1000)
    tokens, names = mx.array(tokens), mx.array(names)

    def loss(probe, batch):
        return mx.abs(probe(tokens[batch], names[batch]) - targets[batch]).mean()

    loss_and_grad = nn.value_and_grad(probe, loss)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        _, grads = loss_and_grad(probe, mx.array(rng.integers(0, train, 64)))
        optimizer.update(probe, grads)
        mx.eval(probe.parameters(), optimizer.state)
    guess = np.array(probe(tokens[train:], names[train:])) * 1000
    return np.abs(guess - boxes[train:]).mean(0)


def trace(model, processor, scene: synth.ShapeScene, shape: synth.Shape, image):
    """(image tokens, the decoder's state after each layer at the first coordinate's position,
    the logits at the four coordinates with the true answer before each)."""
    question = f"{synth.IMAGE}\nWhere is the {shape.color} {shape.kind}?"
    prompt = processor.apply_chat_template([{"role": "user", "content": question}], [image])
    # As in training, the answer follows "Assistant:" after a space (" [" is one token).
    answer = " " + synth.where(shape.box, scene)
    ids = mx.array([list(prompt.input_ids) + tokenize(processor, answer)])
    first = len(prompt.input_ids)  # the position of " [", which predicts the first number
    tokens = model.encode_images(mx.array(prompt.tiles))
    hidden = model.embed(ids, image_features=tokens)
    mask = create_attention_mask(hidden, None)
    states = []
    for layer in model.decoder.model.layers:
        hidden = layer(hidden, mask, cache=None)
        states.append(hidden[0, first])
    logits = model(ids, image_features=tokens)[0]
    mx.eval(tokens, states, logits)
    rows = [first + 2 * k for k in range(4)]  # " [" x1 "," " y1" ...: a number every second
    return np.array(tokens[0]), np.stack([np.array(s) for s in states]), logits[rows]


def tokenize(processor, text: str) -> list[int]:
    return processor.tokenizer.encode(text, add_special_tokens=False)


def most_likely_numbers(logits: mx.array, numbers: tuple[list[int], list[int]]) -> list[int]:
    """The most likely value at each coordinate: the first follows " [" directly (a number
    without a space), the others a space."""
    plain, spaced = numbers
    tables = [plain, spaced, spaced, spaced]
    return [int(mx.argmax(logits[k][mx.array(table)]).item()) for k, table in enumerate(tables)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the shipped demo model")
    parser.add_argument("--n", type=int, default=1000, help="shape scenes")
    parser.add_argument("--steps", type=int, default=1500, help="the token probe's steps")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    model, processor = load(model_or_default(args.model))
    numbers = number_token_ids(processor.tokenizer)
    if numbers is None:
        raise SystemExit("error: the model's tokenizer has no token per number 0..1000")
    rng = random.Random(args.seed)
    tokens, states, names, boxes, answers = [], [], [], [], []
    for k in range(args.n):
        scene = synth.sample_shape_scene(rng)
        shape = rng.choice(scene.shapes)
        image = synth.render(scene, synth.STYLES[k % 2], rng)
        image_tokens, layer_states, logits = trace(model, processor, scene, shape, image)
        tokens.append(image_tokens)
        states.append(layer_states)
        names.append((list(synth.KINDS).index(shape.kind), list(synth.COLORS).index(shape.color)))
        boxes.append([int(v) for v in synth.where(shape.box, scene).strip("[]").split(",")])
        answers.append(most_likely_numbers(logits, numbers))
    boxes, answers, states = np.array(boxes, float), np.array(answers, float), np.stack(states)
    train = int(args.n * (1 - HELD_OUT))
    rows = [("always the mean box", np.abs(boxes[train:] - boxes[:train].mean(0)).mean(0))]
    token_error = token_probe_error(
        np.stack(tokens), np.array(names), boxes, train, args.steps, args.seed
    )
    rows.append(("image tokens: one attention layer queried by the name", token_error))
    held_out = np.arange(args.n) >= train
    for layer in range(states.shape[1]):
        error = np.abs(ridge_fit(states[:, layer], boxes, ~held_out) - boxes[held_out]).mean(0)
        rows.append((f"decoder state at the first coordinate, after layer {layer + 1}", error))
    rows.append(("the model's answer (true coordinates before each)", np.abs(
        answers[train:] - boxes[train:]).mean(0)))  # fmt: skip
    print(f"| read from ({args.n - train} held-out scenes) | x1 | y1 | x2 | y2 |")
    print("|---|---|---|---|---|")
    for name, error in rows:
        print(f"| {name} | {' | '.join(f'{e:.0f}' for e in error)} |")
    print(f"\ncommand: python benchmarks/grounding_trace.py --n {args.n} --steps {args.steps} "
          f"--seed {args.seed}")  # fmt: skip


if __name__ == "__main__":
    main()

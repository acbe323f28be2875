"""Which decoder heads find the thing that a grounding question names.

    python benchmarks/grounding_attention.py [--model M] [--n 60] [--seed 5]

Draws `n` fresh shape scenes of two or more shapes and `n` fresh screens of two or more
buttons (plain renderer), asks "Where is the <colour> <kind>?" or "Where is the <label>
button?" about one thing, feeds the question with its true answer and records every decoder
head's attention weights. Prints, per layer and head, at the question's two name words and at
the answer's "[" (the position that writes x1), the share of the attention on the scene's
things that falls on the named one (an image token belongs to a thing when the centre of its
cell lies in the thing's box). A head that does not look at the name gives the named thing its
share of the things' tokens, printed below the table.
"""

import argparse
import random

import mm1_mlx  # noqa: F401  (first: it loads OpenBLAS, which must precede mlx.core)

# isort: split
import mlx.core as mx
import numpy as np

from mm1_mlx.cells import cell_centres
from mm1_mlx.loading import load, model_or_default
from mm1_mlx.train import synth
from mm1_mlx.train.box_attention import AttentionInputs


def attention_weights(model, ids: list[int], tiles) -> list[mx.array]:
    """Each decoder layer's causal attention weights [heads, queries, keys] over `ids`."""
    with AttentionInputs(model) as attention:
        model(mx.array([ids]), mx.array(tiles))
    weights = []
    for queries, keys, scale in attention.seen:
        keys = mx.repeat(keys, queries.shape[1] // keys.shape[1], axis=1)
        scores = (queries * scale) @ keys.transpose(0, 1, 3, 2)
        future = mx.triu(mx.full(scores.shape[-2:], -mx.inf), k=1)
        weights.append(mx.softmax(scores + future, axis=-1)[0])
    return weights


def grounding_questions(scene: synth.Scene) -> list[tuple[synth.QA, synth.PixelBox]]:
    """Each thing's "Where is the ...?" question, as the spec asks it, with the thing's box."""
    things = scene.shapes if isinstance(scene, synth.ShapeScene) else scene.buttons
    asked = [qa for qa in synth.questions(scene) if qa.task.startswith("ground_")]
    return [(qa, thing.box) for qa, thing in zip(asked, things, strict=True)]


def last_position(ids: list[int], word: list[int]) -> int:
    """Where the last token of `word` sits at its last occurrence in `ids`."""
    for start in range(len(ids) - len(word), -1, -1):
        if ids[start : start + len(word)] == word:
            return start + len(word) - 1
    raise ValueError("word not in prompt")


def named_shares(
    model, processor, scene: synth.Scene, things: list[tuple[synth.QA, synth.PixelBox]], k: int
):
    """([layers, heads, 3]: at the question's two name words and "[", the share of the
    attention on all things' tokens that falls on thing k of `grounding_questions(scene)`;
    thing k's share of those tokens)."""
    qa, box = things[k]
    image = synth.render(scene, "plain")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": f"{processor.image_token}\n{qa.question}"}], [image]
    )
    ids = list(prompt.input_ids)
    answer = processor.tokenizer.encode(f" {qa.answer}", add_special_tokens=False)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    image_positions = [i for i, token in enumerate(ids) if token == image_id]
    (grid,) = processor.image_grids([scene.size])
    side = round((len(image_positions) / len(prompt.tiles)) ** 0.5)
    centres = cell_centres(scene.size, grid, processor.config.preprocess_config, side)

    def tokens_in(thing_box: synth.PixelBox) -> np.ndarray:
        return np.array([synth.inside(x, y, thing_box) for x, y in centres.reshape(-1, 2)])

    named = tokens_in(box)
    others = np.any([tokens_in(b) for _, b in things if b != box], axis=0)
    others &= ~named

    def encoded(word: str) -> list[int]:
        return processor.tokenizer.encode(f" {word}", add_special_tokens=False)

    names = qa.question.rstrip("?").split()[-2:]  # "red circle", "Send button"
    positions = [last_position(ids, encoded(word)) for word in names]
    positions.append(len(ids))  # the answer's "[", whose output is x1
    shares = []
    for weights in attention_weights(model, ids + answer, prompt.tiles):
        on_image = np.array(weights[:, mx.array(positions)][:, :, mx.array(image_positions)])
        on_named, on_others = on_image[..., named].sum(-1), on_image[..., others].sum(-1)
        shares.append(on_named / np.maximum(on_named + on_others, 1e-12))
    return np.stack(shares), named.sum() / (named.sum() + others.sum())


def measure(model, processor, sampler, n: int, rng: random.Random):
    """Mean shares [layers, heads, 3] over `n` scenes of `sampler` with two or more things
    that cover image tokens of their own, and the mean share of the named thing's tokens."""
    shares, baselines = [], []
    while len(shares) < n:
        scene = sampler(rng)
        things = grounding_questions(scene)
        if len(things) < 2:
            continue
        k = rng.randrange(len(things))
        measured, baseline = named_shares(model, processor, scene, things, k)
        if 0 < baseline < 1:  # else the grid cannot tell the named thing from the others
            shares.append(measured)
            baselines.append(baseline)
    return np.mean(shares, axis=0), float(np.mean(baselines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the shipped demo model")
    parser.add_argument("--n", type=int, default=60, help="questions per grounding type")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    if args.n < 1:
        raise SystemExit("error: --n must be at least 1")
    model, processor = load(model_or_default(args.model))
    rng = random.Random(args.seed)
    shapes, shape_base = measure(model, processor, synth.sample_shape_scene, args.n, rng)
    buttons, button_base = measure(model, processor, synth.sample_screen_scene, args.n, rng)
    columns = ["shape: colour word", "kind word", '"["', "button: label word", '"button"', '"["']
    print(f"| layer | head | {' | '.join(columns)} |")
    print("|---|---|---|---|---|---|---|---|")
    for layer, heads in enumerate(np.concatenate([shapes, buttons], axis=-1)):
        for head, row in enumerate(heads):
            print(f"| {layer} | {head} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    print(f"\nthe named thing's share of the things' tokens: shapes {shape_base:.2f}, "
          f"buttons {button_base:.2f}")  # fmt: skip
    print(f"command: python benchmarks/grounding_attention.py --n {args.n} --seed {args.seed}")


if __name__ == "__main__":
    main()

"""A second implementation of docs/synthetic-world.md's pictures, written from the page alone,
to measure whether a model learned the world or the generator's way of drawing it.

    python benchmarks/spec_renderer.py OUT [--n 3] [--seed 0]    (writes a few pictures to look at)

The generator (`mm1_mlx.train.synth.render`) draws with Pillow's shape primitives and places text
by Pillow's "mm" anchor. This one rasterises every shape itself, a pixel belonging to a shape
when the shape covers the pixel's centre, and centres each label by its ink (the bounding box
of its glyphs) in the page's font. Both keep to the specification (sizes, colours, font,
placement); their pixels differ at edges and text sits up to a few pixels apart. The scenes and
questions are the generator's (`synth.eval_example`): only the drawing is independent.
"""

import argparse
import functools
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mm1_mlx.train import synth

SPECIFICATION = Path(__file__).resolve().parent.parent / "docs" / "synthetic-world.md"
# The specification's values, read or restated from the page rather than taken from the
# generator: the shapes' colour table ("| red | (220, 40, 40) |") is read from it.
COLOUR_ROW = re.compile(r"^\s*\|\s*(\w+)\s*\|\s*\((\d+), (\d+), (\d+)\)\s*\|\s*$", re.MULTILINE)
COLOURS = {
    name: (int(r), int(g), int(b))
    for name, r, g, b in COLOUR_ROW.findall(SPECIFICATION.read_text())
}
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
TITLE_BAR, TITLE_BAR_FILL = (0, 0, 160, 40), (230, 230, 230)
BUTTON_COLOURS = {"blue": ((40, 80, 220), WHITE), "gray": ((200, 200, 200), BLACK)}
FONT_SIZE = 16


def render(scene: synth.Scene) -> Image.Image:
    """The scene as an RGB image of its size."""
    width, height = scene.size
    pixels = np.full((height, width, 3), 255, np.uint8)
    if isinstance(scene, synth.ShapeScene):
        for shape in scene.shapes:
            pixels[shape_mask(shape.kind, shape.box, (width, height))] = COLOURS[shape.color]
        return Image.fromarray(pixels)
    fill_box(pixels, TITLE_BAR, TITLE_BAR_FILL)
    labels = [(scene.title, TITLE_BAR, BLACK)]
    for button in scene.buttons:
        fill, ink = BUTTON_COLOURS[button.style]
        fill_box(pixels, button.box, fill)
        labels.append((button.label, button.box, ink))
    image = Image.fromarray(pixels)
    for text, box, ink in labels:
        draw_centred(image, text, box, ink)
    return image


def shape_mask(kind: str, box: tuple[int, ...], size: tuple[int, int]) -> np.ndarray:
    """[height, width] bool: the pixels whose centres the shape covers. A box (x1, y1, x2, y2)
    spans pixel edges x1..x2 and y1..y2."""
    x1, y1, x2, y2 = box
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]] + 0.5
    inside = (xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)
    if kind == "square":
        return inside
    if kind == "circle":
        radius = (x2 - x1) / 2
        return (xs - (x1 + x2) / 2) ** 2 + (ys - (y1 + y2) / 2) ** 2 <= radius**2
    # triangle, apex up: its apex at the top centre of the box, its base the bottom edge
    half_width = (x2 - x1) / 2 * (ys - y1) / (y2 - y1)  # the triangle's half-width at row ys
    return inside & (np.abs(xs - (x1 + x2) / 2) <= half_width)


def fill_box(pixels: np.ndarray, box: tuple[int, ...], colour: tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = colour


@functools.cache
def page_font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE)


def draw_centred(image: Image.Image, text: str, box: tuple[int, ...], ink) -> None:
    """`text` in the page's font with its glyphs' bounding box centred in `box`."""
    font = page_font()
    left, top, right, bottom = font.getbbox(text)
    x = (box[0] + box[2]) / 2 - (left + right) / 2
    y = (box[1] + box[3]) / 2 - (top + bottom) / 2
    ImageDraw.Draw(image).text((round(x), round(y)), text, fill=ink, font=font)


def write_eval(folder: Path, n_per_task: int, seed: int) -> None:
    """Held-out sets like `synth.write_eval`'s (folder/<task>.jsonl and images), drawn here."""
    rng = random.Random(f"independent-eval-{seed}")
    for task in synth.TASKS:
        records = []
        for i in range(n_per_task):
            scenes, qa = synth.eval_example(task, rng)
            names = [f"images/{task}/{i:05d}-{k}.png" for k in range(len(scenes))]
            for name, scene in zip(names, scenes, strict=True):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                render(scene).save(folder / name)
            turn = synth.user_turn(qa.question, len(scenes))
            records.append({"task": task, "images": names, "messages": [turn], "answer": qa.answer})
        synth.write_jsonl(folder / f"{task}.jsonl", records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=3, help="pictures of each kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for i in range(args.n):
        for name, sampler in (
            ("shapes", synth.sample_shape_scene),
            ("screen", synth.sample_screen_scene),
        ):
            scene = sampler(rng)
            render(scene).save(args.out / f"{name}-{i}.png")
            synth.render(scene, "plain").save(args.out / f"{name}-{i}-generator.png")
    print(f"wrote {4 * args.n} pictures to {args.out} (each beside the generator's)")


if __name__ == "__main__":
    main()

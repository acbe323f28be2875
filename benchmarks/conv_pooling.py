"""The convolutional embedding's poolings: MLX's nn.MaxPool2d against vision.py's reshapes.

    python benchmarks/conv_pooling.py [--tiles 64] [--rounds 3]

Times forward and backward (gradients of every parameter) of the demo model's ConvEmbedding
(64 channels, 16-px patches, 128-px tiles; a dense pre-training step of 32 images is ~64 tiles)
with each pooling, alternating round by round, and prints the medians and their ratio. Both give
the same numbers (tests/test_vision.py compares them with torch's MaxPool2d).
"""

import argparse
import statistics
import time

import mm1_mlx  # noqa: F401  (first: it loads OpenBLAS, which must precede mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn

from mm1_mlx.vision import ConvEmbedding


class StridedPooling(ConvEmbedding):
    """The same module with MLX's own strided max pooling."""

    def __call__(self, pixels: mx.array) -> mx.array:
        halve = nn.MaxPool2d(2, stride=2)
        window = nn.MaxPool2d(3 * self.quarter, stride=self.quarter, padding=self.quarter)
        x = halve(nn.relu(self.conv1(pixels)))
        x = halve(nn.relu(self.conv2(x)))
        return self.proj(window(nn.relu(self.conv3(x))))


def seconds(module: nn.Module, pixels: mx.array) -> float:
    step = nn.value_and_grad(module, lambda m, x: (m(x) ** 2).mean())
    start = time.perf_counter()
    mx.eval(step(module, pixels))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pixels = mx.random.normal((args.tiles, 128, 128, 3))
    ours = ConvEmbedding(64, 16, 192)
    strided = StridedPooling(64, 16, 192)
    strided.update(ours.parameters())
    times = {"nn.MaxPool2d": [], "reshapes (vision.py)": []}
    for module in (strided, ours):  # warm up
        seconds(module, pixels)
    for _ in range(args.rounds):
        times["nn.MaxPool2d"].append(seconds(strided, pixels))
        times["reshapes (vision.py)"].append(seconds(ours, pixels))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name}: {median:.2f} s forward + backward, {args.tiles} tiles")
    print(f"ratio: {medians['nn.MaxPool2d'] / medians['reshapes (vision.py)']:.2f}x")


if __name__ == "__main__":
    main()

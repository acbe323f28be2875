"""Boxes and points as MM1.5 / Ferret-UI write them in text.

A box is `[x1, y1, x2, y2]`, a point `[x, y]`: integers from 0 to 1000 across the image's
width (x) and height (y), so coordinate c is pixel c / 1000 * extent. Pixels -> coordinates
rounds to the nearest step and clamps to 0..1000; parsing accepts any spacing and decimals,
clamps, orders each box's corners, and ignores bracketed lists of other lengths such as
`[1, 2, 3]`.
"""

import re
from dataclasses import dataclass

COORDINATE_MAX = 1000  # coordinates are integers 0..1000 across the image's width and height

Size = tuple[int, int]  # (width, height) in pixels
PixelBox = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, PIL's crop box

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
# Two numbers, optionally two more; "[" and "]" right around them, so [[1, 2]] finds [1, 2].
_BRACKETED = re.compile(rf"\[{_NUMBER},{_NUMBER}(?:,{_NUMBER},{_NUMBER})?\]")


@dataclass(frozen=True)
class ParsedBox:
    """A box in pixels, and where its text stood (`text[span[0]:span[1]]`)."""

    x1: float
    y1: float
    x2: float
    y2: float
    span: tuple[int, int]


@dataclass(frozen=True)
class ParsedPoint:
    x: float
    y: float
    span: tuple[int, int]


def to_coordinate(pixel: float, extent: int) -> int:
    return min(COORDINATE_MAX, max(0, round(pixel / extent * COORDINATE_MAX)))


def to_pixels(value: float, extent: int) -> float:
    return min(COORDINATE_MAX, max(0.0, value)) / COORDINATE_MAX * extent


def to_coordinates(coords_px: tuple[float, ...], image_size: Size) -> list[int]:
    """Pixel coordinates x, y, x, y, ... -> the same in 0-1000 coordinates."""
    return [to_coordinate(v, image_size[i % 2]) for i, v in enumerate(coords_px)]


def _format(coords_px: tuple[float, ...], image_size: Size) -> str:
    """Pixel coordinates x, y, x, y, ... -> "[x, y, ...]" in 0-1000 coordinates."""
    return "[" + ", ".join(map(str, to_coordinates(coords_px, image_size))) + "]"


def format_point(point_px: tuple[float, float], image_size: Size) -> str:
    """(x, y) in pixels -> "[x, y]" in 0-1000 coordinates."""
    return _format(point_px, image_size)


def format_box(box_px: tuple[float, float, float, float], image_size: Size) -> str:
    """(x1, y1, x2, y2) in pixels -> "[x1, y1, x2, y2]" in 0-1000 coordinates."""
    return _format(box_px, image_size)


def _matches(text: str) -> list[tuple[list[float], tuple[int, int]]]:
    """Every bracketed pair or quadruple of numbers: (values, span)."""
    found = []
    for match in _BRACKETED.finditer(text):
        values = [float(group) for group in match.groups() if group is not None]
        found.append((values, match.span()))
    return found


def parse_boxes(text: str, image_size: Size) -> list[ParsedBox]:
    """Every `[x1, y1, x2, y2]` in `text`, in pixels of an image of `image_size`."""
    width, height = image_size
    boxes = []
    for values, span in _matches(text):
        if len(values) == 4:
            xs = sorted(to_pixels(v, width) for v in values[0::2])
            ys = sorted(to_pixels(v, height) for v in values[1::2])
            boxes.append(ParsedBox(xs[0], ys[0], xs[1], ys[1], span))
    return boxes


def parse_points(text: str, image_size: Size) -> list[ParsedPoint]:
    """Every `[x, y]` in `text`, in pixels of an image of `image_size`."""
    width, height = image_size
    return [
        ParsedPoint(to_pixels(values[0], width), to_pixels(values[1], height), span)
        for values, span in _matches(text)
        if len(values) == 2
    ]

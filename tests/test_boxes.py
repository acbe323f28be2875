"""Boxes and points in MM1.5 / Ferret-UI's text form: [x1, y1, x2, y2] in 0-1000 coordinates."""

import numpy as np
import pytest
from box_cases import CASES

from mm1_mlx.boxes import format_box, format_point, parse_boxes, parse_points


@pytest.mark.parametrize("text, expected", CASES, ids=[repr(text[:24]) for text, _ in CASES])
def test_parse_boxes_finds_the_table_s_boxes(text, expected):
    # On a 1000x1000 image a pixel is a coordinate step: parsed pixels are the coordinates.
    found = [((b.x1, b.y1, b.x2, b.y2), b.span) for b in parse_boxes(text, (1000, 1000))]
    assert found == expected


@pytest.mark.parametrize(
    "box_px, size, text",
    [
        ((0, 0, 640, 480), (640, 480), "[0, 0, 1000, 1000]"),
        ((64, 48, 320, 240), (640, 480), "[100, 100, 500, 500]"),
        ((1, 1, 2, 2), (3, 3), "[333, 333, 667, 667]"),  # nearest grid step
        ((-5, 10, 700, 500), (640, 480), "[0, 21, 1000, 1000]"),  # clamped to the image
    ],
)
def test_format_box(box_px, size, text):
    assert format_box(box_px, size) == text


def test_format_point():
    assert format_point((320, 120), (640, 480)) == "[500, 250]"


def test_pixels_to_text_to_pixels_is_within_one_grid_step():
    rng = np.random.default_rng(0)
    for _ in range(200):
        size = tuple(int(v) for v in rng.integers(1, 5000, 2))
        box = np.sort(rng.uniform(0, 1, (2, 2)), axis=0).reshape(-1) * np.tile(size, 2)
        (parsed,) = parse_boxes(format_box(tuple(box), size), size)
        back = np.array([parsed.x1, parsed.y1, parsed.x2, parsed.y2])
        assert np.all(np.abs(back - box) <= np.tile(size, 2) / 1000), (box, back, size)


def test_text_to_pixels_to_text_is_exact():
    rng = np.random.default_rng(1)
    for _ in range(200):
        size = tuple(int(v) for v in rng.integers(1, 5000, 2))
        values = np.sort(rng.integers(0, 1001, (2, 2)), axis=0).reshape(-1)
        text = "[{}, {}, {}, {}]".format(*values)
        (box,) = parse_boxes(text, size)
        assert format_box((box.x1, box.y1, box.x2, box.y2), size) == text
        (point,) = parse_points(text[:-1].rsplit(",", 2)[0] + "]", size)
        assert format_point((point.x, point.y), size) == "[{}, {}]".format(*values[:2])


def test_parsing_is_tolerant_and_keeps_spans():
    text = "Send is at [120,300, 480 , 360] and Back at [ 10, 20, 30, 40 ]; tap [500, 250]."
    boxes = parse_boxes(text, (1000, 2000))
    assert [(b.x1, b.y1, b.x2, b.y2) for b in boxes] == [(120, 600, 480, 720), (10, 40, 30, 80)]
    assert [text[slice(*b.span)] for b in boxes] == ["[120,300, 480 , 360]", "[ 10, 20, 30, 40 ]"]
    points = parse_points(text, (1000, 2000))
    assert [(p.x, p.y, text[slice(*p.span)]) for p in points] == [(500, 500, "[500, 250]")]


@pytest.mark.parametrize("text", ["[1, 2, 3]", "[1, 2, 3, 4, 5]", "[a, b, c, d]", "(1, 2, 3, 4)"])
def test_other_bracketed_lists_are_not_boxes(text):
    assert parse_boxes(text, (100, 100)) == [] and parse_points(text, (100, 100)) == []


def test_parsed_boxes_are_clamped_and_ordered():
    (box,) = parse_boxes("[[900, 1200, 100.5, -20]]", (1000, 1000))
    assert (box.x1, box.y1, box.x2, box.y2) == (100.5, 0, 900, 1000)

"""`--annotate`: a grounded answer's boxes drawn on its image, written atomically."""

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

from mm1_mlx.annotate import COLOUR, draw_boxes, save_annotated
from mm1_mlx.errors import UserError

WHITE = (255, 255, 255)


def white(width: int = 200, height: int = 100) -> Image.Image:
    return Image.new("RGB", (width, height), WHITE)


def test_a_box_is_drawn_where_its_grid_coordinates_put_it():
    annotated, count = draw_boxes(white(), "The Send button is at [250, 200, 750, 800].")
    pixels = np.array(annotated)
    assert count == 1
    assert tuple(pixels[50, 50]) == COLOUR and tuple(pixels[50, 150]) == COLOUR  # left, right
    assert tuple(pixels[20, 100]) == COLOUR and tuple(pixels[80, 100]) == COLOUR  # top, bottom
    assert tuple(pixels[50, 100]) == WHITE and tuple(pixels[10, 40]) == WHITE  # inside, outside


def test_several_boxes_are_numbered_and_an_answer_without_one_draws_nothing():
    _, count = draw_boxes(white(), "[0, 0, 500, 500] and [500, 500, 1000, 1000]")
    assert count == 2
    annotated, count = draw_boxes(white(), "a red circle")
    assert count == 0 and (np.array(annotated) == 255).all()


def test_save_annotated_replaces_the_file_and_refuses_bad_names(tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"old")
    assert save_annotated(out, white(), "[0, 0, 500, 500]") == 1
    assert Image.open(out).size == (200, 100)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left
    with pytest.raises(UserError, match="png"):
        save_annotated(tmp_path / "out.txt", white(), "")
    with pytest.raises(UserError, match="no such folder"):
        save_annotated(tmp_path / "missing" / "out.png", white(), "")


def test_chat_annotate_writes_the_last_image(tiny_model_dir, tmp_path):
    Image.new("RGB", (64, 48), (40, 80, 220)).save(tmp_path / "blue.png")
    out = tmp_path / "boxes.png"
    args = ["chat", "--model", str(tiny_model_dir), "--image", str(tmp_path / "blue.png")]
    code, _, err = run_cli(*args, "--max-tokens", "4", "--annotate", str(out), "What is this?")
    assert code == 0, err
    assert Image.open(out).size == (64, 48) and f"on {out}" in err.replace("\n", "")


def test_chat_annotate_checks_the_name_before_loading_anything(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    args = ["chat", "--image", str(tmp_path / "a.png"), "--annotate", str(tmp_path / "a.gif")]
    code, _, err = run_cli(*args, "Where?")
    assert code == 1 and "--annotate needs a .png" in err and "Traceback" not in err

"""Draw a grounded answer's boxes on its image (`mm1-mlx chat --annotate OUT.png`)."""

import os
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from mm1_mlx.boxes import parse_boxes
from mm1_mlx.errors import UserError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
COLOUR = (255, 0, 160)  # magenta: stands out on photos, screenshots and the demo's colours


def check_output(path: Path) -> None:
    """Fail before any generation if `path` cannot be written."""
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"{path}: --annotate needs a .png, .jpg or .webp file name")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent}: no such folder")


def draw_boxes(image: Image.Image, answer: str) -> tuple[Image.Image, int]:
    """A copy of `image` with every `[x1, y1, x2, y2]` of `answer` (0-1000 coordinates) drawn and
    numbered when there are several; and how many were drawn."""
    boxes = parse_boxes(answer, image.size)
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(image.size) / 100))
    for number, box in enumerate(boxes, 1):
        draw.rectangle((box.x1, box.y1, box.x2, box.y2), outline=COLOUR, width=width)
        if len(boxes) > 1:
            draw.text((box.x1 + width + 1, box.y1 + width), str(number), fill=COLOUR)
    return out, len(boxes)


def save_annotated(path: Path, image: Image.Image, answer: str) -> int:
    """Write `image` with the answer's boxes to `path` atomically (a reader never sees half a
    file, and an existing file survives a failure); returns the number of boxes drawn."""
    check_output(path)
    annotated, count = draw_boxes(image, answer)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        annotated.save(tmp, format=FORMATS[path.suffix.lower()])
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({error.strerror})") from None
    return count

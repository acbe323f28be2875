"""Helpers for the chat app's tests: an app screen, data URLs, recorded generations."""

import base64
import io
import threading

from PIL import Image, ImageDraw

SCREEN_SIZE = (160, 320)
SEND_BUTTON = (19, 96, 77, 115)  # pixels: x1, y1, x2, y2


def screen_png() -> bytes:
    """A small app screen: a title bar, a text field and a blue Send button."""
    image = Image.new("RGB", SCREEN_SIZE, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, SCREEN_SIZE[0], 40), fill=(230, 230, 230))
    draw.text((8, 14), "Messages", fill="black")
    draw.rectangle((10, 60, 150, 84), outline=(160, 160, 160))
    draw.rectangle(SEND_BUTTON, fill=(40, 80, 220))
    draw.text((SEND_BUTTON[0] + 14, SEND_BUTTON[1] + 4), "Send", fill="white")
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def record_generation(monkeypatch, hold: threading.Event | None = None) -> list:
    """Every chunk the app's worker generates from now on (to see when a generation stops).
    With `hold`, the worker waits for it to be set before it starts each generation."""
    from mm1_mlx import generate

    chunks = []
    generate_tokens = generate.generate_tokens

    def recording(*args, **kwargs):
        if hold is not None:
            hold.wait(10)
        for chunk in generate_tokens(*args, **kwargs):
            chunks.append(chunk)
            yield chunk

    monkeypatch.setattr(generate, "generate_tokens", recording)
    return chunks

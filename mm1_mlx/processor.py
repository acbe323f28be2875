"""Images and text -> model inputs: resized, normalized pixels and expanded image tokens."""

from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from mm1_mlx.config import MM1Config, PreprocessConfig
from mm1_mlx.errors import UserError

ImageInput = str | Path | Image.Image | np.ndarray


def open_image(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):  # HWC (or HW) uint8
        return Image.fromarray(image).convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{image}: no such image file") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{image}: not a readable image ({error})") from None


def preprocess_image(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """A PIL image -> [size, size, 3] float32, normalized with the encoder's mean and std."""
    size = config.image_size
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[config.interpolation]
    if config.resize_mode == "squash":
        image = image.resize((size, size), resample)
    elif config.resize_mode == "pad":
        scale = size / max(image.size)
        inner = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        fill = tuple(round(255 * m) for m in config.mean)
        canvas = Image.new("RGB", (size, size), fill)
        canvas.paste(
            image.resize(inner, resample), ((size - inner[0]) // 2, (size - inner[1]) // 2)
        )
        image = canvas
    else:
        raise UserError(f"unknown resize_mode {config.resize_mode!r} (squash or pad)")
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return (pixels - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)


class Processor:
    """Turns a prompt with `<image>` markers and its images into `input_ids` and `pixels`."""

    def __init__(self, tokenizer, config: MM1Config):
        self.tokenizer = tokenizer
        self.config = config

    @classmethod
    def from_folder(cls, folder: Path, config: MM1Config) -> "Processor":
        from mlx_lm.utils import load_tokenizer
        from transformers.utils import logging

        # transformers warns that config.json's model_type "mm1" is not one of its own.
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            return cls(load_tokenizer(Path(folder)), config)
        finally:
            logging.set_verbosity(verbosity)

    @property
    def image_token(self) -> str:
        return self.config.image_token

    def preprocess(self, image: ImageInput) -> np.ndarray:
        return preprocess_image(open_image(image), self.config.preprocess_config)

    def expand_image_tokens(self, ids: list[int], num_images: int) -> list[int]:
        image_id = self.config.image_token_id
        found = ids.count(image_id)
        if found != num_images:
            raise UserError(
                f"the prompt has {found} {self.image_token} markers but {num_images} images"
            )
        expanded: list[int] = []
        for token in ids:
            expanded.extend(
                [token] * self.config.num_image_tokens if token == image_id else [token]
            )
        return expanded

    def __call__(self, text: str, images: list[ImageInput] = ()) -> dict[str, mx.array | None]:
        ids = self.expand_image_tokens(self.tokenizer.encode(text), len(images))
        pixels = mx.array(np.stack([self.preprocess(i) for i in images])) if images else None
        return {"input_ids": mx.array([ids]), "pixels": pixels}

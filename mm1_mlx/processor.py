"""Images and prompts -> model inputs: the prompt's token ids and its images' tiles.

A prompt marks each image with `<image>` (config.image_token). Each image becomes one tile (the
whole picture, resized as the encoder was trained) or, with MM1.5 splitting (splitting.py), its
grid's tiles and an overview, each behind a text marker. Every tile takes num_image_tokens
copies of image_token_id in `input_ids`, in the order of `tiles`.

Chat templates get each message's content as they were written to take it: a template that
loops over a message's content (`{% for part in message['content'] %}`, as the templates of
transformers' multimodal processors do, e.g. llava-hf's) gets a list of {"type": "image"} and
{"type": "text", "text": ...} parts; any other gets a string with `<image>` markers.
"""

import hashlib
import io
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps

from mm1_mlx import splitting
from mm1_mlx.config import MM1Config, PreprocessConfig
from mm1_mlx.errors import UserError
from mm1_mlx.splitting import WHOLE_IMAGE, num_tiles


@dataclass(frozen=True)
class ImageBytes:
    """An image file's bytes with the name messages call it by (a tar member, a parquet cell,
    a zip entry): training data keeps images inside such containers."""

    name: str
    data: bytes


ImageInput = str | Path | bytes | ImageBytes | Image.Image | np.ndarray

# Larger or more elongated images are refused: decompression bombs, corrupt headers, and
# sizes no encoder input can use. 64 MP is below PIL's own bomb warning (89 MP).
MAX_PIXELS = 64_000_000
MAX_ASPECT_RATIO = 100
WHITE = (255, 255, 255, 255)
RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
EXIF_ORIENTATION = 0x0112
# A template's loop over a message's content: `{% for x in m['content'] %}`, `{%- for x in
# m.content | selectattr(...) %}`; not over a string made of it (`m['content'].split(...)`).
LOOP_OVER_CONTENT = re.compile(
    r"""\{%-?\s*for\s+\w+\s+in\s+\w+\s*
    (?:\[\s*['"]content['"]\s*\]|\.\s*content\b)  # m['content'] or m.content
    \s*(?:\||if\b|-?%\})  # then a filter, a condition or the tag's end""",
    re.VERBOSE,
)


def load_image(image: ImageInput) -> Image.Image:
    """A path, bytes, PIL image or uint8 HxW / HxWxC array -> a decoded RGB image, turned
    upright per its EXIF orientation. Bad input raises a one-line UserError naming it."""
    name = _describe(image)
    if isinstance(image, np.ndarray):
        image = _image_from_array(image, name)
    if isinstance(image, Image.Image):
        return _decode_image(image, name)
    with _open_image_file(image, name) as opened:
        return _decode_image(opened, name)


def read_image_size(path: str | Path | ImageBytes) -> tuple[int, int]:
    """The (width, height) `load_image(path)` gives, read from the file's header without decoding
    the pixels. Raises load_image's UserErrors for missing, empty, unknown and oversized files;
    a file corrupt past its header fails only in load_image."""
    name = _describe(path)
    with _open_image_file(path, name) as image:
        _check_size(image.size, name)
        width, height = image.size
        return (height, width) if _turned_sideways(image) else (width, height)


def _turned_sideways(image: Image.Image) -> bool:
    """Whether the EXIF orientation (as ImageOps.exif_transpose applies it) swaps the sides."""
    if image.format == "PNG" and "exif" not in image.info:
        return False  # PNG's getexif decodes the pixels to look for EXIF after them (rare)
    return image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)


def _describe(image: Any) -> str:
    """How error messages name an image input."""
    if isinstance(image, (str, Path)):
        return str(image)
    if isinstance(image, (bytes, bytearray)):
        return f"image bytes ({len(image)} bytes)"
    if isinstance(image, ImageBytes):
        return image.name
    if isinstance(image, Image.Image):
        return "PIL image"
    if isinstance(image, np.ndarray):
        return "numpy image"
    return f"{type(image).__name__} image"


def _image_from_array(array: np.ndarray, name: str) -> Image.Image:
    channels = array.shape[2] if array.ndim == 3 else 1
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or channels not in (1, 3, 4):
        raise UserError(
            f"{name}: expected uint8 HxW or HxWxC with C in 1, 3, 4; "
            f"got {array.dtype} {array.shape}"
        )
    _check_size((array.shape[1], array.shape[0]), name)
    if array.ndim == 3 and channels == 1:
        array = array[..., 0]
    return Image.fromarray(np.ascontiguousarray(array))


def _open_image_file(image: Any, name: str) -> Image.Image:
    """Image.open on a path or bytes: reads the header only."""
    if isinstance(image, (str, Path)):
        source = Path(image)
        try:
            exists = source.is_file()
        except OSError as error:  # a name too long for the file system, say
            raise UserError(f"{name}: cannot be read ({error.strerror})") from None
        if not exists:
            raise UserError(f"{name}: no such image file")
        empty = source.stat().st_size == 0
    elif isinstance(image, (bytes, bytearray)):
        source, empty = io.BytesIO(image), not image
    elif isinstance(image, ImageBytes):
        source, empty = io.BytesIO(image.data), not image.data
    else:
        raise UserError(f"cannot read an image from a {type(image).__name__}")
    if empty:
        raise UserError(f"{name}: empty file, not an image")
    try:
        return Image.open(source)
    except Image.DecompressionBombError:
        raise UserError(f"{name}: too many pixels (more than {MAX_PIXELS:,})") from None
    except Image.UnidentifiedImageError:
        raise UserError(f"{name}: not an image (unknown format)") from None
    except Exception as error:  # PIL's format plugins raise many types on corrupt headers
        raise UserError(f"{name}: not a readable image ({_first_line(error)})") from None


def _check_size(size: tuple[int, int], name: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise UserError(f"{name}: empty image ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise UserError(f"{name}: {width}x{height} has too many pixels (more than {MAX_PIXELS:,})")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise UserError(f"{name}: {width}x{height} is too elongated (over {MAX_ASPECT_RATIO}:1)")


def _decode_image(image: Image.Image, name: str) -> Image.Image:
    _check_size(image.size, name)
    try:
        image.load()  # the full decode happens here, so truncated files fail here
        return to_rgb(ImageOps.exif_transpose(image))
    except Exception as error:  # decoders raise many types on corrupt data
        raise UserError(f"{name}: not a readable image ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB: transparency composited on white, 16-bit grey scaled to 8 bits."""
    if image.mode.startswith("I"):  # I;16 (16-bit PNG) or I: PIL's RGB conversion would clip
        grey = np.asarray(image).astype(np.float64) / 257
        image = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, WHITE)
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def _resample_filter(config: PreprocessConfig) -> int:
    if config.interpolation not in RESAMPLE:
        raise UserError(
            f"unknown interpolation {config.interpolation!r} in config.json "
            f"({' or '.join(RESAMPLE)})"
        )
    return RESAMPLE[config.interpolation]


def place_in_canvas(
    image: Image.Image, canvas: tuple[int, int], config: PreprocessConfig
) -> Image.Image:
    """`image` resized to fit `canvas` with its aspect ratio kept, centred, padded with the
    mean colour (which normalizes to about zero)."""
    left, top, right, bottom = splitting.fitted_box(image.size, canvas)
    fill = tuple(round(255 * m) for m in config.mean)
    out = Image.new("RGB", canvas, fill)
    out.paste(image.resize((right - left, bottom - top), _resample_filter(config)), (left, top))
    return out


def resize_image(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """The whole image at the encoder's square input size, as the encoder was trained:
    "squash" (DFN5B) ignores the aspect ratio, "pad" keeps it, "crop" (CLIP) keeps the centre."""
    size = config.image_size
    if config.resize_mode == "squash":
        return image.resize((size, size), _resample_filter(config))
    if config.resize_mode == "pad":
        return place_in_canvas(image, (size, size), config)
    if config.resize_mode == "crop":
        return centre_square(resize_shortest_edge(image, config), size)
    raise UserError(
        f"unknown resize_mode {config.resize_mode!r} in config.json (squash, pad or crop)"
    )


def resize_shortest_edge(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """`image` resized so that its shortest edge is config.shortest_edge."""
    return image.resize(shortest_edge_size(image.size, config), _resample_filter(config))


def shortest_edge_size(size: tuple[int, int], config: PreprocessConfig) -> tuple[int, int]:
    """(width, height) of a picture of `size` resized to config.shortest_edge on its shortest
    edge, the longer one rounded down as transformers' CLIPImageProcessor does."""
    edge = config.shortest_edge
    if not isinstance(edge, int) or edge < config.image_size:
        raise UserError(
            f"resize_mode 'crop' needs a shortest_edge of at least image_size "
            f"{config.image_size} in config.json, not {edge!r}"
        )
    width, height = size
    longer = int(edge * max(width, height) / min(width, height))
    return (edge, longer) if width <= height else (longer, edge)


def centre_square(image: Image.Image, size: int) -> Image.Image:
    """The centre size x size of an image at least that large (odd margins: one more pixel on
    the right and bottom, as transformers' center_crop)."""
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def normalize(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An RGB image -> [H, W, 3] float32: rescaled, then with the encoder's mean and std."""
    # In float64 then cast, as transformers rescales; with 1/255 this is bit for bit x / 255.
    pixels = (np.asarray(image, dtype=np.float64) * config.rescale_factor).astype(np.float32)
    return (pixels - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)


def preprocess_image(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An RGB image -> the encoder's [size, size, 3] input for the whole picture."""
    return normalize(resize_image(image, config), config)


def _image_digest(image: Image.Image, config: PreprocessConfig) -> str:
    """A hash of the image's pixels and of the settings its tiles are made with."""
    settings = (image.size, config.image_size, config.mean, config.std, config.rescale_factor)
    settings += (config.resize_mode, config.shortest_edge, config.interpolation)
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(repr(settings).encode())
    return digest.hexdigest()


@dataclass
class PromptInputs:
    """A tokenized prompt with its images' tiles (see the module docstring)."""

    input_ids: list[int]
    tiles: np.ndarray | None  # [num_tiles, S, S, 3] float32, None without images
    # Per tile: "<_image_digest>/whole" or "<_image_digest>/<rows>x<columns>/<left>,<top>", so
    # the engine can cache encoded tiles: the same picture is encoded once.
    tile_keys: list[str]
    image_sizes: list[tuple[int, int]]  # (width, height) of each image, in prompt order

    def to_model(self) -> dict[str, mx.array | None]:
        pixels = None if self.tiles is None else mx.array(self.tiles)
        return {"input_ids": mx.array([self.input_ids]), "pixels": pixels}


_NEXT_IMAGE = object()  # a marker whose image is the next of the `images` argument
# What a chat message may hold, as the app's API takes it: the chat template sees no other key.
MESSAGE_KEYS = ("role", "content", "name")


def check_message_keys(message: dict[str, Any]) -> None:
    """A chat message holds role, content and maybe a name (a string), nothing the chat
    template would be given unchecked."""
    unknown = [key for key in message if key not in MESSAGE_KEYS]
    if unknown:
        known = ", ".join(MESSAGE_KEYS)
        raise UserError(f"a chat message's keys are {known}, not {unknown[0]!r:.40}")
    if "name" in message and not isinstance(message["name"], str):
        raise UserError(f"a chat message's name is a string, not {message['name']!r:.40}")


def _check_marker_count(markers: int, images: int, image_token: str) -> None:
    if markers != images:
        raise UserError(f"the prompt has {markers} {image_token} markers but {images} images")


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """How many leading items two token (or tile key) sequences share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def fallback_chat(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """The chat format for tokenizers without a chat template: a line "Role: content" per
    message (role capitalised), then "Assistant:" when asking for an answer."""
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return turns + ("Assistant:" if add_generation_prompt else "")


@contextmanager
def foreign_model_type_quiet() -> Iterator[None]:
    """transformers' warnings off while it reads a tokenizer from a folder whose config.json
    has a model_type of another library ("mm1", Honeybee's "mllm"), which it warns about."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def check_chat_template(template: Any) -> None:
    """A tokenizer's chat template, None (none) or Jinja text (or named texts), parsed as
    transformers will: a broken one is refused as the model loads, not at its first prompt."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if template is None:
        return
    for text in template.values() if isinstance(template, dict) else [template]:
        if not isinstance(text, str):
            raise UserError(f"the chat template must be Jinja text, not {text!r:.40}")
        try:
            # transformers' own compiler: its templates may use its {% generation %} tag
            _compile_jinja_template(text)
        except jinja2.TemplateSyntaxError as error:
            raise UserError(
                f"the chat template is not valid Jinja (line {error.lineno}: {error.message})"
            ) from None


class Processor:
    """Prompts with `<image>` markers and their images -> PromptInputs."""

    def __init__(self, tokenizer, config: MM1Config):
        self.tokenizer = tokenizer  # mlx-lm TokenizerWrapper
        self.config = config
        template = getattr(tokenizer, "chat_template", None)
        # Whether the chat template takes content as parts (the module docstring).
        self.takes_parts = isinstance(template, str) and bool(LOOP_OVER_CONTENT.search(template))

    @classmethod
    def from_folder(cls, folder: Path, config: MM1Config) -> "Processor":
        from mlx_lm.utils import load_tokenizer

        with foreign_model_type_quiet():
            return cls(load_tokenizer(Path(folder)), config)

    @property
    def image_token(self) -> str:
        return self.config.image_token

    def encode(
        self,
        text: str,
        images: Sequence[ImageInput] = (),
        split: bool | None = None,
        n_min: int | None = None,
        n_max: int | None = None,
    ) -> PromptInputs:
        """Raw text with `<image>` markers (no chat template), one image per marker.

        `split`, `n_min`, `n_max` override the config's MM1.5 splitting settings."""
        return self._prompt_inputs(text, list(images), split, n_min, n_max)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        images: Sequence[ImageInput] = (),
        add_generation_prompt: bool = True,
        split: bool | None = None,
        n_min: int | None = None,
        n_max: int | None = None,
    ) -> PromptInputs:
        """A conversation rendered with the tokenizer's chat template, then encoded.

        Content is a string (with `<image>` markers) or a list of parts: {"type": "text",
        "text": ...}, {"type": "image"} (the next of `images`) or {"type": "image", "image":
        ImageInput}. Parts are joined as they are, an image part becoming `<image>` and a line
        break when text follows it (for templates that take a string)."""
        conversation, ordered_images = self.flatten_messages(messages, images)
        text = self.render(conversation, add_generation_prompt)
        return self._prompt_inputs(text, ordered_images, split, n_min, n_max)

    def __call__(self, text: str, images: Sequence[ImageInput] = ()) -> dict[str, mx.array | None]:
        return self.encode(text, images).to_model()

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def flatten_messages(
        self, messages: list[dict[str, Any]], images: Sequence[ImageInput]
    ) -> tuple[list[dict[str, Any]], list[ImageInput]]:
        """Messages with content as the chat template takes it (the module docstring) and the
        prompt's images in marker order."""
        slots: list[Any] = []  # per marker, in order: its image, or _NEXT_IMAGE
        conversation = []
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise UserError(f"a chat message needs a role and a content, not {message!r:.80}")
            check_message_keys(message)
            parts = self._content_parts(message.get("content"), slots)
            conversation.append({**message, "content": self._template_content(parts)})
        wanted = sum(slot is _NEXT_IMAGE for slot in slots)
        _check_marker_count(wanted, len(images), self.image_token)
        supplied = iter(images)
        return conversation, [next(supplied) if s is _NEXT_IMAGE else s for s in slots]

    def _content_parts(
        self, content: str | list[dict[str, Any]], slots: list[Any]
    ) -> list[dict[str, str]]:
        """A message's content as text parts (which may hold `<image>` markers) and image parts;
        records the image of each image part and marker in `slots`, in order."""
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):  # data files and web requests hold anything
            raise UserError(f"a chat message's content is a string or a list, not {content!r:.80}")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            text = part.get("text", "") if kind == "text" else None
            if isinstance(text, str):
                slots.extend([_NEXT_IMAGE] * text.count(self.image_token))
                parts.append({"type": "text", "text": text})
            elif kind == "image":
                slots.append(part.get("image", _NEXT_IMAGE))
                parts.append({"type": "image"})
            else:
                raise UserError(f"unknown chat message part {part!r:.80} (type text or image)")
        return parts

    def _template_content(self, parts: list[dict[str, str]]) -> str | list[dict[str, str]]:
        """Parts as the chat template takes them: a string with `<image>` markers, or parts
        with the markers in text made image parts."""
        if not self.takes_parts:
            # An image part ends its line when text follows, as in chat data ("<image>\nWhat
            # ...?") and as images given without markers are placed: the same question asked
            # as parts (the app's API) and as text (the CLI) then reaches the model the same.
            pieces = [p["text"] if p["type"] == "text" else self.image_token + "\n" for p in parts]
            if parts and parts[-1]["type"] == "image":
                pieces[-1] = self.image_token
            return "".join(pieces)
        return [piece for part in parts for piece in self._split_at_markers(part)]

    def _split_at_markers(self, part: dict[str, str]) -> list[dict[str, str]]:
        """A text part with `<image>` markers -> its text and image parts. The whitespace beside
        a marker goes with it ("<image>\\nWhat is it?" is an image, then "What is it?"): such
        templates place images with their own separators."""
        if part["type"] == "image" or self.image_token not in part["text"]:
            return [part]
        pieces = part["text"].split(self.image_token)
        parts = []
        for index, piece in enumerate(pieces):
            if index > 0:
                parts.append({"type": "image"})
                piece = piece.lstrip()
            if index < len(pieces) - 1:
                piece = piece.rstrip()
            if piece:
                parts.append({"type": "text", "text": piece})
        return parts

    def render(self, conversation: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if not self.tokenizer.has_chat_template:
            return fallback_chat(conversation, add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except jinja2.TemplateError as error:
            raise UserError(f"the chat template refused the conversation: {error}") from None

    def _prompt_inputs(
        self,
        text: str,
        images: list[ImageInput],
        split: bool | None,
        n_min: int | None,
        n_max: int | None,
    ) -> PromptInputs:
        _check_marker_count(text.count(self.image_token), len(images), self.image_token)
        loaded = [load_image(image) for image in images]
        grids = self.image_grids([image.size for image in loaded], split, n_min, n_max)
        tiles, keys = [], []
        for image, grid in zip(loaded, grids, strict=True):
            image_tiles, image_keys = self.image_tiles(image, grid)
            tiles += image_tiles
            keys += image_keys
        return PromptInputs(
            input_ids=self.layout_ids(text, grids),
            tiles=np.stack(tiles) if tiles else None,
            tile_keys=keys,
            image_sizes=[image.size for image in loaded],
        )

    # The layout (grids, token ids) needs only the images' sizes, the tiles need their pixels:
    # training lays out whole batches from image headers and decodes only its own rows.

    def image_grids(
        self,
        sizes: Sequence[tuple[int, int]],
        split: bool | None = None,
        n_min: int | None = None,
        n_max: int | None = None,
    ) -> list[splitting.Grid]:
        """The grid each image of a prompt is split into, from the (width, height) of all the
        prompt's images; WHOLE_IMAGE where it is not split."""
        config = self.config.preprocess_config
        return splitting.image_grids(
            sizes, config.image_size, config.splitting, split, n_min, n_max
        )

    def layout_ids(self, text: str, grids: Sequence[splitting.Grid]) -> list[int]:
        """The token ids of `text` whose `<image>` markers are images with these grids: each
        marker becomes its tiles' markers and image tokens, as `encode` lays them out."""
        pieces = text.split(self.image_token)
        _check_marker_count(len(pieces) - 1, len(grids), self.image_token)
        prompt = pieces[0] + "".join(
            splitting.prompt_layout(grid, self.image_token) + piece
            for grid, piece in zip(grids, pieces[1:], strict=True)
        )
        tiles = sum(num_tiles(grid) for grid in grids)
        return self._expand_image_tokens(self.tokenize(prompt), tiles)

    def image_tiles(
        self, image: Image.Image, grid: splitting.Grid
    ) -> tuple[list[np.ndarray], list[str]]:
        """The image's tiles and their keys: the whole picture, or the grid's tiles then the
        overview."""
        config = self.config.preprocess_config
        digest = _image_digest(image, config)
        whole, whole_key = preprocess_image(image, config), f"{digest}/whole"
        if grid == WHOLE_IMAGE:
            return [whole], [whole_key]
        canvas = place_in_canvas(image, splitting.canvas_size(grid, config.image_size), config)
        boxes = splitting.tile_boxes(grid, config.image_size)
        return (
            [normalize(canvas.crop(box), config) for box in boxes] + [whole],
            [f"{digest}/{grid[0]}x{grid[1]}/{box[0]},{box[1]}" for box in boxes] + [whole_key],
        )

    def tokenize(self, prompt: str) -> list[int]:
        # As mlx-lm: the tokenizer's special tokens (its BOS) unless the text (a rendered
        # template) already starts with the BOS token, so there is never a second BOS.
        bos = self.tokenizer.bos_token
        add_special_tokens = bos is None or not prompt.startswith(bos)
        return list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))

    def _expand_image_tokens(self, ids: list[int], num_tiles: int) -> list[int]:
        """Each image_token_id (one per tile) -> num_image_tokens copies of it."""
        image_id = self.config.image_token_id
        found = ids.count(image_id)
        if found != num_tiles:
            raise UserError(
                f"the tokenizer made {found} image tokens (id {image_id}) of the prompt's "
                f"{num_tiles} {self.image_token} placeholders"
            )
        expanded: list[int] = []
        for token in ids:
            if token == image_id:
                expanded.extend([image_id] * self.config.num_image_tokens)
            else:
                expanded.append(token)
        return expanded

"""The processor: image loading and hardening, resizing, splitting into tiles, prompts and chat."""

import dataclasses
import io
import itertools
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from builders import CHAT_TEMPLATE, make_clip_vision, make_llm, retokenized_copy
from PIL import Image

import mm1_mlx
from mm1_mlx.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessConfig
from mm1_mlx.convert.assemble import convert_model
from mm1_mlx.errors import UserError
from mm1_mlx.processor import Processor, load_image, normalize, preprocess_image

S = 48  # the tiny encoder's input size
TOKENS = 4  # image tokens per tile
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("processor")
    make_llm(root / "llm", "llama", vocab_size=336)
    make_clip_vision(root / "vision")
    convert_model(root / "vision", root / "llm", root / "model", num_image_tokens=TOKENS)
    return root / "model"


@pytest.fixture(scope="module")
def processor(model_dir) -> Processor:
    return mm1_mlx.load(model_dir)[1]


def retokenized(model_dir: Path, tmp_path: Path, **tokenizer) -> Processor:
    """The processor of a copy of the model whose tokenizer is changed (builders.py)."""
    return mm1_mlx.load(retokenized_copy(model_dir, tmp_path / "model", **tokenizer))[1]


def with_preprocess(processor: Processor, **changes) -> Processor:
    """The same tokenizer with other preprocessing settings."""
    preprocess = dataclasses.replace(processor.config.preprocess_config, **changes)
    config = dataclasses.replace(processor.config, preprocess_config=preprocess)
    return Processor(processor.tokenizer, config)


def solid(color, size=(S, S)) -> Image.Image:
    return Image.new("RGB", size, color)


def noise(size=(64, 64), seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    return Image.fromarray(pixels)


def normalized(color) -> np.ndarray:
    """An RGB colour as the tiny model's encoder input (OpenAI CLIP mean and std)."""
    return (np.array(color) / 255 - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD


def image_runs(ids: list[int], image_id: int) -> list[int]:
    """The lengths of the runs of image tokens in ids."""
    return [len(list(run)) for token, run in itertools.groupby(ids) if token == image_id]


# -- load_image ---------------------------------------------------------------------------


def image_bytes(image: Image.Image, fmt="PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize("kind", ["path", "str", "bytes", "pil", "hwc", "hw", "hw1", "hwc_rgba"])
def test_every_kind_of_image_input(kind, tmp_path):
    pixels = np.asarray(noise((6, 4)))
    grey = pixels[..., 0]
    file = tmp_path / "a.png"
    Image.fromarray(pixels).save(file)
    image, expected = {
        "path": (file, pixels),
        "str": (str(file), pixels),
        "bytes": (file.read_bytes(), pixels),
        "pil": (Image.fromarray(pixels), pixels),
        "hwc": (pixels, pixels),
        "hw": (grey, np.repeat(grey[..., None], 3, axis=2)),
        "hw1": (grey[..., None], np.repeat(grey[..., None], 3, axis=2)),
        "hwc_rgba": (np.dstack([pixels, np.full((4, 6), 255, np.uint8)]), pixels),
    }[kind]
    loaded = load_image(image)
    assert loaded.mode == "RGB" and loaded.size == (6, 4)
    np.testing.assert_array_equal(np.asarray(loaded), expected)


def mode_image(mode: str) -> tuple[Image.Image, list[tuple[int, int, int]]]:
    """A 2x1 image in `mode` and the RGB pixels it should load as."""
    if mode == "RGBA":  # opaque red, transparent red, half-transparent black
        image = Image.new("RGBA", (3, 1))
        image.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 0, 128)])
        return image, [RED, (255, 255, 255), (127, 127, 127)]
    if mode == "LA":
        image = Image.new("LA", (2, 1))
        image.putdata([(0, 255), (0, 0)])
        return image, [(0, 0, 0), (255, 255, 255)]
    if mode == "P":  # palette index 1 is transparent
        image = Image.new("P", (2, 1))
        image.putpalette([0, 0, 255, 0, 255, 0])
        image.putdata([0, 1])
        image.info["transparency"] = 1
        return image, [BLUE, (255, 255, 255)]
    if mode == "I;16":
        return Image.fromarray(np.array([[65535, 257 * 100]], np.uint16)), [(255,) * 3, (100,) * 3]
    if mode == "CMYK":
        return Image.new("CMYK", (2, 1), (0, 0, 0, 0)), [(255, 255, 255)] * 2
    image = Image.new(mode, (2, 1))
    image.putdata([0, 255])
    return image, [(0, 0, 0), (255, 255, 255)]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16", "CMYK", "1"])
@pytest.mark.parametrize("via_file", [False, True])
def test_image_modes_become_rgb(mode, via_file):
    image, expected = mode_image(mode)
    file_format = "TIFF" if mode == "CMYK" else "PNG"
    loaded = load_image(image_bytes(image, file_format) if via_file else image)
    assert loaded.mode == "RGB"
    np.testing.assert_allclose(np.asarray(loaded)[0], expected, atol=1)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = RED  # red left half, blue right half, as stored
    pixels[:, 20:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: shown rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    loaded = np.asarray(load_image(tmp_path / "photo.jpg")).astype(int)
    assert loaded.shape == (40, 20, 3)  # upright: tall
    assert np.abs(loaded[5, 10] - RED).max() < 40  # the stored left is now on top
    assert np.abs(loaded[35, 10] - BLUE).max() < 40


def png_header(width: int, height: int) -> bytes:
    """A PNG with a valid header claiming width x height, and no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def bad_image(case: str, folder):
    """(image input, a text its error message holds)."""
    file = folder / f"{case}.png"
    if case == "missing":
        return file, "no such image file"
    if case == "directory":
        return folder, "no such image file"
    if case == "empty":
        file.write_bytes(b"")
        return file, "empty file"
    if case in ("truncated_png", "truncated_jpeg"):
        data = image_bytes(noise(), "PNG" if case == "truncated_png" else "JPEG")
        file.write_bytes(data[: len(data) // 2])
        return file, "truncated"
    if case == "text":
        file.write_text("not an image at all")
        return file, "not an image"
    if case == "bomb":  # 400 MP: PIL itself refuses to open it
        file.write_bytes(png_header(20000, 20000))
        return file, "too many pixels"
    if case == "too_large":  # 70 MP: over our limit, under PIL's
        file.write_bytes(png_header(10000, 7000))
        return file, "too many pixels"
    if case == "elongated":
        file.write_bytes(png_header(1, 100000))
        return file, "too elongated"
    return {
        "empty_bytes": (b"", "empty file"),
        "garbage_bytes": (b"\x00\x01garbage" * 10, "not an image"),
        "zero_array": (np.zeros((0, 5, 3), np.uint8), "empty image"),
        "thin_array": (np.zeros((1, 100000), np.uint8), "too elongated"),
        "float_array": (np.zeros((4, 4, 3), np.float32), "expected uint8"),
        "five_channels": (np.zeros((4, 4, 5), np.uint8), "expected uint8"),
        "zero_pil": (Image.new("RGB", (0, 0)), "empty image"),
        "number": (42, "cannot read an image from a int"),
    }[case]


BAD_IMAGES = [
    "missing", "directory", "empty", "truncated_png", "truncated_jpeg", "text", "bomb",
    "too_large", "elongated", "empty_bytes", "garbage_bytes", "zero_array", "thin_array",
    "float_array", "five_channels", "zero_pil", "number",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_images_are_one_line_user_errors(case, tmp_path):
    image, expected = bad_image(case, tmp_path)
    with pytest.raises(UserError) as caught:
        load_image(image)
    message = str(caught.value)
    assert expected in message and "\n" not in message, message
    if isinstance(image, type(tmp_path)):
        assert message.startswith(str(image)), message


# -- resizing -----------------------------------------------------------------------------


def test_squash_resize_is_bicubic_then_normalized():
    image = noise((96, 40))
    config = PreprocessConfig(image_size=S, resize_mode="squash")
    pixels = preprocess_image(image, config)
    resized = np.asarray(image.resize((S, S), Image.BICUBIC), np.float32) / 255
    mean, std = np.array(config.mean, np.float32), np.array(config.std, np.float32)
    np.testing.assert_allclose(pixels, (resized - mean) / std, rtol=1e-6)


@pytest.mark.parametrize("size, inner", [((96, 48), (0, 12, 48, 36)), ((24, 96), (18, 0, 30, 48))])
def test_pad_resize_keeps_the_aspect_ratio_and_pads_with_the_mean(size, inner):
    config = PreprocessConfig(image_size=S, resize_mode="pad")
    pixels = preprocess_image(solid(RED, size), config)
    left, top, right, bottom = inner
    mask = np.zeros((S, S), bool)
    mask[top:bottom, left:right] = True
    np.testing.assert_allclose(pixels[mask], np.broadcast_to(normalized(RED), (mask.sum(), 3)))
    assert np.abs(pixels[~mask]).max() < 0.01  # the mean colour normalizes to ~0


# -- encode -------------------------------------------------------------------------------


def test_encode_expands_each_image_and_returns_model_inputs(processor):
    images = [solid(RED), noise((30, 70))]
    inputs = processor.encode("a red circle <image> left of <image> what color", images)
    image_id = processor.config.image_token_id
    assert image_runs(inputs.input_ids, image_id) == [TOKENS, TOKENS]
    assert inputs.tiles.shape == (2, S, S, 3) and inputs.tiles.dtype == np.float32
    np.testing.assert_allclose(inputs.tiles[0], np.broadcast_to(normalized(RED), (S, S, 3)))
    assert inputs.image_sizes == [(S, S), (30, 70)]
    model_inputs = processor("a red circle <image> left of <image> what color", images)
    assert model_inputs["input_ids"].shape == (1, len(inputs.input_ids))
    assert model_inputs["input_ids"].tolist()[0] == inputs.input_ids
    np.testing.assert_array_equal(np.array(model_inputs["pixels"]), inputs.tiles)


def test_text_only_prompt_has_no_tiles_and_decodes_back(processor):
    inputs = processor.encode("what color is the square")
    assert inputs.tiles is None and inputs.tile_keys == [] and inputs.image_sizes == []
    assert processor("what color is the square")["pixels"] is None
    assert processor.decode(inputs.input_ids) == "what color is the square"


@pytest.mark.parametrize("markers, images", [(3, 2), (1, 2), (1, 0)])
def test_marker_and_image_counts_must_match(processor, markers, images):
    text = " ".join(["<image>"] * markers) + " what"
    with pytest.raises(UserError, match=f"has {markers} <image> markers but {images} images"):
        processor.encode(text, [solid(RED)] * images)


def test_tile_keys_identify_the_picture_and_the_settings(processor):
    keys = processor.encode(
        "<image><image><image>", [solid(RED), solid(RED), solid(BLUE)]
    ).tile_keys
    assert keys[0] == keys[1] != keys[2]
    same_size = noise((S, S))
    assert processor.encode("<image>", [same_size]).tile_keys != keys[:1]
    padded = with_preprocess(processor, resize_mode="pad")
    assert padded.encode("<image>", [solid(RED)]).tile_keys != keys[:1]


# -- splitting ----------------------------------------------------------------------------


def test_split_image_gives_row_major_tiles_then_the_overview(processor):
    image = noise((2 * S, 2 * S))  # exactly a 2x2 canvas: the tiles are plain crops
    inputs = processor.encode("look <image> here", [image], split=True)
    config = processor.config.preprocess_config
    crops = [(0, 0), (S, 0), (0, S), (S, S)]
    expected = [normalize(image.crop((x, y, x + S, y + S)), config) for x, y in crops]
    expected.append(preprocess_image(image, config))
    np.testing.assert_allclose(inputs.tiles, np.stack(expected), rtol=1e-6)
    assert image_runs(inputs.input_ids, processor.config.image_token_id) == [TOKENS] * 5
    text = processor.decode(inputs.input_ids).replace("<image>" * TOKENS, "<image>")
    assert text == "look (1,1)<image>(1,2)<image>(2,1)<image>(2,2)<image>(overview)<image> here"
    assert len(set(inputs.tile_keys)) == 5
    assert inputs.tile_keys[-1] == processor.encode("<image>", [image]).tile_keys[0]


def test_split_tiles_pad_a_wide_image_in_its_canvas(processor):
    image = solid(RED, (4 * S, S // 2))
    inputs = processor.encode("<image>", [image], split=True, n_min=4, n_max=4)
    assert inputs.tiles.shape == (5, S, S, 3)  # 1x4 grid (2x2 would downscale), the overview
    red, mean = normalized(RED), np.zeros(3)
    for tile in inputs.tiles[:4]:  # centred: rows 12..36 red, the rest the mean colour
        np.testing.assert_allclose(tile[S // 4 : 3 * S // 4], np.broadcast_to(red, (S // 2, S, 3)))
        np.testing.assert_allclose(tile[: S // 4], np.broadcast_to(mean, (S // 4, S, 3)), atol=0.01)


@pytest.mark.parametrize(
    "num_images, split_args, tiles_per_image",
    [
        (1, {}, 1),  # the config's default: off
        (1, {"split": True}, 5),
        (2, {"split": True}, 5),
        (3, {"split": True}, 1),  # 3 images: never split
        (1, {"split": True, "n_min": 1}, 1),  # a 1x1 grid is the plain image
        (1, {"split": True, "n_min": 6, "n_max": 6}, 7),
    ],
)
def test_when_images_are_split(processor, num_images, split_args, tiles_per_image):
    prompt = "<image> " * num_images
    inputs = processor.encode(prompt, [solid(RED)] * num_images, **split_args)
    assert len(inputs.tiles) == len(inputs.tile_keys) == num_images * tiles_per_image
    runs = image_runs(inputs.input_ids, processor.config.image_token_id)
    assert runs == [TOKENS] * (num_images * tiles_per_image)


def test_splitting_settings_come_from_the_config(processor):
    splitting = {"enabled": True, "n_min": 2, "n_max": 2, "max_images": 3}
    split_by_default = with_preprocess(processor, splitting=splitting)
    assert len(split_by_default.encode("<image>", [solid(RED, (2 * S, S))]).tiles) == 3
    assert len(split_by_default.encode("<image>", [solid(RED)], split=False).tiles) == 1


# -- chat ---------------------------------------------------------------------------------


def test_chat_with_images_in_several_turns_and_few_shot(processor):
    messages = [
        {"role": "system", "content": "answer briefly"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]},
        {"role": "assistant", "content": "red"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "and"},
                {"type": "image", "image": np.asarray(solid(BLUE))},
                {"type": "text", "text": "or <image>?"},
            ],
        },
        {"role": "assistant", "content": "blue and green"},
        {"role": "user", "content": "<image> what color?"},
    ]
    inputs = processor.apply_chat_template(messages, [solid(RED), solid(GREEN), noise()])
    text = processor.decode(inputs.input_ids).replace("<image>" * TOKENS, "<image>")
    assert text == (
        "<|system|>answer briefly</s><|user|><image>\nwhat color?</s><|assistant|>red</s>"
        "<|user|>and<image>\nor <image>?</s><|assistant|>blue and green</s>"
        "<|user|><image> what color?</s><|assistant|>"
    )
    colors = [normalized(c) for c in (RED, BLUE, GREEN)]
    np.testing.assert_allclose(inputs.tiles[:3, 0, 0], np.stack(colors), rtol=1e-5)
    assert inputs.image_sizes == [(S, S), (S, S), (S, S), (64, 64)]


def test_chat_marker_count_error(processor):
    messages = [
        {"role": "user", "content": "<image> <image>"},
        {"role": "user", "content": "<image>"},
    ]
    with pytest.raises(UserError, match="the prompt has 3 <image> markers but 2 images"):
        processor.apply_chat_template(messages, [solid(RED), solid(BLUE)])


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user"}],
        [{"role": "user", "content": [{"type": "audio"}]}],
        ["hi"],
        [{"role": "user", "content": "hi", "name": ["ann"]}],
        [{"role": "user", "content": "hi", "tool_calls": []}],
    ],
)
def test_malformed_messages_are_user_errors(processor, messages):
    with pytest.raises(UserError, match="message"):
        processor.apply_chat_template(messages)


def test_a_message_s_name_reaches_the_chat_template(processor):
    message = {"role": "user", "content": "hi", "name": "ann"}
    assert processor.flatten_messages([message], [])[0][0]["name"] == "ann"


def conversations() -> tuple[list[dict], list[dict]]:
    first = [{"role": "user", "content": "<image> what color?"}]
    second = [
        *first,
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "image"}]},
    ]
    return first, second


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, None])
@pytest.mark.parametrize("split", [False, True])
def test_a_longer_conversation_starts_with_the_earlier_tokens(model_dir, tmp_path, template, split):
    """The engine keeps a chat's KV cache: the next turn's prompt extends the last one."""
    processor = retokenized(model_dir, tmp_path, chat_template=template)
    first, second = conversations()
    before = processor.apply_chat_template(first, [noise(seed=1)], split=split)
    after = processor.apply_chat_template(second, [noise(seed=1), noise(seed=2)], split=split)
    assert after.input_ids[: len(before.input_ids)] == before.input_ids
    assert after.tile_keys[: len(before.tile_keys)] == before.tile_keys


def test_fallback_format_without_a_chat_template(model_dir, tmp_path):
    processor = retokenized(model_dir, tmp_path, chat_template=None)
    assert not processor.tokenizer.has_chat_template
    first, _ = conversations()
    inputs = processor.apply_chat_template(first, [solid(RED)])
    text = processor.decode(inputs.input_ids).replace("<image>" * TOKENS, "<image>")
    assert text == "User: <image> what color?\nAssistant:"


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, "{{ bos_token }}" + CHAT_TEMPLATE])
def test_exactly_one_bos(model_dir, tmp_path, template):
    """A tokenizer that adds BOS (as Llama's does) and a template that may write it too."""
    processor = retokenized(model_dir, tmp_path, chat_template=template, adds_bos=True)
    assert processor.tokenizer.encode("what")[0] == 1
    first, _ = conversations()
    ids = processor.apply_chat_template(first, [solid(RED)]).input_ids
    assert ids[0] == 1 and ids.count(1) == 1
    ids = processor.encode("<image> what", [solid(RED)]).input_ids
    assert ids[0] == 1 and ids.count(1) == 1

"""HF processor folders (llava-hf's, as transformers saves them): the image preprocessing and
the chat template read from them reproduce transformers' LlavaProcessor, pixels and token ids;
files that ask for what cannot be reproduced are refused in one line.

The references are transformers' PIL-based image processors and LlavaProcessor.
"""

import json

import numpy as np
import pytest
from builders import make_tokenizer
from PIL import Image
from transformers import (
    AutoImageProcessor,
    CLIPImageProcessorPil,
    LlavaProcessor,
    SiglipImageProcessorPil,
)

from mm1_mlx.config import MM1Config, PreprocessConfig
from mm1_mlx.convert.hf_processor import read_chat_template, read_image_processor
from mm1_mlx.convert.llm import load_tokenizer, save_tokenizer
from mm1_mlx.errors import UserError
from mm1_mlx.processor import Processor, load_image, normalize, preprocess_image

CROP, PATCH = 28, 4
# llava-hf's llava-1.5 chat template: each message's images first, then its texts.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
IMAGE_PROCESSORS = {
    "clip": (
        CLIPImageProcessorPil,
        dict(size={"shortest_edge": 30}, crop_size={"height": CROP, "width": CROP}),
    ),
    "clip-bilinear": (
        CLIPImageProcessorPil,
        dict(
            size={"shortest_edge": 41},
            crop_size={"height": CROP, "width": CROP},
            resample=2,
            image_mean=[0.4, 0.5, 0.6],
            image_std=[0.2, 0.3, 0.25],
        ),
    ),
    "clip-square": (
        CLIPImageProcessorPil,
        dict(size={"height": CROP, "width": CROP}, crop_size={"height": CROP, "width": CROP}),
    ),
    "siglip": (SiglipImageProcessorPil, dict(size={"height": CROP, "width": CROP})),
    "siglip-raw-lanczos": (
        SiglipImageProcessorPil,
        dict(
            size={"height": CROP, "width": CROP}, resample=1, do_rescale=False, do_normalize=False
        ),
    ),
}


def pictures() -> dict[str, Image.Image]:
    """Odd-sized pictures: portrait, landscape, translucent RGBA, greyscale."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (45, 52, 4), np.uint8)
    return {
        "portrait": Image.fromarray(rng.integers(0, 256, (91, 37, 3), np.uint8)),
        "landscape": Image.fromarray(rng.integers(0, 256, (45, 120, 3), np.uint8)),
        "rgba": Image.fromarray(rgba, "RGBA"),
        "grey": Image.fromarray(rng.integers(0, 256, (64, 33), np.uint8), "L"),
    }


def save_image_processor(folder, name: str, place: str) -> None:
    """The image processor saved as preprocessor_config.json, or nested in
    processor_config.json as transformers 5 saves a processor's."""
    processor_class, settings = IMAGE_PROCESSORS[name]
    processor = processor_class(**settings)
    folder.mkdir(exist_ok=True)
    if place == "preprocessor_config":
        processor.save_pretrained(str(folder))
    else:
        nested = {"image_processor": json.loads(processor.to_json_string())}
        (folder / "processor_config.json").write_text(json.dumps(nested))


def transformers_pixels(folder, picture: Image.Image) -> np.ndarray:
    """[H, W, 3] as transformers' image processor loaded from `folder` makes them."""
    processor = AutoImageProcessor.from_pretrained(str(folder))
    assert processor.backend == "pil"
    pixels = processor(images=[picture], return_tensors="np")["pixel_values"][0]
    return pixels.transpose(1, 2, 0)


@pytest.mark.parametrize("place", ["preprocessor_config", "processor_config"])
@pytest.mark.parametrize("name", list(IMAGE_PROCESSORS))
def test_pixels_match_transformers(tmp_path, name, place):
    save_image_processor(tmp_path, name, place)
    config = read_image_processor(tmp_path)
    assert config.image_size == CROP
    for kind, picture in pictures().items():
        ours = preprocess_image(load_image(picture), config)
        expected = transformers_pixels(tmp_path, picture)
        assert ours.shape == expected.shape == (CROP, CROP, 3), kind
        np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0, err_msg=kind)


def test_what_each_processor_becomes(tmp_path):
    save_image_processor(tmp_path / "clip", "clip-bilinear", "preprocessor_config")
    clip = read_image_processor(tmp_path / "clip")
    assert (clip.resize_mode, clip.shortest_edge, clip.interpolation) == ("crop", 41, "bilinear")
    assert (clip.mean, clip.std) == ((0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
    save_image_processor(tmp_path / "siglip", "siglip-raw-lanczos", "processor_config")
    siglip = read_image_processor(tmp_path / "siglip")
    assert (siglip.resize_mode, siglip.interpolation, siglip.rescale_factor) == (
        "squash",
        "lanczos",
        1.0,
    )
    assert (siglip.mean, siglip.std) == ((0, 0, 0), (1, 1, 1))
    # The model folder's config.json keeps all of it.
    assert PreprocessConfig.from_dict(clip.to_dict()) == clip


def test_default_rescaling_is_bit_for_bit_a_division_by_255():
    """Model folders written before rescale_factor existed give the same pixels as before."""
    every_value = np.arange(256, dtype=np.uint8).reshape(16, 16)
    picture = Image.fromarray(np.stack([every_value] * 3, axis=-1))
    config = PreprocessConfig.from_dict({"image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3})
    before = (np.asarray(picture, np.float32) / 255.0 - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(normalize(picture, config), before)


def test_crop_needs_a_shortest_edge_at_least_the_crop():
    config = PreprocessConfig(image_size=CROP, resize_mode="crop", shortest_edge=CROP - 1)
    with pytest.raises(UserError, match="shortest_edge of at least image_size 28"):
        preprocess_image(pictures()["portrait"], config)


# -- LlavaProcessor: prompts and token ids ------------------------------------------------

# (image processor, vision_feature_select_strategy, num_additional_image_tokens as llava-hf
# sets it: 1 for CLIP's CLS, 0 for SigLIP).
LLAVAS = {
    "clip-default": ("clip", "default", 1),
    "clip-full": ("clip", "full", 1),
    "siglip-full": ("siglip", "full", 0),
}


def make_llava_processor(folder, name: str) -> None:
    """A llava-hf style processor folder: tokenizer with <image>, image processor, template."""
    image_processor, strategy, additional = LLAVAS[name]
    folder.mkdir()
    tokenizer = make_tokenizer(folder)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    processor_class, settings = IMAGE_PROCESSORS[image_processor]
    LlavaProcessor(
        image_processor=processor_class(**settings),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=additional,
        chat_template=LLAVA_TEMPLATE,
    ).save_pretrained(str(folder))


def converted_processor(folder, out, name: str) -> Processor:
    """Our processor for the llava folder, its model folder's tokenizer written as the
    converter writes it, its config as the converter sets it."""
    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = read_chat_template(folder)
    save_tokenizer(tokenizer, out, folder)
    image_processor, strategy, _ = LLAVAS[name]
    keeps_cls = image_processor == "clip" and strategy == "full"
    config = MM1Config(
        preprocess_config=read_image_processor(folder),
        image_token="<image>",
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        num_image_tokens=(CROP // PATCH) ** 2 + keeps_cls,
    )
    return Processor.from_folder(out, config)


def conversations() -> tuple[list[dict], list[dict]]:
    """A conversation with two images, as transformers' processors take it (content parts) and
    as this project's chat writes it (strings with <image> markers)."""
    as_parts = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "and"},
                {"type": "image"},
                {"type": "text", "text": "?"},
            ],
        },
    ]
    as_text = [
        {"role": "user", "content": "<image>\nWhat color is the square?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and <image> ?"},
    ]
    return as_parts, as_text


@pytest.mark.parametrize("name", list(LLAVAS))
def test_prompts_match_llava_processor(tmp_path, name):
    make_llava_processor(tmp_path / "llava", name)
    reference = LlavaProcessor.from_pretrained(str(tmp_path / "llava"))
    processor = converted_processor(tmp_path / "llava", tmp_path / "model", name)
    assert processor.takes_parts
    images = [pictures()["portrait"], pictures()["rgba"]]
    as_parts, as_text = conversations()
    prompt = reference.apply_chat_template(as_parts, add_generation_prompt=True)
    expected = reference(text=prompt, images=images, return_tensors="np")

    for messages in (as_parts, as_text):
        inputs = processor.apply_chat_template(messages, images)
        assert inputs.input_ids == expected["input_ids"][0].tolist()
        pixels = expected["pixel_values"].transpose(0, 2, 3, 1)
        np.testing.assert_allclose(inputs.tiles, pixels, atol=1e-3, rtol=0)
    assert processor.render(processor.flatten_messages(as_text, images)[0], True) == prompt


# -- chat templates -----------------------------------------------------------------------

PLACES = {
    "chat_template.jinja": lambda folder, template: (folder / "chat_template.jinja").write_text(
        template
    ),
    "chat_template.json": lambda folder, template: write_json(
        folder / "chat_template.json", {"chat_template": template}
    ),
    "tokenizer_config.json": lambda folder, template: write_json(
        folder / "tokenizer_config.json", {"chat_template": template, "bos_token": "<s>"}
    ),
    "processor_config.json": lambda folder, template: write_json(
        folder / "processor_config.json", {"chat_template": template}
    ),
}


def write_json(path, values) -> None:
    path.write_text(json.dumps(values))


@pytest.mark.parametrize("place", list(PLACES))
def test_chat_template_from_each_place(tmp_path, place):
    PLACES[place](tmp_path, LLAVA_TEMPLATE)
    assert read_chat_template(tmp_path) == LLAVA_TEMPLATE


def test_no_chat_template(tmp_path):
    write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<s>"})
    assert read_chat_template(tmp_path) is None
    assert read_chat_template(tmp_path / "elsewhere") is None


def test_named_templates_give_the_default(tmp_path):
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]
    write_json(tmp_path / "tokenizer_config.json", {"chat_template": named})
    assert read_chat_template(tmp_path) == "y"


@pytest.mark.parametrize("present", [1, 2, 3])
def test_chat_template_precedence_is_transformers(tmp_path, present):
    """With several places holding different templates, the one LlavaProcessor loads."""
    make_llava_processor(tmp_path / "llava", "clip-default")
    folder = tmp_path / "llava"
    PLACES["tokenizer_config.json"](folder, "{{ 'from the tokenizer' }}")
    PLACES["chat_template.jinja"](folder, "{{ 'from the jinja file' }}")
    if present >= 2:
        PLACES["chat_template.json"](folder, "{{ 'from the json file' }}")
    if present >= 3:
        config = json.loads((folder / "processor_config.json").read_text())
        write_json(folder / "processor_config.json", {**config, "chat_template": "{{ 'config' }}"})
    expected = LlavaProcessor.from_pretrained(str(folder)).chat_template
    assert read_chat_template(folder) == expected


# -- refusals -----------------------------------------------------------------------------

CLIP_FILE = {
    "image_processor_type": "CLIPImageProcessor",
    "size": {"shortest_edge": 30},
    "crop_size": {"height": CROP, "width": CROP},
}
BAD_PROCESSORS = {
    "no size": ({"size": None}, "size must be an object"),
    "number size": ({"size": 224}, "size must be an object"),
    "longest edge": ({"size": {"longest_edge": 30}}, "size must be an object"),
    "zero size": ({"size": {"shortest_edge": 0}}, "size must be an object"),
    "not square": ({"size": {"height": 28, "width": 32}}, "size 28x32 is not square"),
    "crop too large": ({"crop_size": {"height": 32, "width": 32}}, "crop_size 32 is larger"),
    "crop inside a square resize": (
        {"size": {"height": 32, "width": 32}},
        "crop_size 28 smaller than a 32x32 size",
    ),
    "no crop": ({"do_center_crop": False}, "without do_center_crop"),
    "crop not an object": ({"crop_size": 28}, "crop_size must be an object"),
    "unknown resample": ({"resample": 7}, "unknown resample 7"),
    "boolean resample": ({"resample": True}, "unknown resample True"),
    "unknown class": ({"image_processor_type": "LlavaNextImageProcessor"}, "not supported"),
    "no class": ({"image_processor_type": None}, "image_processor_type None"),
    "padding": (
        {"image_processor_type": "LlavaImageProcessor", "do_pad": True},
        "do_pad True is not supported",
    ),
    "no resize": ({"do_resize": False}, "do_resize false"),
    "flag not a boolean": ({"do_normalize": "yes"}, "do_normalize must be true or false"),
    "two means": ({"image_mean": [0.5, 0.5]}, "image_mean must be 3 numbers"),
    "zero std": ({"image_std": [0.5, 0, 0.5]}, "image_std must be positive"),
    "rescale text": ({"rescale_factor": "1/255"}, "rescale_factor must be a positive number"),
}


@pytest.mark.parametrize("case", list(BAD_PROCESSORS))
def test_bad_image_processors_are_one_line_errors(tmp_path, case):
    changes, expected = BAD_PROCESSORS[case]
    settings = {**CLIP_FILE, **changes}
    write_json(tmp_path / "preprocessor_config.json", settings)
    with pytest.raises(UserError) as caught:
        read_image_processor(tmp_path)
    message = str(caught.value)
    assert expected in message and "\n" not in message, message
    assert message.startswith(str(tmp_path / "preprocessor_config.json")), message


@pytest.mark.parametrize(
    "reader, files, expected",
    [
        (read_image_processor, {}, "no image processor"),
        (
            read_image_processor,
            {"processor_config.json": '{"image_processor": 5}'},
            "not an object",
        ),
        (read_image_processor, {"preprocessor_config.json": "{not json"}, "cannot read JSON"),
        (read_chat_template, {"chat_template.json": '{"chat_template": 5}'}, "must be a string"),
        (read_chat_template, {"processor_config.json": "[]"}, "expected a JSON object"),
        (
            read_chat_template,
            {"tokenizer_config.json": '{"chat_template": [{"name": "x"}]}'},
            "name a default",
        ),
    ],
)
def test_bad_processor_files_are_one_line_errors(tmp_path, reader, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as caught:
        reader(tmp_path)
    assert expected in str(caught.value) and "\n" not in str(caught.value)

"""LLaVA checkpoints in transformers' format convert (`mm1-mlx convert --vlm`) into model folders
that compute what LlavaForConditionalGeneration computes, in both weight layouts found on the
hub, with CLIP and SigLIP towers, one or several feature layers and both feature strategies;
what they cannot reproduce is refused in one line.

The references are tiny random LlavaForConditionalGeneration models built by transformers.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from builders import LLM_SIZES, _randomize_norms, make_tokenizer
from helpers import relative_error, run_cli
from mlx.utils import tree_flatten
from PIL import Image
from safetensors.torch import load_file, save_file
from test_hf_processor import LLAVA_TEMPLATE
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

import mm1_mlx
from mm1_mlx.convert.vlm import convert_vlm
from mm1_mlx.errors import UserError

IMAGE_TOKEN_ID = 320  # "<image>", added after make_tokenizer's 320 tokens
# The decoders' vocabularies: the tokenizer's 321 tokens, or room beyond them as the hub's
# padded embeddings have (ids a tokenizer cannot decode, each detokenizer its own way: not
# for the pair whose answers are compared as text).
TOKENIZER_VOCAB, PADDED_VOCAB = 321, 336
VISION_SIZES = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=48,
    patch_size=8,
)
TOWERS = {
    "clip": (CLIPVisionConfig, dict(hidden_act="quick_gelu")),
    "siglip": (SiglipVisionConfig, {}),
}
# As llava-hf's: CLIP's shortest edge resized then the centre cropped, SigLIP's squashed.
IMAGE_PROCESSORS = {
    "clip": lambda: CLIPImageProcessor(
        size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}
    ),
    "siglip": lambda: SiglipImageProcessor(size={"height": 48, "width": 48}),
}
DECODERS = {"llama": LlamaConfig, "qwen2": Qwen2Config}
# Each case: tower + decoder, its vocabulary and whether its output embedding is the input one
# (then saved once), the features LLaVA takes, how the weights are laid out and saved.
# Layouts: "older" (vision_tower.vision_model.*, language_model.model.*, ...), "newer"
# (model.vision_tower.vision_model.*, model.language_model.*, lm_head.*) and what
# transformers 5 itself saves (vision_tower.* without vision_model.).
CASES = {
    "clip-llama": dict(
        tower="clip",
        decoder="llama",
        vocab_size=TOKENIZER_VOCAB,
        tied=False,
        feature_layer=-2,
        strategy="default",
        layout="older",
        format="safetensors",
    ),
    "clip-llama-layers": dict(
        tower="clip",
        decoder="llama",
        vocab_size=PADDED_VOCAB,
        tied=False,
        feature_layer=[-1, -3],
        strategy="full",
        layout="newer",
        format="bin",
    ),
    "siglip-qwen2": dict(
        tower="siglip",
        decoder="qwen2",
        vocab_size=PADDED_VOCAB,
        tied=True,
        feature_layer=-1,
        strategy="full",
        layout="saved",
        format="sharded",
    ),
    # For comparing answers as text: the tokenizer's own vocabulary. A projector without biases,
    # with another activation.
    "siglip-qwen2-chat": dict(
        tower="siglip",
        decoder="qwen2",
        vocab_size=TOKENIZER_VOCAB,
        tied=False,
        feature_layer=-2,
        strategy="full",
        layout="newer",
        format="safetensors",
        projector=dict(multimodal_projector_bias=False, projector_hidden_act="gelu_pytorch_tanh"),
    ),
}


def llava_config(case: dict) -> LlavaConfig:
    vision_class, vision_options = TOWERS[case["tower"]]
    sizes = LLM_SIZES | dict(vocab_size=case["vocab_size"], tie_word_embeddings=case["tied"])
    text = DECODERS[case["decoder"]](**sizes, rope_theta=5000.0)
    return LlavaConfig(
        vision_config=vision_class(**VISION_SIZES, **vision_options),
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=case["feature_layer"],
        vision_feature_select_strategy=case["strategy"],
        **case.get("projector", {}),
    )


def make_llava_model(config: LlavaConfig) -> LlavaForConditionalGeneration:
    """A random model whose norms and biases are away from their initial 1 and 0, so that a
    mapping mistake in them cannot hide."""
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    _randomize_norms(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                param.normal_(0.0, 0.1)
    return model.eval()


def layout_key(key: str, layout: str) -> str:
    """A key of transformers 5's in-memory state dict in an older layout."""
    tower, rest = "model.vision_tower.", key.removeprefix("model.vision_tower.")
    if layout == "newer":
        return tower + "vision_model." + rest if key.startswith(tower) else key
    renames = [
        (tower, "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ]
    for old, new in renames:
        if key.startswith(old):
            return new + key.removeprefix(old)
    raise ValueError(key)


def save_weights(model: LlavaForConditionalGeneration, folder, layout: str, format: str):
    if layout == "saved":
        # transformers 5 writes its own layout; a tiny shard size makes several shards.
        model.save_pretrained(str(folder), max_shard_size="100KB" if format == "sharded" else None)
        return
    state = {layout_key(k, layout): v.contiguous() for k, v in model.state_dict().items()}
    if format == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif format == "safetensors":
        save_file(state, folder / "model.safetensors")
    else:
        raise ValueError(format)
    model.config.save_pretrained(str(folder))


def make_llava(folder, case: dict) -> LlavaForConditionalGeneration:
    """A LLaVA folder as the hub has them: config, weights, tokenizer and processor files."""
    config = llava_config(case)
    model = make_llava_model(config)
    folder.mkdir()
    save_weights(model, folder, case["layout"], case["format"])
    tokenizer = make_tokenizer(folder)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    LlavaProcessor(
        image_processor=IMAGE_PROCESSORS[case["tower"]](),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=case["strategy"],
        num_additional_image_tokens=int(case["tower"] == "clip"),  # CLIP's CLS
        chat_template=LLAVA_TEMPLATE,
    ).save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module")
def llavas(tmp_path_factory):
    """name -> (the case's reference model, the folder holding its LLaVA folder `llava` and
    the converted `model`), each built on first use."""
    built = {}

    def get(name: str):
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            reference = make_llava(root / "llava", CASES[name])
            convert_vlm(root / "llava", root / "model")
            built[name] = reference, root
        return built[name]

    return get


def num_expanded_image_tokens(folder) -> int:
    """How many image tokens LlavaProcessor expands one `<image>` into."""
    processor = LlavaProcessor.from_pretrained(str(folder))
    picture = Image.fromarray(np.zeros((48, 48, 3), np.uint8))
    ids = processor(text="<image>", images=[picture])["input_ids"][0]
    return int((np.asarray(ids) == IMAGE_TOKEN_ID).sum())


@pytest.mark.parametrize("name", list(CASES))
def test_converted_model_matches_llava(llavas, name):
    reference, root = llavas(name)
    model, _ = mm1_mlx.load(root / "model")
    per_image = model.config.num_image_tokens
    assert per_image == num_expanded_image_tokens(root / "llava")
    rng = np.random.default_rng(0)
    image = [IMAGE_TOKEN_ID] * per_image
    ids = np.array([[5, 17, *image, 40, 41, *image, 9, 60, 61, 62]])
    pixels = rng.standard_normal((2, 3, 48, 48)).astype(np.float32)
    with torch.no_grad():
        expected = reference(
            input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels)
        ).logits.numpy()
    logits = model(mx.array(ids), pixels=mx.array(pixels.transpose(0, 2, 3, 1)))
    error = relative_error(np.array(logits), expected)
    print(f"{name}: relative error {error:.2e}")
    assert error <= 1e-4


@pytest.mark.parametrize("name", ["clip-llama", "siglip-qwen2-chat"])
def test_chat_answers_as_transformers_generate(llavas, tmp_path, name):
    """`mm1-mlx chat` with a picture of another shape than the encoder's, through llava-hf's
    template and CLIP's resize and crop (SigLIP's squash), greedy: LlavaProcessor and
    generate's answer."""
    reference, root = llavas(name)
    path = tmp_path / "picture.png"
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 64, 3), np.uint8))
    picture.save(path)
    code, _, err = run_cli(
        "convert", "--vlm", str(root / "llava"), "--out", str(tmp_path / "model")
    )
    assert code == 0, err
    question = "What color is the square?"
    code, out, err = run_cli(
        "chat", "--model", str(tmp_path / "model"), "--image", str(path),
        "--max-tokens", "8", question,
    )  # fmt: skip
    assert code == 0, err

    processor = LlavaProcessor.from_pretrained(str(root / "llava"))
    content = [{"type": "image"}, {"type": "text", "text": question}]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )
    inputs = processor(text=prompt, images=[picture], return_tensors="pt")
    with torch.no_grad():
        generated = reference.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.tokenizer.decode(
        generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert answer and out == answer + "\n"


def write_llava_config(folder, **changes) -> None:
    config = llava_config(CASES["clip-llama"]).to_dict() | changes
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"model_type": "qwen2_vl"}, "model_type 'qwen2_vl'"),
        ({"model_type": "llava_next"}, "model_type 'llava_next'"),
        ({"model_type": "llava_qwen2"}, "model_type 'llava_qwen2'"),  # FastVLM's
        ({"model_type": "llama"}, "model_type 'llama'"),
        ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy 'cls'"),
        ({"vision_feature_layer": []}, "vision_feature_layer must be an int or a list"),
        ({"vision_feature_layer": "-2"}, "vision_feature_layer must be an int or a list"),
        ({"projector_hidden_act": "swish"}, "projector_hidden_act 'swish'"),
        ({"vision_config": {"model_type": "pixtral"}}, "model_type 'pixtral'"),
        (
            {"vision_config": {"model_type": "siglip_vision_model"}},
            "'default' with a SigLIP vision tower",
        ),
        ({"text_config": {"model_type": "no_such_llm"}}, "text_config: transformers cannot"),
    ],
)
def test_unsupported_config_is_one_line(tmp_path, changes, expected):
    write_llava_config(tmp_path / "llava", **changes)
    with pytest.raises(UserError) as error:
        convert_vlm(tmp_path / "llava", tmp_path / "model")
    message = str(error.value)
    assert "\n" not in message and expected in message, message
    if "model_type" in changes:
        assert "(it converts honeybee, llava)" in message
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--vlm", "{llava}", "--llm", "{llava}"], "does not go with --llm"),
        (["--vlm", "{llava}", "--num-image-tokens", "4"], "does not go with --num-image-tokens"),
        (["--vision", "{llava}"], "both are needed"),
    ],
)
def test_vlm_flag_conflicts_are_one_line(tmp_path, args, expected):
    argv = [arg.format(llava=tmp_path) for arg in args]
    code, out, err = run_cli("convert", *argv, "--out", str(tmp_path / "model"))
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "model").exists()


def edit_checkpoint(folder, case: str) -> None:
    """Break a copy of a LLaVA folder in one way."""
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    if case == "image token":
        config["image_token_index"] = 7
    elif case == "image size":
        processor = json.loads((folder / "processor_config.json").read_text())
        size = {"height": 40, "width": 40}
        processor["image_processor"] |= {"size": size, "crop_size": size}
        (folder / "processor_config.json").write_text(json.dumps(processor))
    elif case == "foreign weight":
        weights["adapter.weight"] = torch.zeros(2)
    elif case == "missing weight":
        del weights["multi_modal_projector.linear_2.bias"]
    elif case == "projector shape":
        weights["multi_modal_projector.linear_1.weight"] = torch.zeros(64, 40)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, folder / "model.safetensors")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("image token", "makes the image token '<image>' into [320], not the one token"),
        ("image size", "makes 40-pixel images, the vision tower takes 48"),
        ("foreign weight", "unexpected weight 'adapter.weight'"),
        ("missing weight", "missing weight 'multi_modal_projector.linear_2.bias'"),
        ("projector shape", "'multi_modal_projector.linear_1.weight' has shape (64, 40)"),
    ],
)
def test_inconsistent_checkpoint_is_one_line(llavas, tmp_path, case, expected):
    _, root = llavas("clip-llama")
    shutil.copytree(root / "llava", tmp_path / "llava")
    edit_checkpoint(tmp_path / "llava", case)
    with pytest.raises(UserError) as error:
        convert_vlm(tmp_path / "llava", tmp_path / "model")
    message = str(error.value)
    assert "\n" not in message and expected in message, message
    assert not (tmp_path / "model").exists()


def test_dtype_casts_every_part(llavas, tmp_path):
    _, root = llavas("clip-llama")
    convert_vlm(root / "llava", tmp_path / "model", dtype="bfloat16")
    model, _ = mm1_mlx.load(tmp_path / "model")
    dtypes = {value.dtype for _, value in tree_flatten(model.parameters())}
    assert dtypes == {mx.bfloat16}

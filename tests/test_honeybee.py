"""Honeybee checkpoints of both config generations convert into model folders that compute what
Honeybee computes, render its prompt, and refuse what they cannot reproduce in one line.

The reference is HoneybeeForConditionalGeneration's forward pass (honeybee/modeling_honeybee.py,
honeybee/projectors): transformers' CLIPVisionModel -> a hidden state -> the C-Abstractor
(pos_emb, the CLS token dropped, net, readout, eos tokens) -> the image positions of Llama's
input embeddings. Its state dict has Honeybee's names.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
from builders import make_clip_vision, make_llm, make_tokenizer
from helpers import relative_error, run_cli
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch_refs import HoneybeeCAbstractor

import mm1_mlx
from mm1_mlx.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ConnectorConfig
from mm1_mlx.convert.honeybee import SYSTEM_MESSAGE, convert_honeybee
from mm1_mlx.errors import UserError

# CLIP width 48 at 48 px, 8-px patches (36 patches); a C-Abstractor 48 -> 32 -> 64 pooling to 4
# queries; a Llama of width 64 whose 336-row vocabulary has room for <image>.
ABSTRACTOR = ConnectorConfig(
    input_dim=48, hidden_dim=32, output_dim=64, num_input_tokens=36, num_tokens=4, depth=2
)
OLDER, NEWER = "older", "newer"
# The older generation: the released checkpoints' config, pos_emb with a CLS slot, a .bin file.
# The newer: projector_config, pos_emb for the patches only (CLS dropped before the projector),
# safetensors, its own mean / std and another feature layer.
GENERATIONS = {
    OLDER: dict(num_eos_tokens=1, feature_layer=-1, mean=None, std=None),
    NEWER: dict(num_eos_tokens=2, feature_layer=-2, mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.25]),
}
LM_CONFIG = {
    "pretrained_lm_name_or_path": "lmsys/vicuna-7b-v1.5",
    "pretrained_tokenizer_name_or_path": "meta-llama/Llama-2-7b-hf",
}


class HoneybeeProjector(HoneybeeCAbstractor):
    """Honeybee's Projector.forward around the C-Abstractor: pos_emb added (the older
    generation's has a slot for CLS, which its ConvProjector then drops), net and readout,
    eos_tokens appended."""

    def __init__(self, config: ConnectorConfig, cls_slot: bool):
        super().__init__(dataclasses.replace(config, pos_emb=False))
        self.cls_slot = cls_slot
        self.pos_emb = nn.Parameter(
            torch.randn(1, config.num_input_tokens + cls_slot, config.input_dim)
        )
        eos = torch.randn(1, config.num_eos_tokens, config.output_dim)
        self.eos_tokens = nn.Parameter(eos) if config.num_eos_tokens else None

    def forward(self, x):
        x = x + self.pos_emb
        x = self.abstract(x[:, 1:] if self.cls_slot else x)
        if self.eos_tokens is not None:
            x = torch.cat([x, self.eos_tokens.expand(x.shape[0], -1, -1)], dim=1)
        return x


class HoneybeeReference(nn.Module):
    """HoneybeeForConditionalGeneration: images fill the positions of the negative ids."""

    def __init__(self, vision, abstractor: HoneybeeProjector, llm, feature_layer: int):
        super().__init__()
        self.vision_model, self.abstractor, self.language_model = vision, abstractor, llm
        self.feature_layer = feature_layer

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.vision_model(pixel_values, output_hidden_states=True).hidden_states
        features = states[self.feature_layer]
        # The newer generation's encoder drops CLS itself (postprocess_for_projector).
        image_tokens = self.abstractor(features if self.abstractor.cls_slot else features[:, 1:])
        embeddings = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))
        embeddings[input_ids < 0] = image_tokens.reshape(-1, image_tokens.shape[-1])
        return self.language_model(inputs_embeds=embeddings).logits


def honeybee_config(vision_config, text_config, generation: str) -> dict:
    """config.json as HoneybeeConfig.to_dict writes it in each generation."""
    settings = GENERATIONS[generation]
    vision = vision_config.to_dict()
    vision |= {"encoder_type": "openai.clip", "pretrained_vision_name_or_path": "openai/clip"}
    projector = {
        "projector_type": "c-abs",
        "hidden_size": ABSTRACTOR.hidden_dim,
        "depth": ABSTRACTOR.depth,
        "mlp_depth": ABSTRACTOR.mlp_depth,
        "num_eos_tokens": settings["num_eos_tokens"],
        "pos_emb": True,
        "feature_layer_index": settings["feature_layer"],
        "prenorm": False,
        "encoder_hidden_size": ABSTRACTOR.input_dim,
    }
    text = json.loads(text_config.to_json_string(use_diff=False))
    config = {"lm_config": LM_CONFIG, "text_config": text}
    if generation == OLDER:
        projector |= {"num_queries": ABSTRACTOR.num_tokens, "use_cls": True}
        return config | {
            "model_type": "mllm",
            "vision_config": vision,
            "visual_projector_config": projector,
            "num_query_tokens": ABSTRACTOR.num_tokens,
        }
    vision |= {"model_type": "", "image_mean": settings["mean"], "image_std": settings["std"]}
    projector |= {"num_query_tokens": ABSTRACTOR.num_tokens, "output_hidden_size": 64}
    return config | {"vision_config": vision, "projector_config": projector}


def make_honeybee(root, generation: str) -> HoneybeeReference:
    """A tiny random Honeybee model saved as a Honeybee folder at root / "honeybee"."""
    settings = GENERATIONS[generation]
    llm = make_llm(root / "llm", "llama", vocab_size=336)
    vision = make_clip_vision(root / "clip")
    torch.manual_seed(3)
    config = dataclasses.replace(ABSTRACTOR, num_eos_tokens=settings["num_eos_tokens"])
    abstractor = HoneybeeProjector(config, cls_slot=generation == OLDER)
    reference = HoneybeeReference(vision, abstractor, llm, settings["feature_layer"]).eval()
    folder = root / "honeybee"
    folder.mkdir()
    state = honeybee_state_dict(reference)
    if generation == OLDER:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, folder / "model.safetensors")
    config = honeybee_config(vision.config, llm.config, generation)
    (folder / "config.json").write_text(json.dumps(config))
    make_tokenizer(folder)
    return reference


def honeybee_state_dict(reference: HoneybeeReference) -> dict[str, torch.Tensor]:
    """The reference's weights under Honeybee's names: the CLIPVisionModel of transformers 4
    keeps its encoder under `vision_model.` (transformers 5's does not)."""
    state = {}
    for key, value in reference.state_dict().items():
        if key.startswith("vision_model."):
            inner = key.removeprefix("vision_model.").removeprefix("vision_model.")
            key = "vision_model.vision_model." + inner
        state[key] = value.contiguous()
    return state


@pytest.fixture(scope="module", params=[OLDER, NEWER])
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    reference = make_honeybee(root, request.param)
    convert_honeybee(root / "honeybee", root / "model")
    return request.param, reference, root / "model"


def honeybee_prompt(question: str) -> str:
    """Honeybee's construct_input_prompt (its Inference_example notebook)."""
    return f"{SYSTEM_MESSAGE}\nHuman: <image>\nHuman: {question}\nAI: "


def test_converted_model_matches_honeybee(converted):
    generation, reference, folder = converted
    model, processor = mm1_mlx.load(folder)
    pictures = [Image.fromarray(np.random.randint(0, 256, (40, 56, 3), np.uint8)) for _ in "ab"]
    messages = [{"role": "user", "content": "<image>\n<image>\nWhich one is brighter?"}]
    inputs = processor.apply_chat_template(messages, pictures)
    ids = np.array([inputs.input_ids])
    is_image = ids == model.config.image_token_id
    per_image = ABSTRACTOR.num_tokens + GENERATIONS[generation]["num_eos_tokens"]
    assert model.config.num_image_tokens == per_image and is_image.sum() == 2 * per_image

    logits = np.array(model(**inputs.to_model()))
    with torch.no_grad():
        expected = reference(
            torch.from_numpy(np.where(is_image, -1, ids)),  # Honeybee's media ids
            torch.from_numpy(inputs.tiles).permute(0, 3, 1, 2),
        ).numpy()
    error = relative_error(logits, expected)
    print(f"{generation} Honeybee relative error {error:.2e}")
    assert error <= 1e-4


def test_preprocessing_is_honeybees(converted):
    """Resize((size, size), BICUBIC), ToTensor, Normalize(image_mean, image_std)."""
    generation, _, folder = converted
    _, processor = mm1_mlx.load(folder)
    picture = Image.fromarray(np.random.randint(0, 256, (40, 56, 3), np.uint8))
    settings = GENERATIONS[generation]
    mean = np.array(settings["mean"] or OPENAI_CLIP_MEAN, np.float32)
    std = np.array(settings["std"] or OPENAI_CLIP_STD, np.float32)
    resized = np.asarray(picture.resize((48, 48), Image.BICUBIC), np.float32) / 255
    tiles = processor.encode("<image>", [picture]).tiles
    np.testing.assert_allclose(tiles[0], (resized - mean) / std, atol=1e-5)


def test_prompt_renders_as_honeybees(converted):
    _, _, folder = converted
    _, processor = mm1_mlx.load(folder)
    question = [{"role": "user", "content": "<image>\nWhat color is the square?"}]
    assert processor.render(question, True) == "<s>" + honeybee_prompt("What color is the square?")
    follow_up = question + [
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Is it on the left?"},
    ]
    assert processor.render(follow_up, True).endswith(
        "\nHuman: What color is the square?\nAI: Red.</s>\nHuman: Is it on the left?\nAI: "
    )
    system = [{"role": "system", "content": "Be brief."}]
    assert processor.render(system + question, False) == (
        "<s>Be brief.\nHuman: <image>\nHuman: What color is the square?\n"
    )
    with pytest.raises(UserError, match="not system"):
        processor.render(question + system, True)


def edit_config(config: dict, case: str) -> dict:
    projector = config["visual_projector_config"]
    if case == "d-abs":
        projector["projector_type"] = "d-abs"
    elif case == "prenorm":
        projector["prenorm"] = True
    elif case == "multi-layer":
        projector["feature_layer_index"] = [-1, -2]
    elif case == "queries":
        config["num_query_tokens"] = 5
    elif case == "encoder":
        config["vision_config"]["encoder_type"] = "eva"
    elif case == "no text_config":
        del config["text_config"]
    elif case == "no projector":
        del config["visual_projector_config"]
    return config


@pytest.mark.parametrize(
    "case, expected",
    [
        ("d-abs", "projector_type 'd-abs' is not supported"),
        ("prenorm", "prenorm"),
        ("multi-layer", "feature_layer_index [-1, -2]"),
        ("queries", "num_query_tokens must be a square number, not 5"),
        ("encoder", "encoder_type 'eva'"),
        ("no text_config", "text_config is missing"),
        ("no projector", "not a Honeybee config"),
        ("not JSON", "cannot read JSON"),
        ("no tokenizer", "no tokenizer files"),
        ("foreign weights", "unexpected weight 'base_model.model.x'"),
    ],
)
def test_unsupported_honeybee_is_one_line(tmp_path, case, expected):
    with pytest.raises(UserError) as error:
        convert_honeybee(unsupported_honeybee(tmp_path, case), tmp_path / "model")
    assert "\n" not in str(error.value) and expected in str(error.value), str(error.value)
    assert not (tmp_path / "model").exists()


def unsupported_honeybee(root, case: str):
    """A Honeybee folder that fails before any tensor is read: its config.json edited for
    `case`, a tokenizer (unless the case is its absence) and one foreign weight."""
    folder = root / "honeybee"
    folder.mkdir()
    vision, llm = make_clip_vision(root / "clip"), make_llm(root / "llm")
    config = edit_config(honeybee_config(vision.config, llm.config, OLDER), case)
    (folder / "config.json").write_text("{" if case == "not JSON" else json.dumps(config))
    if case != "no tokenizer":
        make_tokenizer(folder)
    save_file({"base_model.model.x": torch.zeros(1)}, folder / "model.safetensors")
    return folder


def test_convert_vlm_takes_honeybee(converted, tmp_path):
    """`mm1-mlx convert --vlm` recognises Honeybee folders of both generations."""
    _, _, folder = converted
    out = tmp_path / "model"
    code, _, err = run_cli("convert", "--vlm", str(folder.parent / "honeybee"), "--out", str(out))
    assert code == 0, err
    assert (out / "config.json").read_text() == (folder / "config.json").read_text()


def test_convert_vlm_refuses_the_d_abstractor_in_one_line(tmp_path):
    source = unsupported_honeybee(tmp_path, "d-abs")
    code, _, err = run_cli("convert", "--vlm", str(source), "--out", str(tmp_path / "model"))
    assert code == 1 and err.count("\n") == 1, err
    assert "projector_type 'd-abs' is not supported" in err

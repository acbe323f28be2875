"""`mm1-mlx convert` end to end: the assembled model equals the same composition in PyTorch."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from builders import make_clip_vision, make_llm
from helpers import relative_error, run_cli
from torch_refs import HoneybeeCAbstractor

import mm1_mlx
from mm1_mlx.config import ConnectorConfig

# Tiny parts that fit together: CLIP width 48 at 48 px with 8-px patches (6x6 = 36 patches),
# a C-Abstractor 48 -> 32 -> 64 giving 4 image tokens, a Llama of width 64.
CONNECTOR = ConnectorConfig(
    input_dim=48, hidden_dim=32, output_dim=64, num_input_tokens=36, num_tokens=4, depth=2
)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    # vocab 336 > the tokenizer's 320 tokens, as in real LLMs: the added <image> id fits.
    llm = make_llm(root / "llm", "llama", vocab_size=336)
    vision = make_clip_vision(root / "vision")
    torch.manual_seed(2)
    abstractor = HoneybeeCAbstractor(CONNECTOR).eval()
    state = {f"abstractor.{k}": v for k, v in abstractor.state_dict().items()}
    torch.save(state, root / "honeybee.bin")
    return root, llm, vision, abstractor


@pytest.fixture(scope="module")
def converted(parts, tmp_path_factory):
    root, *_ = parts
    out = tmp_path_factory.mktemp("out") / "model"
    args = ["convert", "--vision", str(root / "vision"), "--llm", str(root / "llm")]
    args += [
        "--connector",
        str(root / "honeybee.bin"),
        "--num-image-tokens",
        "4",
        "--out",
        str(out),
    ]
    code, _, err = run_cli(*args)
    assert code == 0, err
    return out


def torch_logits(parts, input_ids: np.ndarray, pixels: np.ndarray, image_token_id: int):
    """The same composition in PyTorch: CLIP last block (no post-LN, no CLS) -> C-Abstractor ->
    the image tokens' embeddings replaced in order -> Llama."""
    _, llm, vision, abstractor = parts
    ids = torch.from_numpy(input_ids)
    with torch.no_grad():
        states = vision(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
        image_tokens = abstractor(states.hidden_states[-1][:, 1:])
        embeddings = llm.get_input_embeddings()(ids.clamp(max=llm.config.vocab_size - 1))
        embeddings[ids == image_token_id] = image_tokens.reshape(-1, image_tokens.shape[-1])
        return llm(inputs_embeds=embeddings).logits.numpy()


def test_converted_model_matches_pytorch_composition(parts, converted):
    model, processor = mm1_mlx.load(converted)
    images = [np.random.randint(0, 256, (40, 56, 3), np.uint8) for _ in range(2)]
    from PIL import Image

    inputs = processor(
        "a red circle <image> left of <image> what color", [Image.fromarray(i) for i in images]
    )
    ids = np.array(inputs["input_ids"])
    assert (ids == model.config.image_token_id).sum() == 2 * 4
    logits = model(inputs["input_ids"], inputs["pixels"])
    expected = torch_logits(parts, ids, np.array(inputs["pixels"]), model.config.image_token_id)
    error = relative_error(logits, expected)
    print(f"full model relative error {error:.2e}")
    assert error <= 1e-4


def test_text_only_input_is_the_plain_decoder(parts, converted):
    model, processor = mm1_mlx.load(converted)
    ids = processor("what color is the square")["input_ids"]
    expected = parts[1](torch.from_numpy(np.array(ids))).logits.detach().numpy()
    assert relative_error(model(ids), expected) <= 1e-4


def test_model_folder_layout(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "mm1"
    assert config["text_config"]["model_type"] == "llama"
    assert config["text_config"]["rope_theta"] == 5000.0
    assert config["num_image_tokens"] == 4
    tokenizer_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert "chat_template" in tokenizer_config
    names = mx.load(str(converted / "model.safetensors")).keys()
    assert {name.split(".")[0] for name in names} == {"vision", "connector", "decoder"}
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_image_token_grows_the_embeddings_when_the_vocab_is_full(tmp_path, parts):
    root, *_ = parts
    make_llm(tmp_path / "llm", "llama", vocab_size=320)  # exactly the tokenizer's size
    out = tmp_path / "model"
    code, _, err = run_cli(
        "convert", "--vision", str(root / "vision"), "--llm", str(tmp_path / "llm"),
        "--num-image-tokens", "4", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    model, _ = mm1_mlx.load(out)
    assert model.config.image_token_id == 320
    assert model.config.text_config["vocab_size"] == 321
    assert model.decoder.model.embed_tokens.weight.shape == (321, 64)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_vision", "no such file or folder"),
        ("text_file_vision", "unknown"),
        ("out_exists", "already exists"),
        ("wrong_connector", "abstractor"),
        ("bad_tokens", "square number"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(tmp_path, parts, case, expected):
    root, *_ = parts
    vision, connector = str(root / "vision"), []
    out = tmp_path / "model"
    tokens = "4"
    if case == "missing_vision":
        vision = str(tmp_path / "nowhere")
    elif case == "text_file_vision":
        (tmp_path / "notes.bin").write_text("not a checkpoint")
        vision = str(tmp_path / "notes.bin")
    elif case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("user data")
    elif case == "wrong_connector":
        connector = ["--connector", str(root / "llm" / "model.safetensors")]
    elif case == "bad_tokens":
        tokens = "5"
    code, _, err = run_cli(
        "convert", "--vision", vision, "--llm", str(root / "llm"), *connector,
        "--num-image-tokens", tokens, "--out", str(out),
    )  # fmt: skip
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert expected in err.lower(), err
    assert "Traceback" not in err
    if case == "out_exists":
        assert (out / "keep.txt").read_text() == "user data"


def test_load_reports_a_missing_model_clearly(tmp_path):
    with pytest.raises(mm1_mlx.errors.UserError, match="no such file"):
        mm1_mlx.load(tmp_path / "absent")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(mm1_mlx.errors.UserError, match="not 'mm1'"):
        mm1_mlx.load(tmp_path)


def test_load_by_hub_id_from_the_offline_cache(converted, tmp_path, monkeypatch):
    """A hub repo id resolves through huggingface-hub's cache without any network."""
    import shutil

    import huggingface_hub.constants as hub

    snapshot = tmp_path / "models--acme--tiny-mm1" / "snapshots" / ("0" * 40)
    shutil.copytree(converted, snapshot)
    (tmp_path / "models--acme--tiny-mm1" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-mm1" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    model, _ = mm1_mlx.load("acme/tiny-mm1")
    assert model.config.num_image_tokens == 4

"""Model folders: sharded weights, quantized layers, other connectors, hub ids offline."""

import json
import shutil

import huggingface_hub.constants as hub
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from builders import make_clip_vision, make_llm
from helpers import relative_error
from mlx.utils import tree_flatten

import mm1_mlx
from mm1_mlx.convert.assemble import convert_model
from mm1_mlx.errors import UserError
from mm1_mlx.loading import save_weights, write_config


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    make_llm(root / "llm", "qwen2", vocab_size=336)
    make_clip_vision(root / "vision")
    return root


@pytest.mark.parametrize("connector_type", ["avg-pool", "attn-pool", "c-abstractor"])
def test_fresh_connectors_convert_load_and_run(parts, tmp_path, connector_type):
    out = tmp_path / "model"
    convert_model(
        parts / "vision", parts / "llm", out, connector_type=connector_type, num_image_tokens=9
    )
    model, processor = mm1_mlx.load(out)
    assert model.config.connector_config.model_type == connector_type
    inputs = processor("<image> what color", [np.zeros((30, 30, 3), np.uint8) + 200])
    logits = model(inputs["input_ids"], inputs["pixels"])
    assert logits.shape == (1, inputs["input_ids"].shape[1], 336)
    assert np.isfinite(np.array(logits)).all()


def test_sharded_weights_load_like_one_file(parts, tmp_path):
    convert_model(parts / "vision", parts / "llm", tmp_path / "one", num_image_tokens=4)
    model, processor = mm1_mlx.load(tmp_path / "one")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_weights(sharded, dict(tree_flatten(model.parameters())), max_shard_bytes=100_000)
    write_config(sharded, model.config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((tmp_path / "one" / name).read_bytes())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded, _ = mm1_mlx.load(sharded)
    ids = processor("how many objects are there")["input_ids"]
    assert relative_error(reloaded(ids), model(ids)) == 0


def test_quantized_layers_load_from_config(parts, tmp_path):
    convert_model(parts / "vision", parts / "llm", tmp_path / "fp32", num_image_tokens=4)
    model, processor = mm1_mlx.load(tmp_path / "fp32")
    nn.quantize(model.decoder, group_size=32, bits=8)
    model.config.quantization = {"group_size": 32, "bits": 8}
    out = tmp_path / "q8"
    out.mkdir()
    save_weights(out, dict(tree_flatten(model.parameters())))
    write_config(out, model.config)
    (out / "tokenizer.json").write_bytes((tmp_path / "fp32" / "tokenizer.json").read_bytes())
    reloaded, _ = mm1_mlx.load(out)
    assert isinstance(reloaded.decoder.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert isinstance(reloaded.vision.blocks[0].mlp.fc1, nn.Linear)  # only what was quantized
    ids = processor("what color is the square")["input_ids"]
    assert relative_error(reloaded(ids), model(ids)) == 0


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="acme/absent: no such local file or folder, and") as error:
        mm1_mlx.load("acme/absent")
    assert "\n" not in str(error.value)


def test_a_tokenizer_without_the_config_s_image_token_is_refused_at_load(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_token": "<picture>"}))
    with pytest.raises(UserError, match=r"the tokenizer makes '<picture>' the tokens \[.*\], not"):
        mm1_mlx.load(folder)


def test_weights_that_do_not_match_the_config(parts, tmp_path):
    out = tmp_path / "model"
    convert_model(parts / "vision", parts / "llm", out, num_image_tokens=4)
    weights = mx.load(str(out / "model.safetensors"))
    del weights["connector.readout.0.weight"]
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    with pytest.raises(UserError, match="connector.readout.0.weight"):
        mm1_mlx.load(out)


def test_init_makes_a_random_model_from_a_config(tmp_path):
    from builders import make_tokenizer
    from helpers import init_model_folder

    make_tokenizer(tmp_path / "tokenizer")
    config = {
        "vision_config": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2,
                          "mlp_dim": 64, "act": "relu"},
        "connector_config": {"model_type": "avg-pool", "input_dim": 32, "output_dim": 48,
                             "num_input_tokens": 16},
        "text_config": {"model_type": "llama", "hidden_size": 48, "num_hidden_layers": 1,
                        "intermediate_size": 96, "num_attention_heads": 4, "rms_norm_eps": 1e-5},
        "preprocess_config": {"image_size": 32},
        "num_image_tokens": 4,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    init_model_folder(tmp_path / "config.json", tmp_path / "tokenizer", tmp_path / "model")
    model, processor = mm1_mlx.load(tmp_path / "model")
    assert model.config.text_config["vocab_size"] == 321  # 320 tokens + <image>
    assert model.config.image_token_id == 320
    inputs = processor("<image> a red square", [np.zeros((20, 30, 3), np.uint8)])
    assert model(inputs["input_ids"], inputs["pixels"]).shape[-1] == 321

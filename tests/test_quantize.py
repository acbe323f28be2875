"""Quantizing model folders: which layers, reloading them exactly, the quality report, bad input."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from builders import LLM_SIZES, make_clip_vision, make_tokenizer
from helpers import shapes_picture
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import mm1_mlx
from mm1_mlx.convert.assemble import convert_model
from mm1_mlx.errors import UserError
from mm1_mlx.quantize import (
    QualityReport,
    next_token_divergence,
    predicts_text,
    quality_report,
    quantize_folder,
    quantize_model,
)


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tmp_path_factory):
    """{bits: (folder, report)} at group size 32, decoder and connector only."""
    root = tmp_path_factory.mktemp("quantized")
    return {
        bits: (root / f"q{bits}", quantize_folder(tiny_model_dir, root / f"q{bits}", bits, 32))
        for bits in (4, 8)
    }


def logits_on_an_image(model, processor) -> mx.array:
    inputs = processor("<image>\nwhat color is the circle", [shapes_picture()])
    return model(inputs["input_ids"], inputs["pixels"])


def assert_reloads_exactly(source, out, bits, group_size, vision=False):
    """The folder at `out` gives the same logits as quantizing the `source` model in memory."""
    reloaded, processor = mm1_mlx.load(out)
    in_memory, _ = mm1_mlx.load(source)
    quantize_model(in_memory, bits, group_size, vision)
    expected = logits_on_an_image(in_memory, processor)
    assert mx.array_equal(logits_on_an_image(reloaded, processor), expected)
    return reloaded


@pytest.mark.parametrize("bits", [4, 8])
def test_decoder_and_connector_are_quantized_and_reload_exactly(tiny_model_dir, quantized, bits):
    out, _ = quantized[bits]
    model = assert_reloads_exactly(tiny_model_dir, out, bits, 32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    decoder = model.decoder
    assert isinstance(decoder.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(decoder.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(decoder.model.layers[1].mlp.down_proj, nn.QuantizedLinear)
    assert isinstance(decoder.lm_head, nn.QuantizedLinear)
    assert decoder.lm_head.bits == bits
    assert all(isinstance(m, nn.QuantizedLinear) for m in model.connector.readout[::2])
    assert isinstance(model.connector.net[0].b1.conv1.conv, nn.Conv2d)  # convs stay
    assert isinstance(model.vision.blocks[0].mlp.fc2, nn.Linear)  # vision only on request


def test_report_is_sane_and_8_bits_beat_4(quantized):
    (_, four), (_, eight) = quantized[4], quantized[8]
    for report in (four, eight):
        assert 0 <= report.top1_agreement <= 1
        assert 0 <= report.kl_mean <= report.kl_max
        assert report.positions > 50
        assert report.size_bytes_after < report.size_bytes_before
    assert eight.top1_agreement >= four.top1_agreement
    assert eight.kl_mean < four.kl_mean
    assert eight.size_bytes_after > four.size_bytes_after


def test_vision_flag_quantizes_the_vision_linears_that_fit(tiny_model_dir, tmp_path):
    out = tmp_path / "q4v"
    assert quantize_folder(tiny_model_dir, out, 4, 32, vision=True, report=False) is None
    model = assert_reloads_exactly(tiny_model_dir, out, 4, 32, vision=True)
    mlp, attn = model.vision.blocks[1].mlp, model.vision.blocks[1].attn
    assert isinstance(mlp.fc2, nn.QuantizedLinear)  # 96 inputs: three groups of 32
    assert isinstance(mlp.fc1, nn.Linear) and isinstance(attn.q_proj, nn.Linear)  # 48 do not
    assert isinstance(model.vision.patch_embed, nn.Conv2d)


def make_moe_llm(folder) -> None:
    """A tiny Qwen3-MoE, whose mlx-lm model keeps its routers at 8 bits, group size 64."""
    torch.manual_seed(0)
    sizes = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**LLM_SIZES, vocab_size=320, **sizes)).save_pretrained(
        str(folder)
    )
    make_tokenizer(folder)
    # transformers 5 writes num_local_experts; mlx-lm's qwen3_moe reads num_experts.
    config = json.loads((folder / "config.json").read_text())
    config["num_experts"] = config["num_local_experts"]
    (folder / "config.json").write_text(json.dumps(config))


def test_decoder_rules_for_single_layers_survive_reloading(tmp_path):
    make_moe_llm(tmp_path / "llm")
    make_clip_vision(tmp_path / "vision")
    convert_model(tmp_path / "vision", tmp_path / "llm", tmp_path / "fp32", num_image_tokens=4)
    quantize_folder(tmp_path / "fp32", tmp_path / "q4", 4, 32, report=False)
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"]["decoder.model.layers.1.mlp.gate"] == {
        "group_size": 64,
        "bits": 8,
    }
    model = assert_reloads_exactly(tmp_path / "fp32", tmp_path / "q4", 4, 32)
    layer = model.decoder.model.layers[1].mlp
    assert (layer.gate.bits, layer.gate.group_size) == (8, 64)
    assert (layer.switch_mlp.up_proj.bits, layer.switch_mlp.up_proj.group_size) == (4, 32)


def test_divergence_matches_numpy_on_hand_made_logits():
    # A small change, a change of the argmax, and no change.
    reference = np.array([[[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 3.0], [1.0, 2.0, 1.0, 1.0]]])
    quantized = np.array([[[1.5, 1.2, 0.1, -1.0], [0.0, 3.5, 0.0, 2.5], [1.0, 2.0, 1.0, 1.0]]])

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(reference), log_softmax(quantized)
    expected_kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    kl, agree = next_token_divergence(mx.array(reference), mx.array(quantized))
    np.testing.assert_allclose(np.array(kl), expected_kl, rtol=1e-5, atol=1e-7)
    assert expected_kl[0, 0] > 0.01 and expected_kl[0, 1] > expected_kl[0, 0]
    assert np.array(kl)[0, 2] == 0
    assert np.array(agree).tolist() == (reference.argmax(-1) == quantized.argmax(-1)).tolist()
    assert np.array(agree).tolist() == [[True, False, True]]


def test_positions_predicting_image_placeholders_are_left_out():
    ids = np.array([1, 7, 9, 9, 9, 5, 6])  # 9: the image token
    assert predicts_text(ids, 9).tolist() == [True, False, False, False, True, True, True]


def test_a_model_against_itself_agrees_everywhere(tiny_model):
    model, processor = tiny_model
    report = quality_report(model, model, processor)
    assert report.top1_agreement == 1.0 and report.kl_max == 0.0
    assert report.size_bytes_before == report.size_bytes_after


def test_report_rows():
    report = QualityReport(0.984, 0.0123, 0.5, 400, 2_500_000_000, 700_000_000)
    assert report.rows() == [
        ("top-1 agreement", "98.4%"),
        ("KL divergence, mean", "0.0123 nats"),
        ("KL divergence, max", "0.5 nats"),
        ("positions compared", "400"),
        ("weights before", "2.50 GB"),
        ("weights after", "700.00 MB (28%)"),
    ]


@pytest.mark.parametrize(
    ("bits", "group_size", "message"),
    [(7, 64, "bits must be one of 2, 3, 4, 5, 6, 8, not 7"), (4, 16, "group size must be")],
)
def test_unsupported_settings(tiny_model_dir, tmp_path, bits, group_size, message):
    with pytest.raises(UserError, match=message) as error:
        quantize_folder(tiny_model_dir, tmp_path / "out", bits, group_size)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_an_already_quantized_model_is_refused(quantized, tmp_path):
    folder, _ = quantized[4]
    with pytest.raises(UserError, match=r"q4: already quantized \(4-bit\)") as error:
        quantize_folder(folder, tmp_path / "again", 8, 32)
    assert "\n" not in str(error.value)


def test_a_missing_model_is_refused(tmp_path):
    with pytest.raises(UserError, match="absent: no such file or folder"):
        quantize_folder(tmp_path / "absent", tmp_path / "out")


def test_writing_over_the_model_itself_is_refused(tiny_model_dir):
    with pytest.raises(UserError, match="is the model being quantized"):
        quantize_folder(tiny_model_dir, tiny_model_dir, overwrite=True)


def test_an_existing_out_is_kept_without_force(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="out: already exists") as error:
        quantize_folder(tiny_model_dir, out, report=False)
    assert "\n" not in str(error.value)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    quantize_folder(tiny_model_dir, out, group_size=32, overwrite=True, report=False)
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists()

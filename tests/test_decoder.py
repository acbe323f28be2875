"""mlx-lm decoders built from converted HF checkpoints match transformers' logits."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from builders import make_llm
from helpers import relative_error

from mm1_mlx.convert.llm import load_llm_weights, read_text_config
from mm1_mlx.decoder import build_decoder


def _converted_decoder(folder):
    text_config = read_text_config(folder)
    decoder = build_decoder(text_config)
    decoder.load_weights(list(load_llm_weights(folder, text_config).items()), strict=True)
    return decoder


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_decoder_logits_match_transformers(tmp_path, arch, tied):
    reference = make_llm(tmp_path, arch, tie_word_embeddings=tied)
    decoder = _converted_decoder(tmp_path)
    ids = np.random.randint(0, 320, (2, 12))
    expected = reference(torch.tensor(ids)).logits.detach().numpy()
    assert relative_error(decoder(mx.array(ids)), expected) <= 1e-4


def test_rope_theta_is_read_from_transformers5_rope_parameters(tmp_path):
    make_llm(tmp_path, "llama", rope_theta=5000.0)
    assert "rope_theta" not in (tmp_path / "config.json").read_text().split("rope_parameters")[0]
    assert read_text_config(tmp_path)["rope_theta"] == 5000.0


def test_pytorch_bin_weights_convert_like_safetensors(tmp_path):
    reference = make_llm(tmp_path, "llama")
    (tmp_path / "model.safetensors").unlink()
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    decoder = _converted_decoder(tmp_path)
    ids = np.random.randint(0, 320, (1, 9))
    expected = reference(torch.tensor(ids)).logits.detach().numpy()
    assert relative_error(decoder(mx.array(ids)), expected) <= 1e-4

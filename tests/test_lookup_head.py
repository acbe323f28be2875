"""`mm1-mlx init --lookup-head`: the first head of the decoder starts as a lookup by content."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from builders import make_tokenizer
from helpers import run_cli
from mlx.utils import tree_flatten

from mm1_mlx.loading import load_model

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "train/recipes/demo/config.json"


def init(tmp_path: Path, name: str, *flags: str, config: Path = DEMO_CONFIG) -> tuple[int, str]:
    tokenizer = tmp_path / "tokenizer"
    if not tokenizer.exists():
        make_tokenizer(tokenizer)
    args = ("init", str(config), "--tokenizer", str(tokenizer), "--out", str(tmp_path / name))
    code, _, err = run_cli(*args, *flags)
    return code, err


def head_scores(model, tokens: mx.array, head: int) -> np.ndarray:
    """Layer 0's attention scores of the last token over all tokens, for one head."""
    layer = model.decoder.layers[0]
    attention = layer.self_attn
    x = layer.input_layernorm(tokens)[None]
    size = attention.q_proj.weight.shape[0] // attention.n_heads

    def heads(linear):
        return attention.rope(linear(x).reshape(1, len(tokens), -1, size).transpose(0, 2, 1, 3))

    queries, keys = heads(attention.q_proj), heads(attention.k_proj)
    return np.array((queries[0, head, -1] @ keys[0, head].T) * attention.scale)


def test_the_first_head_finds_a_token_like_the_query_at_any_distance(tmp_path):
    for name, flags in (("lookup", ["--lookup-head"]), ("plain", [])):
        assert init(tmp_path, name, *flags) == (0, "")
    lookup, plain = load_model(tmp_path / "lookup"), load_model(tmp_path / "plain")
    plain_weights = dict(tree_flatten(plain.parameters()))
    differ = {
        k for k, v in tree_flatten(lookup.parameters()) if not mx.array_equal(v, plain_weights[k])
    }
    attention = "decoder.model.layers.0.self_attn"
    assert differ == {f"{attention}.q_proj.weight", f"{attention}.k_proj.weight"}

    # The query's content sits at positions 3 and 500 of 600 random tokens.
    hidden = lookup.config.text_config["hidden_size"]
    tokens = np.random.default_rng(0).standard_normal((600, hidden)).astype(np.float32)
    tokens[3] = tokens[500] = tokens[-1]
    scores = head_scores(lookup, mx.array(tokens), head=0)[:-1]
    others = np.delete(scores, [3, 500])
    assert set(np.argsort(scores)[-2:]) == {3, 500}
    assert min(scores[3], scores[500]) > others.max() + 2, (scores[[3, 500]], others.max())
    assert abs(scores[3] - scores[500]) < 0.2 * scores[500]
    # A random head does not (the second head, and the first head without the flag).
    for model, head in ((lookup, 1), (plain, 0)):
        scores = head_scores(model, mx.array(tokens), head)[:-1]
        assert scores[[3, 500]].min() < np.delete(scores, [3, 500]).max()


def test_a_decoder_without_plain_rope_is_refused(tmp_path):
    config = json.loads(DEMO_CONFIG.read_text())
    config["text_config"]["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code, err = init(tmp_path, "m", "--lookup-head", config=path)
    assert code == 1
    assert err.strip() == (
        "error: --lookup-head needs a decoder attention of q_proj, k_proj and plain RoPE"
    )
    assert not (tmp_path / "m").exists()

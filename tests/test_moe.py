"""Router losses on tiny mlx-lm MoE decoders (Mixtral, Qwen3-MoE) and a dense Llama."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, mixtral, qwen3_moe
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.tuner.utils import linear_to_lora_layers

from mm1_mlx.errors import UserError
from mm1_mlx.train.moe import RouterLosses
from mm1_mlx.wrappers import checkpoint_layers

SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    rms_norm_eps=1e-5,
)
NUM_EXPERTS, TOP_K = 4, 2


def tiny_mixtral() -> nn.Module:
    args = mixtral.ModelArgs(
        "mixtral",
        num_hidden_layers=2,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        **SIZES,
    )
    return mixtral.Model(args)


def tiny_qwen3_moe() -> nn.Module:
    """Four layers, experts in every second one (as MM1's 3B-MoE)."""
    args = qwen3_moe.ModelArgs(
        "qwen3_moe",
        num_hidden_layers=4,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        decoder_sparse_step=2,
        mlp_only_layers=[],
        moe_intermediate_size=16,
        head_dim=8,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        max_position_embeddings=128,
        norm_topk_prob=True,
        **SIZES,
    )
    return qwen3_moe.Model(args)


def tiny_llama() -> nn.Module:
    return llama.Model(llama.ModelArgs("llama", num_hidden_layers=2, **SIZES))


# (builder, number of MoE layers, path of the first router)
MOE_DECODERS = {
    "mixtral": (tiny_mixtral, 2, "model.layers.0.block_sparse_moe.gate"),
    "qwen3_moe": (tiny_qwen3_moe, 2, "model.layers.1.mlp.gate"),
}
TOKENS = mx.array([[1, 5, 9, 2, 7, 7, 3, 11, 40, 8], [4, 4, 6, 1, 0, 13, 21, 2, 9, 63]])


def numpy_losses(router_logits) -> tuple[float, float]:
    """(load balance, z-loss) from collected logits, the long way."""
    balance, z = [], []
    for logits, top_k, token_mask in router_logits:
        logits = np.array(logits, dtype=np.float64).reshape(-1, NUM_EXPERTS)
        if token_mask is not None:
            logits = logits[np.array(token_mask).reshape(-1) > 0]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        chosen = np.argsort(-logits, axis=-1)[:, :top_k]
        fractions = np.bincount(chosen.ravel(), minlength=NUM_EXPERTS) / chosen.size
        balance.append(NUM_EXPERTS * (fractions * probs.mean(0)).sum())
        log_normalisers = np.log(np.exp(logits).sum(-1))
        z.append((log_normalisers**2).mean())
    return float(np.mean(balance)), float(np.mean(z))


@pytest.mark.parametrize("arch", MOE_DECODERS)
def test_one_set_of_logits_per_moe_layer_and_the_model_unchanged(arch):
    build, num_moe_layers, router_path = MOE_DECODERS[arch]
    decoder = build()
    paths = [path for path, _ in tree_flatten(decoder.parameters())]
    expected = decoder(TOKENS)
    router_losses = RouterLosses(decoder)
    assert router_losses.num_moe_layers == num_moe_layers
    with router_losses:
        assert mx.array_equal(decoder(TOKENS), expected)
    assert [path for path, _ in tree_flatten(decoder.parameters())] == paths
    assert len(router_losses.router_logits) == num_moe_layers
    assert type(dict(decoder.named_modules())[router_path]) is nn.Linear  # put back
    for logits, top_k, token_mask in router_losses.router_logits:
        assert token_mask is None
        assert logits.shape == (*TOKENS.shape, NUM_EXPERTS) and top_k == TOP_K


@pytest.mark.parametrize("arch", MOE_DECODERS)
def test_losses_match_numpy_and_use_mm1s_weights(arch):
    decoder = MOE_DECODERS[arch][0]()
    router_losses = RouterLosses(decoder)
    with router_losses:
        decoder(TOKENS)
    balance, z = numpy_losses(router_losses.router_logits)
    assert router_losses.load_balance_loss().item() == pytest.approx(balance, rel=1e-5)
    assert router_losses.z_loss().item() == pytest.approx(z, rel=1e-5)
    assert router_losses.loss().item() == pytest.approx(0.01 * balance + 0.001 * z, rel=1e-5)
    assert balance >= 1.0 - 1e-6  # 1 is perfectly balanced routing


@pytest.mark.parametrize("arch", MOE_DECODERS)
def test_padding_counts_in_neither_loss(arch):
    decoder = MOE_DECODERS[arch][0]()
    mask = mx.array([[1] * 10, [1] * 6 + [0] * 4])
    router_losses = RouterLosses(decoder)
    with router_losses.masking(mask):
        decoder(TOKENS)
    assert router_losses.token_mask is None  # only for that forward pass
    balance, z = numpy_losses(router_losses.router_logits)
    assert router_losses.load_balance_loss().item() == pytest.approx(balance, rel=1e-5)
    assert router_losses.z_loss().item() == pytest.approx(z, rel=1e-5)
    with router_losses:
        decoder(TOKENS)
    assert router_losses.z_loss().item() != pytest.approx(z, rel=1e-3)  # padding did count


def test_routers_with_lora_are_found():
    decoder = tiny_mixtral()
    lora = {"rank": 2, "scale": 20.0, "dropout": 0.0, "keys": ["block_sparse_moe.gate"]}
    linear_to_lora_layers(decoder, 2, lora)
    router_losses = RouterLosses(decoder)
    with router_losses:
        decoder(TOKENS)
    assert len(router_losses.router_logits) == 2
    assert router_losses.z_loss().item() == pytest.approx(
        numpy_losses(router_losses.router_logits)[1], rel=1e-5
    )


def test_uniform_routing_balances_to_one():
    decoder = tiny_mixtral()
    for layer in decoder.model.layers:
        layer.block_sparse_moe.gate.weight = mx.zeros((NUM_EXPERTS, 32))
    router_losses = RouterLosses(decoder)
    with router_losses:
        decoder(TOKENS)
    # Equal logits: P is uniform, so f's spread does not matter; logsumexp is log E.
    assert router_losses.load_balance_loss().item() == pytest.approx(1.0)
    assert router_losses.z_loss().item() == pytest.approx(np.log(NUM_EXPERTS) ** 2)


@pytest.mark.parametrize("arch", MOE_DECODERS)
def test_gradients_reach_the_routers(arch):
    decoder = MOE_DECODERS[arch][0]()
    router_losses = RouterLosses(decoder, load_balance_coef=1.0, z_loss_coef=1.0)

    def auxiliary_loss(model, tokens):
        with router_losses:
            model(tokens)
        return router_losses.loss()

    loss, grads = nn.value_and_grad(decoder, auxiliary_loss)(decoder, TOKENS)
    balance, z = numpy_losses(router_losses.router_logits)
    assert loss.item() == pytest.approx(balance + z, rel=1e-5)
    router_grads = {k: v for k, v in tree_flatten(grads) if k.endswith(".gate.weight")}
    assert len(router_grads) == MOE_DECODERS[arch][1]
    assert all(mx.abs(g).max().item() > 0 for g in router_grads.values())


def test_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointed layers run again during the backward pass, after the `with` block."""
    decoder = tiny_qwen3_moe()
    router_losses = RouterLosses(decoder)

    def loss_fn(model, tokens):
        with router_losses:
            out = model(tokens)
        return out.mean() + router_losses.loss()

    loss, grads = nn.value_and_grad(decoder, loss_fn)(decoder, TOKENS)
    checkpoint_layers(decoder, decoder.layers, True)
    checkpointed_loss, checkpointed = nn.value_and_grad(decoder, loss_fn)(decoder, TOKENS)
    assert checkpointed_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for (path, g), (_, c) in zip(tree_flatten(grads), tree_flatten(checkpointed), strict=True):
        np.testing.assert_allclose(np.array(c), np.array(g), rtol=1e-4, atol=1e-7, err_msg=path)


def test_a_dense_decoder_has_no_router_loss():
    decoder = tiny_llama()
    expected = decoder(TOKENS)
    router_losses = RouterLosses(decoder)
    assert router_losses.num_moe_layers == 0
    with router_losses:
        assert mx.array_equal(decoder(TOKENS), expected)
    assert router_losses.loss().item() == 0.0


def test_a_forgotten_forward_pass_is_an_error():
    with pytest.raises(RuntimeError, match="no forward pass ran"):
        RouterLosses(tiny_mixtral()).loss()


class DeepSeekLikeBlock(nn.Module):
    """An MoE block whose router picks the experts itself (no logits to collect)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(32, NUM_EXPERTS))
        self.switch_mlp = SwitchGLU(32, 16, NUM_EXPERTS)
        self.top_k = TOP_K


def test_an_unsupported_router_is_refused():
    model = nn.Sequential(DeepSeekLikeBlock())
    with pytest.raises(UserError, match="layers.0: DeepSeekLikeBlock has no router giving logits"):
        RouterLosses(model)

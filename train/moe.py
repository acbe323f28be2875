"""MM1's auxiliary router losses for mixture-of-experts decoders.

Load balance (Switch Transformer / Mixtral): E * sum_i f_i * P_i, with f_i the fraction of the
top-k routing choices that go to expert i and P_i the mean router probability of expert i (the
softmax of the router logits over all experts); 1 when routing is uniform. Hugging Face's Mixtral
counts f_i per top-k slot, which gives k times this. Router z-loss (ST-MoE): the mean over tokens
of logsumexp(router logits)^2. Both leave out padding tokens (`RouterLosses.masking`), are
averaged over the MoE layers (and over every forward pass run while collecting) and weighted 0.01
and 0.001, as MM1 does.

A router is found as mlx-lm's MoE blocks hold it: a block with a `switch_mlp` (its experts), a
Linear `gate` or `router` (quantized or with LoRA) that gives the logits, and `top_k` or
`num_experts_per_tok`. Mixtral, Qwen2/3-MoE, OLMoE, PhiMoE, GPT-OSS, Jamba and Llama 4 fit;
blocks whose router picks the experts itself (DeepSeek's MoEGate) are refused.
"""

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear

from mm1_mlx.errors import UserError
from mm1_mlx.wrappers import ModuleWrapper

ROUTER_NAMES = ("gate", "router")
TOP_K_NAMES = ("top_k", "num_experts_per_tok")
ROUTER_LAYERS = (nn.Linear, nn.QuantizedLinear, LoRALinear)  # LoRA on "mlp" wraps routers too


class MoERouter(NamedTuple):
    """Where an MoE block holds its router (`block[name]`), and how many experts it sends each
    token to."""

    block: nn.Module
    name: str
    top_k: int


class RecordedRouter(ModuleWrapper):
    """A router that also hands its logits to `record`; its parameter paths are the router's."""

    def __init__(self, router: nn.Module, record):
        super().__init__(router)
        self.record = record

    def __call__(self, x: mx.array) -> mx.array:
        logits = self.call_wrapped(x)
        self.record(logits)
        return logits


def find_routers(model: nn.Module) -> list[MoERouter]:
    routers = []
    for path, block in model.named_modules():
        if "switch_mlp" not in block:
            continue
        name = next((n for n in ROUTER_NAMES if isinstance(block.get(n), ROUTER_LAYERS)), None)
        top_k = next((getattr(block, n) for n in TOP_K_NAMES if hasattr(block, n)), None)
        if name is None or top_k is None:
            raise UserError(
                f"{path}: {type(block).__name__} has no router giving logits; "
                "router losses support MoE blocks like Mixtral's and Qwen3-MoE's"
            )
        routers.append(MoERouter(block, name, top_k))
    return routers


class RouterCall(NamedTuple):
    """One MoE layer's router logits [..., num_experts] from one forward pass."""

    logits: mx.array
    top_k: int
    token_mask: mx.array | None  # 1 on real tokens, 0 on padding; None: all tokens count


class RouterLosses:
    """Collects the router logits of a decoder's MoE layers and turns them into MM1's auxiliary
    loss. Run the forward pass inside `with router_losses:` and take `loss()` inside the function
    given to `nn.value_and_grad`, so the gradients reach the routers:

        router_losses = RouterLosses(model.decoder)

        def loss_fn(model, batch):
            with router_losses:
                logits = model(batch.input_ids, batch.pixels)
            return cross_entropy(logits, batch) + router_losses.loss()

    `with router_losses.masking(mask):` instead leaves out padding: `mask` is 1 on real tokens
    and 0 on padding, shaped like the input ids.

    Inside the block each router is a `RecordedRouter`; outside it is the plain router again.
    For a dense decoder it does nothing and its loss is 0.
    """

    def __init__(
        self, decoder: nn.Module, load_balance_coef: float = 0.01, z_loss_coef: float = 0.001
    ):
        self.routers = find_routers(decoder)
        self.num_moe_layers = len(self.routers)
        self.load_balance_coef = load_balance_coef
        self.z_loss_coef = z_loss_coef
        self.router_logits: list[RouterCall] = []  # per MoE layer per forward pass, in call order
        self.token_mask: mx.array | None = None

    def masking(self, token_mask: mx.array | None) -> "RouterLosses":
        """For `with router_losses.masking(mask):` (class docstring)."""
        self.token_mask = token_mask
        return self

    def __enter__(self) -> "RouterLosses":
        # For the forward pass only: a checkpointed layer's recomputation in the backward pass
        # (after the block is left) runs the plain router, whose parameter paths are the same.
        self.router_logits = []
        for block, name, top_k in self.routers:
            block[name] = RecordedRouter(block[name], self.recorder(top_k))
        return self

    def __exit__(self, *exc_info) -> None:
        for block, name, _ in self.routers:
            block[name] = block[name].unwrap()
        self.token_mask = None

    def recorder(self, top_k: int):
        mask = self.token_mask
        return lambda logits: self.router_logits.append(RouterCall(logits, top_k, mask))

    def load_balance_loss(self) -> mx.array:
        return self.mean_over_layers(load_balance)

    def z_loss(self) -> mx.array:
        return self.mean_over_layers(lambda logits, _, mask: z_loss(logits, mask))

    def loss(self) -> mx.array:
        """The weighted sum of both losses, a scalar (0 for a dense decoder)."""
        return self.load_balance_coef * self.load_balance_loss() + self.z_loss_coef * self.z_loss()

    def mean_over_layers(self, loss_fn) -> mx.array:
        if not self.router_logits:
            if self.routers:
                raise RuntimeError("no forward pass ran inside `with router_losses:`")
            return mx.array(0.0)
        losses = [loss_fn(*call) for call in self.router_logits]
        return mx.stack(losses).mean()


def token_weights(logits: mx.array, token_mask: mx.array | None) -> mx.array:
    """[tokens] float weights, 1 for each token that counts, for router logits [..., E]."""
    tokens = logits.size // logits.shape[-1]
    if token_mask is None:
        return mx.ones((tokens,))
    if token_mask.size != tokens:
        raise ValueError(f"router logits for {tokens} tokens but a mask for {token_mask.size}")
    return token_mask.reshape(-1).astype(mx.float32)


def load_balance(logits: mx.array, top_k: int, token_mask: mx.array | None = None) -> mx.array:
    """E * sum_i f_i P_i for one layer's router logits [..., E], over the unmasked tokens."""
    num_experts = logits.shape[-1]
    weights = token_weights(logits, token_mask)
    count = mx.maximum(weights.sum(), 1)
    logits = logits.reshape(-1, num_experts).astype(mx.float32)
    probs = mx.softmax(logits, axis=-1, precise=True)
    mean_probs = (probs * weights[:, None]).sum(axis=0) / count
    chosen = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[:, :top_k].reshape(-1)
    counts = mx.zeros((num_experts,)).at[chosen].add(mx.repeat(weights, top_k))
    fractions = mx.stop_gradient(counts / (count * top_k))
    return num_experts * (fractions * mean_probs).sum()


def z_loss(logits: mx.array, token_mask: mx.array | None = None) -> mx.array:
    """Mean over the unmasked tokens of logsumexp(logits)^2, for router logits [..., E]."""
    weights = token_weights(logits, token_mask)
    squares = mx.square(mx.logsumexp(logits.astype(mx.float32), axis=-1)).reshape(-1)
    return (squares * weights).sum() / mx.maximum(weights.sum(), 1)

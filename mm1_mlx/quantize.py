"""Weight quantization of a model folder, and what it costs in quality.

By default the decoder (every layer mlx-lm's own convert would quantize, with the decoder's own
per-layer rules) and the connector's Linear layers are quantized; the vision encoder's Linear
layers only on request. Convolutions (the patch embedding, the C-Abstractor's RegNet) and layers
whose input width is not a multiple of the group size stay as they are. config.json's
`quantization` holds the settings, plus the settings of any layer the decoder's rules quantize
differently (mlx-lm's format); which layers are quantized is read back from the weights.

The quality report runs the unquantized and the quantized model on a fixed set of prompts
(pictures of the synthetic world, and text) and compares their next-token distributions.
"""

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

from mm1_mlx.errors import UserError
from mm1_mlx.loading import load, load_model, resolve_path, save_model
from mm1_mlx.model import MM1Model
from mm1_mlx.train import synth

# What MLX's affine mode packs (it also takes 1 bit, which is of no use here).
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass
class QualityReport:
    top1_agreement: float  # fraction of positions where the argmax agrees with the reference
    kl_mean: float  # mean KL(p_ref || p_quant) of next-token distributions, nats
    kl_max: float
    positions: int  # how many next-token distributions were compared
    size_bytes_before: int
    size_bytes_after: int  # the weights, as they are saved

    def rows(self) -> list[tuple[str, str]]:
        ratio = self.size_bytes_after / self.size_bytes_before
        return [
            ("top-1 agreement", f"{self.top1_agreement:.1%}"),
            ("KL divergence, mean", f"{self.kl_mean:.3g} nats"),
            ("KL divergence, max", f"{self.kl_max:.3g} nats"),
            ("positions compared", str(self.positions)),
            ("weights before", format_bytes(self.size_bytes_before)),
            ("weights after", f"{format_bytes(self.size_bytes_after)} ({ratio:.0%})"),
        ]


def format_bytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.2f} MB"


def check_settings(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        allowed = ", ".join(map(str, SUPPORTED_BITS))
        raise UserError(f"bits must be one of {allowed}, not {bits}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        allowed = ", ".join(map(str, SUPPORTED_GROUP_SIZES))
        raise UserError(f"group size must be one of {allowed}, not {group_size}")


def quantize_model(
    model: MM1Model, bits: int, group_size: int, vision: bool = False, connector: bool = True
) -> dict[str, Any]:
    """Quantize `model` in place; returns what config.json's `quantization` must hold.

    The decoder always; the connector's Linear layers unless `connector=False` (QLoRA keeps a
    trainable connector in full precision); the vision encoder's only with `vision=True`.
    """
    check_settings(bits, group_size)
    quantization: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    decoder_rule = getattr(model.decoder, "quant_predicate", None)
    linear_parts = [part for part, on in (("connector", connector), ("vision", vision)) if on]

    def fits(module: nn.Module) -> bool:
        return module.weight.shape[-1] % group_size == 0

    def choose(path: str, module: nn.Module) -> bool | dict:
        part, _, inner = path.partition(".")
        if part != "decoder":
            return part in linear_parts and isinstance(module, nn.Linear) and fits(module)
        # As mlx-lm's convert: every quantizable layer that fits, then the decoder's own rules
        # (e.g. MoE routers kept at 8 bits), which see paths inside the decoder.
        if not hasattr(module, "to_quantized") or not fits(module):
            return False
        choice = decoder_rule(inner, module) if decoder_rule else True
        if isinstance(choice, dict):
            quantization[path] = dict(choice)
        return choice

    nn.quantize(model, group_size, bits, class_predicate=choose)
    return quantization


def weights_bytes(model: nn.Module) -> int:
    return sum(array.nbytes for _, array in tree_flatten(model.parameters()))


def quantize_folder(
    src: str | Path,
    out: Path,
    bits: int = 4,
    group_size: int = 64,
    vision: bool = False,
    overwrite: bool = False,
    report: bool = True,
) -> QualityReport | None:
    """Write a quantized copy of the model folder (or hub id) `src` at `out`; with `report`,
    measure it against the unquantized model."""
    check_settings(bits, group_size)  # before anything is loaded
    folder = resolve_path(src)
    if Path(out).resolve() == folder.resolve():
        raise UserError(f"{out}: is the model being quantized; write to another folder")
    model = load_model(folder, lazy=True)  # nothing is read or quantized until it is saved
    if model.config.quantization:
        found = model.config.quantization.get("bits")
        raise UserError(f"{folder}: already quantized ({found}-bit); start from the original")
    model.config.quantization = quantize_model(model, bits, group_size, vision)
    save_model(model, Path(out), folder, overwrite)
    if not report:
        return None
    reference, processor = load(folder, lazy=True)
    return quality_report(reference, model, processor)


def next_token_divergence(
    reference_logits: mx.array, quantized_logits: mx.array
) -> tuple[mx.array, mx.array]:
    """Per position [..., vocab] -> (KL(p_ref || p_quant) in nats, whether the argmaxes agree)."""
    log_p = nn.log_softmax(reference_logits.astype(mx.float32), axis=-1)
    log_q = nn.log_softmax(quantized_logits.astype(mx.float32), axis=-1)
    kl = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    agree = reference_logits.argmax(axis=-1) == quantized_logits.argmax(axis=-1)
    return mx.maximum(kl, 0.0), agree  # rounding can leave -1e-9 where p == q


def quality_report(reference: MM1Model, quantized: MM1Model, processor) -> QualityReport:
    """Compare the two models' next-token distributions on `report_prompts()`."""
    kls, agreements = [], []
    for text, images in report_prompts(reference.config.image_token):
        inputs = processor(text, images)
        ids, pixels = inputs["input_ids"], inputs["pixels"]
        kl, agree = next_token_divergence(reference(ids, pixels), quantized(ids, pixels))
        keep = predicts_text(np.array(ids[0]), reference.config.image_token_id)
        kls.append(np.array(kl[0])[keep])
        agreements.append(np.array(agree[0])[keep])
    kl_all, agree_all = np.concatenate(kls), np.concatenate(agreements)
    return QualityReport(
        top1_agreement=float(agree_all.mean()),
        kl_mean=float(kl_all.mean()),
        kl_max=float(kl_all.max()),
        positions=int(kl_all.size),
        size_bytes_before=weights_bytes(reference),
        size_bytes_after=weights_bytes(quantized),
    )


def predicts_text(ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """Positions whose next token is not an image placeholder (the last one included).

    The model is never asked to predict placeholders, and their distributions (144 per image)
    would swamp the text's.
    """
    return np.append(ids[1:] != image_token_id, True)


def report_prompts(image_token: str) -> list[tuple[str, list[Image.Image]]]:
    """The fixed prompt set: (text with image markers, images), each text with its answer.
    The pictures are the synthetic world's (docs/synthetic-world.md): a shape scene, a screen
    drawn by the other renderer, and two scenes to compare."""
    rng = random.Random(0)
    shapes, screen = synth.sample_shape_scene(rng), synth.sample_screen_scene(rng)
    first, second = synth.sample_pair(rng)
    describe = synth.shape_questions(shapes)[0]
    ground = next(qa for qa in synth.screen_questions(screen) if qa.task == "ground_button")
    compare = synth.compare_question(first, second)
    prompts = [
        (f"{{0}}\n{describe.question} {describe.answer}.", [synth.render(shapes)]),
        (f"{{0}}\n{ground.question} {ground.answer}", [synth.render(screen, "alt", rng)]),
        (
            f"{{0}}{{0}}\n{compare.question} {compare.answer}",
            [synth.render(first), synth.render(second)],
        ),
        ("The capital of France is Paris, the capital of Italy is Rome, and of Spain, Madrid.", []),
        (
            "def fibonacci(n):\n    if n < 2:\n        return n\n"
            "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
            [],
        ),
    ]
    return [(text.format(image_token), images) for text, images in prompts]

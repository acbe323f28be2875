"""Inference speed of mm1-mlx next to its peers, fp32 on MLX's CPU backend, in one process.

    python benchmarks/inference.py [--quick | --tiny] [--json results.json]

1. Decode tokens/s: mm1-mlx's `generate_tokens` vs mlx-lm's `generate_step` on the same decoder
   (the very same weights) and the same text-only prompt, greedy, EOS ignored.
2. Time to first token for one image: mm1-mlx (ViT -> C-Abstractor, 144 image tokens) vs
   mlx-vlm's LLaVA (ViT -> 2-layer GELU MLP, 576 image tokens), same ViT and decoder sizes, both
   through their own generation paths: image encoding + connector + prefill + first sample.
3. Peak memory of each measurement.
4. The 4-bit model (`quantize_model`, group size 64): decode tokens/s and weights on disk.
5. The same LLaVA checkpoint on both sides: a llava-hf folder (LlavaForConditionalGeneration
   of the same sizes, random weights, saved by transformers in the hub's layout) converted by
   `mm1-mlx convert --vlm` and loaded by mlx-vlm as it is; the same prompt ids and pixels, time
   to first token and decode tokens/s, and whether the greedy answers agree token for token.

Every model is randomly initialised here (no downloads). The sides of each comparison run
alternately, after a warm-up; the table gives each side's median and the median (and range) of
the rounds' ratios mm1-mlx / peer. `--json` also keeps every round.
"""

import mm1_mlx  # noqa: F401  (first: it loads OpenBLAS, which must precede mlx.core)

# isort: split

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.generate import generation_stream as mlx_lm_generation_stream
from mlx_vlm import load as mlx_vlm_load
from mlx_vlm.generate import generate_step as mlx_vlm_generate_step
from mlx_vlm.generate.common import generation_stream as mlx_vlm_generation_stream
from mlx_vlm.models import llava
from PIL import Image

from mm1_mlx.config import ConnectorConfig, MM1Config, VisionConfig
from mm1_mlx.convert.vlm import convert_vlm
from mm1_mlx.generate import GenerationSettings, generate_tokens
from mm1_mlx.loading import DEMO_MODEL, save_weights
from mm1_mlx.model import MM1Model
from mm1_mlx.processor import PromptInputs, foreign_model_type_quiet
from mm1_mlx.quantize import quantize_model, weights_bytes


@dataclass
class Sizes:
    """ViT-L/14 at 336px, Honeybee's C-Abstractor, a TinyLlama-sized llama decoder."""

    image_size: int = 336
    patch_size: int = 14  # 24x24 = 576 patches: LLaVA's image tokens
    vit_width: int = 1024
    vit_layers: int = 24
    vit_heads: int = 16
    vit_mlp: int = 4096
    connector_hidden: int = 1024
    connector_depth: int = 3
    image_tokens: int = 144  # mm1-mlx's image tokens (the C-Abstractor's output)
    llm_hidden: int = 1024
    llm_layers: int = 16
    llm_heads: int = 16
    llm_kv_heads: int = 4
    llm_intermediate: int = 2816
    vocab: int = 32000
    prompt_text_tokens: int = 32
    new_tokens: int = 32
    rounds: int = 5

    @property
    def image_token_id(self) -> int:
        return self.vocab - 1  # never drawn for the text (see prompt_text)


# Small models on the same 24x24 patch grid and 144 image tokens, for development.
QUICK = Sizes(
    vit_width=256,
    vit_layers=4,
    vit_heads=4,
    vit_mlp=1024,
    connector_hidden=256,
    connector_depth=1,
    llm_hidden=256,
    llm_layers=4,
    llm_heads=4,
    llm_kv_heads=2,
    llm_intermediate=704,
    vocab=8000,
    rounds=2,
)

# Seconds, not a measurement: the test suite's smoke test of this script.
TINY = Sizes(
    image_size=56,
    vit_width=64,
    vit_layers=2,
    vit_heads=2,
    vit_mlp=128,
    connector_hidden=64,
    connector_depth=1,
    image_tokens=4,
    llm_hidden=64,
    llm_layers=2,
    llm_heads=2,
    llm_kv_heads=1,
    llm_intermediate=128,
    vocab=512,
    prompt_text_tokens=8,
    new_tokens=4,
    rounds=1,
)
SIZES = {"full": Sizes(), "quick": QUICK, "tiny": TINY}


def text_config(sizes: Sizes) -> dict:
    """mlx-lm's llama arguments (untied embeddings, like TinyLlama)."""
    return dict(
        model_type="llama",
        hidden_size=sizes.llm_hidden,
        num_hidden_layers=sizes.llm_layers,
        num_attention_heads=sizes.llm_heads,
        num_key_value_heads=sizes.llm_kv_heads,
        intermediate_size=sizes.llm_intermediate,
        vocab_size=sizes.vocab,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )


def build_mm1(sizes: Sizes) -> MM1Model:
    vision = VisionConfig(
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        width=sizes.vit_width,
        layers=sizes.vit_layers,
        heads=sizes.vit_heads,
        mlp_dim=sizes.vit_mlp,
        act="quick_gelu",
        feature_layer=-2,  # as LLaVA's, so both encoders run the same blocks
    )
    connector = ConnectorConfig(
        input_dim=sizes.vit_width,
        output_dim=sizes.llm_hidden,
        num_input_tokens=vision.num_patches,
        num_tokens=sizes.image_tokens,
        hidden_dim=sizes.connector_hidden,
        depth=sizes.connector_depth,
    )
    config = MM1Config(
        vision_config=vision,
        connector_config=connector,
        text_config=text_config(sizes),
        image_token_id=sizes.image_token_id,
        num_image_tokens=sizes.image_tokens,
    )
    model = MM1Model(config)
    mx.eval(model.parameters())
    return model


def build_llava(sizes: Sizes) -> llava.Model:
    vision = llava.VisionConfig(
        model_type="clip_vision_model",
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        hidden_size=sizes.vit_width,
        num_hidden_layers=sizes.vit_layers,
        num_attention_heads=sizes.vit_heads,
        intermediate_size=sizes.vit_mlp,
    )
    text = llava.TextConfig(**text_config(sizes))
    config = llava.ModelConfig(
        text_config=text,
        vision_config=vision,
        model_type="llava",
        image_token_index=sizes.image_token_id,
        vocab_size=sizes.vocab,
        vision_feature_layer=-2,
    )
    model = llava.Model(config)
    mx.eval(model.parameters())
    return model


class IdDetokenizer:
    """Streams each token as " <id>": generate_tokens needs a detokenizer, not a vocabulary."""

    def reset(self) -> None:
        self.last_segment = ""

    def add_token(self, token: int) -> None:
        self.last_segment = f" {token}"

    def finalize(self) -> None:
        self.last_segment = ""


# What generate_tokens reads of a processor. No EOS ids: every run makes all its tokens.
PROCESSOR = SimpleNamespace(
    tokenizer=SimpleNamespace(detokenizer=IdDetokenizer(), eos_token_ids=[])
)


def prompt_text(sizes: Sizes) -> list[int]:
    rng = np.random.default_rng(0)
    return rng.integers(1, sizes.image_token_id, sizes.prompt_text_tokens).tolist()


def random_pixels(sizes: Sizes) -> np.ndarray:
    """One preprocessed image, [1, size, size, 3] (NHWC, as the processor makes it)."""
    rng = np.random.default_rng(1)
    return rng.standard_normal((1, sizes.image_size, sizes.image_size, 3), dtype=np.float32)


@dataclass
class Run:
    ttft_s: float
    decode_tps: float | None  # None for a single token
    peak_gb: float


@dataclass
class Side:
    """One side of a comparison: how to start its generation stream, and its weights' size."""

    start: Callable[[], Iterator]
    weights_bytes: int


def wait_for_generation_streams() -> None:
    """Both generate_steps compute one step ahead; let it finish before the next measurement."""
    mx.synchronize(mlx_lm_generation_stream)
    mx.synchronize(mlx_vlm_generation_stream)


def measure(side: Side, new_tokens: int) -> Run:
    """Time a generation stream: to its first item, then per item up to its last. Peak memory
    counts the side's weights plus what the generation allocated on top of what was there."""
    wait_for_generation_streams()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    times = [time.perf_counter() for _ in side.start()]
    wait_for_generation_streams()
    decode_s = times[-1] - times[0]
    decode_tps = (new_tokens - 1) / decode_s if new_tokens > 1 else None
    peak = side.weights_bytes + mx.get_peak_memory() - before
    return Run(times[0] - start, decode_tps, peak / 1e9)


def mm1_side(model: MM1Model, inputs: PromptInputs, new_tokens: int, weights: nn.Module) -> Side:
    settings = GenerationSettings(max_tokens=new_tokens)
    return Side(
        lambda: generate_tokens(model, PROCESSOR, inputs, settings, model.make_cache()),
        weights_bytes(weights),
    )


def mlx_lm_side(decoder: nn.Module, prompt: list[int], new_tokens: int) -> Side:
    return Side(
        lambda: mlx_lm_generate_step(mx.array(prompt), decoder, max_tokens=new_tokens),
        weights_bytes(decoder),
    )


def vlm_side(model: nn.Module, prompt: list[int], pixels: np.ndarray, new_tokens: int) -> Side:
    """mlx-vlm's generate_step, fed what its LLaVA processor makes: NCHW pixels, and the image
    token repeated once per image token."""
    input_ids = mx.array([prompt])
    pixel_values = mx.array(pixels.transpose(0, 3, 1, 2))
    return Side(
        lambda: mlx_vlm_generate_step(
            input_ids, model, pixel_values, None, max_tokens=new_tokens, temperature=0.0
        ),
        weights_bytes(model),
    )


def write_llava_checkpoint(sizes: Sizes, folder: Path) -> None:
    """A llava-hf folder of these sizes, random weights, as the hub's uploads hold it: built and
    saved by transformers, the vision tower's weights under `vision_tower.vision_model.` (as
    mlx-vlm reads them), the demo model's tokenizer, a CLIP image processor."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    with foreign_model_type_quiet():
        tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    text = LlamaConfig(**{**text_config(sizes), "vocab_size": max(sizes.vocab, len(tokenizer))})
    vision = CLIPVisionConfig(
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        hidden_size=sizes.vit_width,
        num_hidden_layers=sizes.vit_layers,
        num_attention_heads=sizes.vit_heads,
        intermediate_size=sizes.vit_mlp,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(str(folder))
    weights = mx.load(str(folder / "model.safetensors"))
    hub_names = {
        name.replace("vision_tower.", "vision_tower.vision_model.", 1): value
        for name, value in weights.items()
    }
    mx.save_safetensors(str(folder / "model.safetensors"), hub_names, {"format": "pt"})
    crop = {"height": sizes.image_size, "width": sizes.image_size}
    image_processor = CLIPImageProcessor(size={"shortest_edge": sizes.image_size}, crop_size=crop)
    processor = LlavaProcessor(image_processor, tokenizer, patch_size=sizes.patch_size)
    processor.save_pretrained(str(folder))


def random_picture(sizes: Sizes) -> Image.Image:
    rng = np.random.default_rng(2)
    side = sizes.image_size + 17  # resized and cropped on the way in
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def same_llava_checkpoint(sizes: Sizes) -> dict:
    """Part 5 (module docstring): one llava-hf folder, converted by mm1-mlx and read by mlx-vlm."""
    with tempfile.TemporaryDirectory() as tmp:
        source, converted = Path(tmp) / "llava-hf", Path(tmp) / "converted"
        write_llava_checkpoint(sizes, source)
        convert_vlm(source, converted)
        ours, processor = mm1_mlx.load(converted)
        theirs, _ = mlx_vlm_load(str(source))
    words = " ".join(["what is in this picture"] * sizes.prompt_text_tokens)
    inputs = processor.encode(f"<image>\n{words}", [random_picture(sizes)])
    sides = {
        "mm1-mlx": mm1_side(ours, inputs, sizes.new_tokens, ours),
        "mlx-vlm": vlm_side(theirs, inputs.input_ids, inputs.tiles, sizes.new_tokens),
    }
    answers = {  # the same greedy tokens (this also warms both up)
        "mm1-mlx": list(sides["mm1-mlx"].start())[-1].tokens,
        "mlx-vlm": [int(token) for token, _ in sides["mlx-vlm"].start()],
    }
    runs = side_by_side(sides, sizes.new_tokens, sizes.rounds)
    return {
        "runs": {name: [asdict(run) for run in side] for name, side in runs.items()},
        "prompt_tokens": len(inputs.input_ids),
        "same_answer": answers["mm1-mlx"] == answers["mlx-vlm"],
    }


def side_by_side(sides: dict[str, Side], new_tokens: int, rounds: int) -> dict[str, list[Run]]:
    """Warm each side up, then run them in turn `rounds` times, every other round in reverse
    order (so neither side always follows the other); each side's Runs, round by round."""
    for side in sides.values():
        measure(side, new_tokens)
    runs = {name: [] for name in sides}
    for index in range(rounds):
        order = list(sides) if index % 2 == 0 else list(sides)[::-1]
        for name in order:
            runs[name].append(measure(sides[name], new_tokens))
    return runs


def weights_on_disk(model: MM1Model) -> int:
    """Bytes of the model's safetensors, as mm1-mlx saves them."""
    with tempfile.TemporaryDirectory() as folder:
        save_weights(Path(folder), dict(tree_flatten(model.parameters())))
        return sum(file.stat().st_size for file in Path(folder).iterdir())


def quantized_copy(model: MM1Model) -> MM1Model:
    """A 4-bit copy of `model` (the unquantized ViT's arrays are shared, not copied)."""
    copy = MM1Model(model.config)  # lazily initialised: load_weights replaces it unevaluated
    copy.load_weights(tree_flatten(model.parameters()))
    quantize_model(copy, bits=4, group_size=64)
    mx.eval(copy.parameters())
    return copy


def benchmark(sizes: Sizes) -> dict:
    text = prompt_text(sizes)
    pixels = random_pixels(sizes)
    model = build_mm1(sizes)
    model_4bit = quantized_copy(model)

    print("decode: mm1-mlx vs mlx-lm vs mm1-mlx 4-bit ...", flush=True)
    text_only = PromptInputs(text, None, [], [])
    decode = side_by_side(
        {
            "mm1-mlx": mm1_side(model, text_only, sizes.new_tokens, model.decoder),
            "mlx-lm": mlx_lm_side(model.decoder, text, sizes.new_tokens),
            "mm1-mlx 4-bit": mm1_side(model_4bit, text_only, sizes.new_tokens, model_4bit.decoder),
        },
        sizes.new_tokens,
        sizes.rounds,
    )

    print("time to first token, one image: mm1-mlx vs mlx-vlm LLaVA ...", flush=True)
    llava_model = build_llava(sizes)
    patches = (sizes.image_size // sizes.patch_size) ** 2
    image_tokens = [sizes.image_token_id] * sizes.image_tokens
    one_image = PromptInputs(image_tokens + text, pixels, ["image"], [pixels.shape[1:3]])
    ttft = side_by_side(
        {
            "mm1-mlx": mm1_side(model, one_image, 1, model),
            "mlx-vlm LLaVA": vlm_side(
                llava_model, [sizes.image_token_id] * patches + text, pixels, 1
            ),
        },
        1,
        sizes.rounds,
    )

    print("the same llava-hf checkpoint: mm1-mlx (converted) vs mlx-vlm ...", flush=True)
    llava_hf = same_llava_checkpoint(sizes)
    print("weights on disk ...", flush=True)
    return {
        "llava_hf": llava_hf,
        "decode": {name: [asdict(run) for run in runs] for name, runs in decode.items()},
        "ttft": {name: [asdict(run) for run in runs] for name, runs in ttft.items()},
        "image_tokens": {"mm1": sizes.image_tokens, "llava": patches},
        "weights_bytes": {"fp32": weights_on_disk(model), "4-bit": weights_on_disk(model_4bit)},
    }


# The table's rows: measurement (with the image token counts filled in), part of the results,
# mm1-mlx's side, the peer, value, format.
ROWS = [
    ("decode tok/s, fp32", "decode", "mm1-mlx", "mlx-lm", "decode_tps", ".1f"),
    ("decode peak memory (GB)", "decode", "mm1-mlx", "mlx-lm", "peak_gb", ".2f"),
    (
        "time to first token, one image (s), {mm1} vs {llava} image tokens",
        "ttft",
        "mm1-mlx",
        "mlx-vlm LLaVA",
        "ttft_s",
        ".2f",
    ),
    ("time to first token, peak memory (GB)", "ttft", "mm1-mlx", "mlx-vlm LLaVA", "peak_gb", ".2f"),
    ("decode tok/s, 4-bit (peer: fp32)", "decode", "mm1-mlx 4-bit", "mm1-mlx", "decode_tps", ".1f"),
]


# The same llava-hf checkpoint on both sides: measurement, value, format.
LLAVA_HF_ROWS = [
    ("same llava-hf checkpoint: time to first token (s)", "ttft_s", ".2f"),
    ("same llava-hf checkpoint: decode tok/s", "decode_tps", ".1f"),
    ("same llava-hf checkpoint: peak memory (GB)", "peak_gb", ".2f"),
]


def table_row(name: str, ours: list[float], peer: str, theirs: list[float], fmt: str) -> str:
    """Medians of per-round values, and the median (and range) of the rounds' ratios: the runs
    of a round are back to back, so their ratio is the least disturbed by the machine's load."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    ratio = f"{statistics.median(ratios):.2f}"
    if len(ratios) > 1:
        ratio += f" ({min(ratios):.2f}-{max(ratios):.2f})"
    ours_value, their_value = statistics.median(ours), statistics.median(theirs)
    return f"| {name} | {ours_value:{fmt}} | {peer}: {their_value:{fmt}} | {ratio} |"


def table(results: dict) -> str:
    """The markdown table: mm1-mlx, its peer, and mm1-mlx / peer, per measurement."""
    lines = ["| measurement | mm1-mlx | peer | mm1-mlx / peer |", "|---|---|---|---|"]
    for name, part, ours, peer, key, fmt in ROWS:
        name = name.format(**results["image_tokens"])
        ours_values = [run[key] for run in results[part][ours]]
        peer_values = [run[key] for run in results[part][peer]]
        lines.append(table_row(name, ours_values, peer, peer_values, fmt))
    llava_hf = results["llava_hf"]["runs"]
    for name, key, fmt in LLAVA_HF_ROWS:
        ours, theirs = ([run[key] for run in llava_hf[side]] for side in ("mm1-mlx", "mlx-vlm"))
        lines.append(table_row(name, ours, "mlx-vlm", theirs, fmt))
    weights = results["weights_bytes"]
    name = "weights on disk (GB), whole model, 4-bit (peer: fp32)"
    lines.append(
        table_row(name, [weights["4-bit"] / 1e9], "mm1-mlx", [weights["fp32"] / 1e9], ".2f")
    )
    return "\n".join(lines)


def describe(sizes: Sizes) -> str:
    """What was measured, as markdown bullets."""
    grid = sizes.image_size // sizes.patch_size
    return "\n".join(
        [
            f"- fp32 on MLX {mx.__version__}'s CPU backend, BLAS: "
            f"{mm1_mlx.OPENBLAS or 'MLX bundled (slow)'}; random weights",
            f"- vision (both): ViT/{sizes.patch_size} at {sizes.image_size}px "
            f"({grid}x{grid} patches), width {sizes.vit_width}, {sizes.vit_layers} layers, "
            f"{sizes.vit_heads} heads, mlp {sizes.vit_mlp}, quick_gelu, features of the "
            "second-to-last layer",
            f"- connector: mm1-mlx C-Abstractor, hidden {sizes.connector_hidden}, depth "
            f"{sizes.connector_depth} -> {sizes.image_tokens} tokens; LLaVA: 2-layer GELU MLP "
            f"-> {grid * grid} tokens",
            f"- decoder (both): llama, hidden {sizes.llm_hidden}, {sizes.llm_layers} layers, "
            f"{sizes.llm_heads} heads ({sizes.llm_kv_heads} kv), intermediate "
            f"{sizes.llm_intermediate}, vocab {sizes.vocab}, untied embeddings",
            f"- prompt: {sizes.prompt_text_tokens} text tokens (after the image's tokens); "
            f"decode: {sizes.new_tokens} new tokens, greedy, EOS ignored; medians of "
            f"{sizes.rounds} alternating rounds after a warm-up; mm1-mlx / peer: the median "
            "(and range) of the rounds' ratios",
            "- peak memory: the weights a run reads plus what the run allocates",
            "- 4-bit: quantize_model(bits=4, group_size=64), which quantizes the decoder and "
            "the connector's Linear layers; the ViT and convolutions stay fp32",
            "- same llava-hf checkpoint: LlavaForConditionalGeneration with the ViT and decoder "
            "above (MLP projector, all patch tokens) saved by transformers; mm1-mlx runs it "
            "converted (`mm1-mlx convert --vlm`), mlx-vlm as it is, on the same prompt ids and "
            "pixels",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, for development")
    parser.add_argument("--tiny", action="store_true", help="seconds: a smoke test, no result")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    sizes = SIZES[size]
    started = time.perf_counter()
    results = benchmark(sizes)
    print()
    print(describe(sizes))
    print()
    print(table(results))
    same = results["llava_hf"]["same_answer"]
    answers = "equal" if same else "DIFFERENT"
    print(f"\nsame llava-hf checkpoint, greedy answers token for token: {answers}")
    command = "python benchmarks/inference.py" + ("" if size == "full" else f" --{size}")
    print(f"\n`{command}` ({time.perf_counter() - started:.0f} s)")
    if args.json:
        results = {"command": command, "sizes": asdict(sizes), **results}
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

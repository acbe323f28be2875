"""Training throughput: mm1-mlx in one process and on 2 ranks vs PyTorch (transformers) on the
same small decoder, CPU fp32, and the whole MM1 model's step time split into vision, connector
and decoder.

    python benchmarks/training.py [--quick | --tiny] [--rounds 2] [--json PATH]

Each side runs in processes of its own (so each peak RSS is its own), the sides alternating
round by round, and the medians are compared. All train the same Llama configuration with AdamW
on the same global batch of random tokens: mm1-mlx with its own training step
(mm1_mlx.train.trainer.make_train_step) in one process with its default threads, and as 2 ranks
started by its `--ranks` launcher (each rank half the rows, one BLAS thread each on a 2-core
machine); PyTorch with its default threads. Each side also times the forward and backward pass
alone (no gradient exchange, no optimizer update), and one decoder layer's softmax and SiLU are
timed in MLX and in PyTorch: where the time goes when mm1-mlx is slower.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

DECODER = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=8192,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
QUICK = dict(DECODER, hidden_size=256, intermediate_size=704, num_hidden_layers=4)
# Seconds, not a measurement: the test suite's smoke test of this script.
TINY = dict(DECODER, hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=512)
DECODERS = {"full": DECODER, "quick": QUICK, "tiny": TINY}
SIDES = {
    "mlx": "mm1-mlx, 1 process",
    "mlx-2": "mm1-mlx, 2 ranks (--ranks 2)",
    "torch": "PyTorch (transformers)",
}
# The MM1 step split: ViT width and layers, connector width, images of 224 px, sequence length.
SPLITS = {
    "full": (768, 12, 1024, 4, 512),
    "quick": (384, 4, 256, 4, 512),
    "tiny": (64, 1, 64, 1, 64),
}


def measure_torch(config: dict, batch: int, seq_len: int, steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    ids = torch.randint(0, config["vocab_size"], (batch, seq_len + 1))

    def forward_backward():
        model.zero_grad()
        model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss.backward()

    def step():
        forward_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()  # forward_backward() clears the gradients first

    result = time_steps(step, steps, batch * seq_len)
    result["forward_backward_s"] = seconds_per_call(forward_backward, steps)
    return result


def measure_mlx(config: dict, batch: int, seq_len: int, steps: int) -> dict:
    import mm1_mlx  # noqa: F401  (OpenBLAS before mlx.core)

    # isort: split
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from mm1_mlx.train.data import Batch
    from mm1_mlx.train.optim import make_optimizer, make_schedule
    from mm1_mlx.train.ranks import init_group
    from mm1_mlx.train.trainer import loss_sums, make_train_step

    group = init_group()  # with --ranks: this rank's rows of the same global batch
    model = tiny_mm1(dict(config, model_type="llama"))
    mx.eval(model.parameters())
    recipe = benchmark_recipe()
    optimizer = make_optimizer(model, "adamw", make_schedule(1e-4, 1000), betas=(0.9, 0.95))
    step_fn = make_train_step(model, optimizer, recipe, group, smoothing=None)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config["vocab_size"], (batch, seq_len + 1)).astype(np.int32)
    rows = batch // group.size()
    ids = ids[group.rank() * rows : (group.rank() + 1) * rows]
    lengths = np.full(rows, seq_len, np.int32)
    data = Batch(ids[:, :-1], ids[:, 1:], np.ones((rows, seq_len), np.float32), None, lengths)
    result = time_steps(lambda: step_fn([data]), steps, batch * seq_len)
    # The same rows' forward and backward alone: what a step costs without the gradient
    # exchange and the optimizer update (the most 2 ranks can gain over 1 process).
    loss_and_grad = nn.value_and_grad(model, lambda model: loss_sums(model, data, 0.0)[0])
    result["forward_backward_s"] = seconds_per_call(lambda: mx.eval(loss_and_grad(model)), steps)
    # The ranks' memory together, as one process's is compared with it.
    result["peak_rss_gb"] = mx.distributed.all_sum(result["peak_rss_gb"], group=group).item()
    return result


def benchmark_recipe():
    from mm1_mlx.train.recipe import Recipe

    return Recipe(model="", out="")


def tiny_mm1(text_config: dict, vision: dict | None = None, connector: dict | None = None):
    from mm1_mlx.config import ConnectorConfig, MM1Config, VisionConfig
    from mm1_mlx.model import MM1Model

    vision_config = VisionConfig(**(vision or dict(width=64, layers=1, heads=2, mlp_dim=128)))
    connector_config = ConnectorConfig(
        input_dim=vision_config.width,
        output_dim=text_config["hidden_size"],
        num_input_tokens=vision_config.num_patches,
        **(connector or dict(hidden_dim=64, depth=1, num_tokens=144)),
    )
    config = MM1Config(
        vision_config=vision_config,
        connector_config=connector_config,
        text_config=text_config,
        image_token_id=text_config["vocab_size"] - 1,
        num_image_tokens=connector_config.num_tokens,
    )
    return MM1Model(config)


def time_steps(step, steps: int, tokens_per_step: int) -> dict:
    import resource

    seconds = seconds_per_call(step, steps)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "step_s": seconds,
        "tokens_per_s": tokens_per_step / seconds,
        "peak_rss_gb": peak_rss / 1e9,
    }


def seconds_per_call(call, calls: int) -> float:
    call()  # warm-up (allocations, kernels)
    began = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - began) / calls


def elementwise_ops(size: str, batch: int, seq_len: int) -> dict:
    """Milliseconds of the decoder's transcendental ops, one layer's forward, in MLX and in
    PyTorch (each with its default threads): the attention softmax and the MLP's SiLU."""
    import mm1_mlx  # noqa: F401  (OpenBLAS before mlx.core)

    # isort: split
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    import torch

    config = DECODERS[size]
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((batch, config["num_attention_heads"], seq_len, seq_len))
    hidden = rng.standard_normal((batch, seq_len, config["intermediate_size"]))
    ops = {
        "softmax": (scores, lambda x: mx.softmax(x, axis=-1), lambda x: torch.softmax(x, -1)),
        "SiLU": (hidden, nn.silu, torch.nn.functional.silu),
    }
    results = {}
    for name, (values, mlx_op, torch_op) in ops.items():
        values = values.astype(np.float32)
        mlx_values, torch_values = mx.array(values), torch.from_numpy(values)
        mlx_s = seconds_per_call(lambda op=mlx_op, x=mlx_values: mx.eval(op(x)), 5)
        torch_s = seconds_per_call(lambda op=torch_op, x=torch_values: op(x), 5)
        results[name] = {
            "shape": list(values.shape),
            "mlx_ms": mlx_s * 1e3,
            "torch_ms": torch_s * 1e3,
        }
    return results


def split_mm1_step(size: str) -> dict:
    """Forward + backward time of each part of an MM1 model on one batch with images."""
    import mm1_mlx  # noqa: F401  (OpenBLAS before mlx.core)

    # isort: split
    import mlx.core as mx
    import mlx.nn as nn

    text = dict(DECODERS[size], model_type="llama")
    width, layers, connector_width, images, seq_len = SPLITS[size]
    vision = dict(image_size=224, patch_size=14, width=width, layers=layers, heads=width // 64)
    vision["mlp_dim"] = 4 * width
    model = tiny_mm1(text, vision, dict(hidden_dim=connector_width, depth=3, num_tokens=64))
    mx.eval(model.parameters())
    pixels = mx.random.normal((images, 224, 224, 3))
    features = model.vision(pixels)
    embeddings = mx.random.normal((1, seq_len, text["hidden_size"]))
    ids = mx.random.randint(0, text["vocab_size"] - 1, (1, seq_len))

    def part_loss(module, fn, x):
        return nn.value_and_grad(module, lambda m, x: fn(m, x).astype(mx.float32).mean())(module, x)

    parts = {
        "vision": lambda: part_loss(model.vision, lambda m, x: m(x), pixels),
        "connector": lambda: part_loss(
            model.connector, lambda m, x: m(x), mx.stop_gradient(features)
        ),
        "decoder": lambda: part_loss(
            model.decoder, lambda m, x: m(ids, input_embeddings=x), embeddings
        ),
    }
    times = {}
    for name, run in parts.items():
        mx.eval(run())
        began = time.perf_counter()
        for _ in range(3):
            mx.eval(run())
        times[name] = (time.perf_counter() - began) / 3
    total = sum(times.values())
    shape = f"{images} images of 224px ({vision['layers']}-layer ViT width {vision['width']}), "
    shape += f"C-Abstractor 64 tokens each, {seq_len}-token sequence"
    return {"shape": shape, **{k: {"s": v, "share": v / total} for k, v in times.items()}}


def run_child(side: str, size: str) -> dict:
    """One side's measurement in processes of its own: "mlx" and "torch" in one process with
    their default threads, "mlx-2" as two ranks (mm1-mlx's --ranks launcher)."""
    from mm1_mlx.train.ranks import run_ranks

    framework = "torch" if side == "torch" else "mlx"
    command = [sys.executable, __file__, "--child", framework, "--size", size]
    with tempfile.TemporaryFile("w+") as out:
        code = (
            run_ranks(2, command, out) if side == "mlx-2" else subprocess.call(command, stdout=out)
        )
        if code:
            raise SystemExit(f"{side} failed (exit code {code})")
        out.seek(0)
        return json.loads(out.read().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_const", const="quick", dest="size",
                       help="a smaller decoder")  # fmt: skip
    sizes.add_argument("--tiny", action="store_const", const="tiny", dest="size",
                       help="seconds: a smoke test, no result")  # fmt: skip
    sizes.add_argument("--size", choices=DECODERS, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.size or "full"
    config = DECODERS[size]
    batch, seq_len, steps = (2, 32, 1) if size == "tiny" else (4, 256, 3)
    if args.child:
        measure = measure_mlx if args.child == "mlx" else measure_torch
        print(json.dumps(measure(config, batch, seq_len, steps)))
        return

    rounds = {side: [] for side in SIDES}
    for index in range(args.rounds):  # alternating order, so no side always follows another
        for side in list(SIDES) if index % 2 == 0 else list(SIDES)[::-1]:
            rounds[side].append(run_child(side, size))
    summary = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in rounds.items()
    }
    split = split_mm1_step(size)
    ops = elementwise_ops(size, batch, seq_len)
    shape = f"Llama {config['num_hidden_layers']} layers x {config['hidden_size']}, vocab "
    shape += f"{config['vocab_size']}; batch {batch} x {seq_len} tokens; AdamW; fp32 CPU; "
    shape += f"medians of {args.rounds} rounds"
    print(f"Training step, {shape}")
    print("| | " + " | ".join(SIDES.values()) + " |")
    print("|---|" + "---|" * len(SIDES))
    rows = [("tokens/s", "tokens_per_s", ".0f", ""), ("step time", "step_s", ".2f", " s")]
    rows.append(("forward + backward alone", "forward_backward_s", ".2f", " s"))
    rows.append(("peak RSS (all processes)", "peak_rss_gb", ".2f", " GB"))
    for label, key, fmt, unit in rows:
        print(f"| {label} | " + " | ".join(f"{summary[s][key]:{fmt}}{unit}" for s in SIDES) + " |")
    baseline = summary["mlx"]["tokens_per_s"]
    print("| tokens/s / mm1-mlx 1 process | " + " | ".join(
        f"{summary[s]['tokens_per_s'] / baseline:.2f}x" for s in SIDES) + " |")  # fmt: skip
    print("\nOne decoder layer's transcendental ops, forward (ms, default threads):")
    print("| op | shape | MLX | PyTorch | MLX / PyTorch |\n|---|---|---|---|---|")
    for name, op in ops.items():
        shape = "x".join(map(str, op["shape"]))
        print(f"| {name} | {shape} | {op['mlx_ms']:.1f} | {op['torch_ms']:.1f} | "
              f"{op['mlx_ms'] / op['torch_ms']:.1f}x |")  # fmt: skip
    print(f"\nMM1 step split ({split['shape']}):")
    for part in ("vision", "connector", "decoder"):
        print(f"  {part:9s} {split[part]['s']:.3f} s ({split[part]['share']:.0%})")
    print(f"\ncommand: python benchmarks/training.py{'' if size == 'full' else ' --' + size}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"decoder": summary, "elementwise": ops, "mm1_split": split}, file, indent=2)


if __name__ == "__main__":
    main()

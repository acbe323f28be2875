"""The `mm1-mlx` command line."""

import sys
from pathlib import Path
from typing import Annotated

import typer

from mm1_mlx.errors import UserError

app = typer.Typer(
    help="MM1-style multimodal LLMs in MLX: convert, train, quantize and chat.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """MM1-style multimodal LLMs in MLX."""


@app.command()
def convert(
    vision: Annotated[
        str,
        typer.Option(
            help="Vision encoder: open_clip file/folder, HF CLIP or SigLIP folder, or hub id."
        ),
    ],
    llm: Annotated[str, typer.Option(help="Decoder: an HF causal-LM folder or hub id.")],
    out: Annotated[Path, typer.Option(help="Output model folder.")],
    connector: Annotated[
        str | None, typer.Option(help="Honeybee checkpoint with a C-Abstractor; fresh if omitted.")
    ] = None,
    connector_type: Annotated[
        str, typer.Option(help="c-abstractor, avg-pool or attn-pool.")
    ] = "c-abstractor",
    num_image_tokens: Annotated[int, typer.Option(help="Image tokens per image (a square).")] = 144,
    dtype: Annotated[
        str | None, typer.Option(help="float32, float16 or bfloat16 (default: keep).")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Input resolution (position embeddings are interpolated).")
    ] = None,
    feature_layer: Annotated[
        int | None, typer.Option(help="Encoder hidden state fed to the connector (-1: last block).")
    ] = None,
    vision_heads: Annotated[
        int | None, typer.Option(help="open_clip without open_clip_config.json: attention heads.")
    ] = None,
    vision_act: Annotated[
        str | None, typer.Option(help="open_clip without config: quick_gelu or gelu.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Assemble an MM1 model folder from PyTorch-format vision, LLM and connector weights."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from mm1_mlx.convert.assemble import convert_model

    overrides = {
        "image_size": image_size,
        "feature_layer": feature_layer,
        "heads": vision_heads,
        "act": vision_act,
    }
    steps = ["vision encoder", "language model", "connector", "writing"]
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True
    ) as progress:
        task = progress.add_task("converting", total=len(steps))

        def step(name: str) -> None:
            progress.update(task, description=f"converting: {name}", completed=steps.index(name))

        config = convert_model(
            vision,
            llm,
            out,
            connector=connector,
            connector_type=connector_type,
            num_image_tokens=num_image_tokens,
            dtype=dtype,
            vision_overrides={k: v for k, v in overrides.items() if v is not None},
            overwrite=force,
            step=step,
        )
        progress.update(task, completed=len(steps))
    vision = config.vision_config
    typer.echo(
        f"wrote {out}: {vision.model_type} ViT {vision.width}x{vision.layers}, "
        f"{config.connector_config.model_type} ({config.num_image_tokens} tokens), "
        f"{config.text_config['model_type']} decoder; image token {config.image_token!r} "
        f"= id {config.image_token_id}"
    )


def main() -> None:
    """Console entry point: user errors are one line on stderr and exit code 1."""
    try:
        app()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

"""The `mm1-mlx` command line."""

import math
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from operator import ge, gt, le
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from typer.exceptions import TyperException

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


MAX_SEED = 2**64 - 1  # the largest seed MLX's generator takes


def seed_option(help: str) -> Any:
    return typer.Option(min=0, max=MAX_SEED, help=help)


def finite(
    low: float | None = None, above: float | None = None, high: float | None = None
) -> Callable[[float | None], float | None]:
    """An option callback: a finite number >= low (or > above) and <= high. Typer's own
    min/max let inf through and have no open bound."""
    limits = [
        (compare, sign, bound)
        for compare, sign, bound in ((ge, ">=", low), (gt, ">", above), (le, "<=", high))
        if bound is not None
    ]
    allowed = " and ".join(f"{sign} {bound}" for _, sign, bound in limits)

    def check(value: float | None) -> float | None:
        inside = all(compare(value, bound) for compare, _, bound in limits)
        if value is not None and not (math.isfinite(value) and inside):
            raise typer.BadParameter(f"must be a finite number {allowed}, not {value}")
        return value

    return check


# The options that assemble a model from parts, which --vlm does not take.
PARTS_OPTIONS = (
    "vision",
    "llm",
    "connector",
    "connector_type",
    "num_image_tokens",
    "connector_hidden_dim",
    "connector_depth",
    "image_size",
    "feature_layer",
    "vision_heads",
    "vision_act",
)
CONVERT_STEPS = ["vision encoder", "language model", "connector", "writing"]
# A fresh connector's sizes: Honeybee's are 1024 and 3; these caps are far past any in use and
# keep it within memory and MLX's 32-bit sizes (3e9 overflowed, a million blocks never ended).
MAX_CONNECTOR_WIDTH = 65_536
MAX_CONNECTOR_DEPTH = 64


@app.command()
def convert(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Output model folder.")],
    vision: Annotated[
        str | None,
        typer.Option(
            help="Vision encoder: open_clip file/folder, HF CLIP or SigLIP folder, or hub id."
        ),
    ] = None,
    llm: Annotated[
        str | None, typer.Option(help="Decoder: an HF causal-LM folder or hub id.")
    ] = None,
    vlm: Annotated[
        str | None,
        typer.Option(
            help="Instead of the parts: a whole vision-language checkpoint (LLaVA in "
            "transformers' format, or Honeybee), folder or hub id."
        ),
    ] = None,
    connector: Annotated[
        str | None, typer.Option(help="Honeybee checkpoint with a C-Abstractor; fresh if omitted.")
    ] = None,
    connector_type: Annotated[
        Literal["c-abstractor", "avg-pool", "attn-pool"], typer.Option(help="The connector.")
    ] = "c-abstractor",
    num_image_tokens: Annotated[
        int, typer.Option(min=1, help="Image tokens per image (a square).")
    ] = 144,
    connector_hidden_dim: Annotated[
        int,
        typer.Option(
            min=1,
            max=MAX_CONNECTOR_WIDTH,
            help="Fresh C-Abstractor: RegNet width (Honeybee: 1024).",
        ),
    ] = 1024,
    connector_depth: Annotated[
        int,
        typer.Option(
            min=1,
            max=MAX_CONNECTOR_DEPTH,
            help="Fresh C-Abstractor: RegNet blocks per stage (Honeybee: 3).",
        ),
    ] = 3,
    dtype: Annotated[
        Literal["float32", "float16", "bfloat16"] | None,
        typer.Option(help="Weights' type (default: keep)."),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=8192,
            help="Input resolution, a multiple of the patch size (position embeddings are "
            "interpolated).",
        ),
    ] = None,
    feature_layer: Annotated[
        int | None, typer.Option(help="Encoder hidden state fed to the connector (-1: last block).")
    ] = None,
    vision_heads: Annotated[
        int | None,
        typer.Option(min=1, help="open_clip without open_clip_config.json: attention heads."),
    ] = None,
    vision_act: Annotated[
        Literal["quick_gelu", "gelu"] | None,
        typer.Option(help="open_clip without config: its activation."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Assemble an MM1 model folder from PyTorch-format vision, LLM and connector weights, or
    convert a whole vision-language checkpoint (--vlm)."""
    from mm1_mlx.convert.assemble import convert_model
    from mm1_mlx.convert.vlm import convert_vlm
    from mm1_mlx.loading import check_writable

    parts = given_options(ctx, PARTS_OPTIONS)
    if vlm is not None and parts:
        raise typer.BadParameter(f"does not go with {', '.join(parts)}", param_hint="'--vlm'")
    if vlm is None and (vision is None or llm is None):
        raise typer.BadParameter(
            "both are needed (or --vlm for a whole checkpoint)", param_hint="'--vision' / '--llm'"
        )
    check_writable(out, force, inputs=[p for p in (vlm, vision, llm, connector) if p])

    with conversion_progress() as step:
        if vlm is not None:
            config = convert_vlm(vlm, out, dtype=dtype, overwrite=force, step=step)
        else:
            overrides = {
                "image_size": image_size,
                "feature_layer": feature_layer,
                "heads": vision_heads,
                "act": vision_act,
            }
            config = convert_model(
                vision,
                llm,
                out,
                connector=connector,
                connector_type=connector_type,
                connector_options={"hidden_dim": connector_hidden_dim, "depth": connector_depth},
                num_image_tokens=num_image_tokens,
                dtype=dtype,
                vision_overrides={k: v for k, v in overrides.items() if v is not None},
                overwrite=force,
                step=step,
            )
    vision_config = config.vision_config
    typer.echo(
        f"wrote {out}: {vision_config.model_type} ViT {vision_config.width}x"
        f"{vision_config.layers}, {config.connector_config.model_type} "
        f"({config.num_image_tokens} tokens), {config.text_config['model_type']} decoder; "
        f"image token {config.image_token!r} = id {config.image_token_id}"
    )


def given_options(ctx: typer.Context, names: tuple[str, ...]) -> list[str]:
    """The flags among `names` given on the command line (or by environment)."""
    given = []
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            given.append("--" + name.replace("_", "-"))
    return given


@contextmanager
def conversion_progress() -> Iterator[Callable[[str], None]]:
    """A spinner naming the conversion step under way; yields the `step(name)` callback."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True
    ) as progress:
        task = progress.add_task("converting", total=len(CONVERT_STEPS))

        def step(name: str) -> None:
            completed = CONVERT_STEPS.index(name)
            progress.update(task, description=f"converting: {name}", completed=completed)

        yield step
        progress.update(task, completed=len(CONVERT_STEPS))


@app.command()
def init(
    config: Annotated[Path, typer.Argument(help="An MM1 config.json (no weights needed).")],
    tokenizer: Annotated[str, typer.Option(help="Tokenizer folder or hub id.")],
    out: Annotated[Path, typer.Option(help="Output model folder.")],
    seed: Annotated[int, seed_option("Random seed for the initial weights.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    smooth_numbers: Annotated[
        bool,
        typer.Option(help="Start the 0..1000 coordinate tokens from sinusoids of their value."),
    ] = False,
    lookup_head: Annotated[
        bool,
        typer.Option(help="Start the decoder's first head as a lookup of tokens by content."),
    ] = False,
) -> None:
    """Create a randomly initialised model folder, to pre-train from scratch."""
    from mm1_mlx.convert.assemble import init_model
    from mm1_mlx.loading import check_writable

    check_writable(out, force, inputs=[config, tokenizer])
    made = init_model(config, tokenizer, out, seed, force, smooth_numbers, lookup_head)
    typer.echo(
        f"wrote {out}: image token id {made.image_token_id}, vocab {made.text_config['vocab_size']}"
    )


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Model folder or hub id.")],
    out: Annotated[Path, typer.Option(help="Output model folder.")],
    bits: Annotated[int, typer.Option(help="Bits per weight: 2, 3, 4, 5, 6 or 8.")] = 4,
    group_size: Annotated[int, typer.Option(help="Weights sharing a scale: 32, 64 or 128.")] = 64,
    vision: Annotated[bool, typer.Option(help="Quantize the vision encoder too.")] = False,
    report: Annotated[bool, typer.Option(help="Measure the quality cost.")] = True,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Quantize the decoder and connector (and the vision encoder on request)."""
    from rich.console import Console
    from rich.table import Table

    from mm1_mlx.loading import check_writable
    from mm1_mlx.quantize import quantize_folder

    check_writable(out, force, inputs=[model])
    console = Console(stderr=True)
    with console.status(f"quantizing to {bits} bits, group size {group_size}"):
        quality = quantize_folder(model, out, bits, group_size, vision, force, report)
    typer.echo(f"wrote {out}")
    if quality is not None:
        table = Table(title=f"{bits}-bit vs the unquantized model")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for name, value in quality.rows():
            table.add_row(name, value)
        Console().print(table)


MAX_TOKENS = typer.Option(min=1, help="Most tokens per answer.")


def non_empty(texts: list[str] | None) -> list[str] | None:
    """An option callback: no empty string (an empty stop string would end every answer at
    once), and valid text (a byte that is not UTF-8 arrives as a lone surrogate, which no
    answer can contain)."""
    if texts and not all(texts):
        raise typer.BadParameter("must not be empty")
    for text in texts or ():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise typer.BadParameter(f"{text!r} is not valid text (not UTF-8)") from None
    return texts


@app.command()
def chat(
    prompt: Annotated[str | None, typer.Argument(help="Ask once and exit; omit to chat.")] = None,
    model: Annotated[str | None, typer.Option(help="Model folder or hub id.")] = None,
    image: Annotated[list[Path] | None, typer.Option(help="An image (repeatable).")] = None,
    max_tokens: Annotated[int, MAX_TOKENS] = 256,
    temp: Annotated[
        float, typer.Option(callback=finite(low=0), help="Sampling temperature (0: greedy).")
    ] = 0.0,
    top_p: Annotated[
        float,
        typer.Option(callback=finite(above=0, high=1), help="Nucleus sampling mass (1: off)."),
    ] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample from the k likeliest (0: off).")] = 0,
    repetition_penalty: Annotated[
        float, typer.Option(callback=finite(above=0), help="Above 1 penalizes (1: off).")
    ] = 1.0,
    stop: Annotated[
        list[str] | None, typer.Option(callback=non_empty, help="Stop string (repeatable).")
    ] = None,
    seed: Annotated[int | None, seed_option("Random seed for sampling.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    verbose: Annotated[bool, typer.Option(help="Print TTFT, tokens/s and peak memory.")] = False,
    annotate: Annotated[
        Path | None, typer.Option(help="Draw the answer's boxes on the last image into this file.")
    ] = None,
) -> None:
    """Chat about images: prints the streamed answer to PROMPT, or starts an interactive chat.

    Without --model it uses the small demo model shipped inside the package, which knows the
    synthetic shapes and screens of examples/ (docs/synthetic-world.md)."""
    from rich.console import Console

    from mm1_mlx.annotate import check_output
    from mm1_mlx.chat import annotate_answer, check_images, interactive, stats_line, stream_answer
    from mm1_mlx.generate import ChatSession, GenerationSettings
    from mm1_mlx.loading import check_file_writable, load, model_or_default

    if annotate:
        if prompt is not None and not image:
            raise typer.BadParameter("needs an --image to draw on", param_hint="'--annotate'")
        check_output(annotate)
        check_file_writable(annotate)
    images = check_images(image or [])
    model = model_or_default(model)
    settings = GenerationSettings(
        max_tokens=max_tokens,
        temperature=temp,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        stop=tuple(stop or ()),
        seed=seed,
    )
    loaded, processor = load(model)
    session = ChatSession(loaded, processor, settings, system=system)
    console = Console(stderr=True)
    if prompt is None:
        interactive(session, images, verbose, Console(), annotate)
        return
    last = stream_answer(session, prompt, images)
    if verbose:
        console.print(stats_line(last), highlight=False)
    if annotate:
        annotate_answer(session, annotate, console)


@app.command("app")
def app_command(
    model: Annotated[str | None, typer.Option(help="Model folder or hub id.")] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every network).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
) -> None:
    """A local web app: add screenshots or photos, chat about them, see the boxes drawn.

    Also serves an OpenAI-compatible API: POST /v1/chat/completions, GET /v1/models."""
    try:
        from mm1_mlx.apps.server import serve
    except ImportError as error:
        raise UserError(f"the app needs {error.name}: pip install 'mm1-mlx[app]'") from None
    serve(model, host, port)


# Each rank is a process holding a whole copy of the model, with a port and open files of its
# own: far past the cores of a machine, they only share them. The global batch must split
# evenly over them too (run_as_ranks), before any is started.
MAX_RANKS = 256
RANKS = typer.Option(
    min=1,
    max=MAX_RANKS,
    help="Data-parallel ranks on this machine (each with its share of the cores).",
)


def run_as_ranks(ranks: int, batch_size: int) -> None:
    """With ranks > 1, this command runs again as that many ranks, and ends with them."""
    from mm1_mlx.train.ranks import is_rank, run_ranks

    if batch_size % ranks:
        raise UserError(f"a batch of {batch_size} does not split evenly over {ranks} ranks")
    if ranks > 1 and not is_rank():
        raise typer.Exit(run_ranks(ranks))


@contextmanager
def interruption_reported() -> Iterator[None]:
    """Ctrl-C says where the run was saved (Typer alone would exit 130 without a word)."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        typer.echo(str(interrupt) or "interrupted", err=True)
        raise typer.Exit(130) from None


# What every step logs; anything else a step reports is a validation.
STEP_METRICS = ("step", "loss", "lr", "grad_norm")


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML (see train/recipes/).")],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (overrides the recipe's).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in OUT.")] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a recipe value, e.g. --set train.steps=100 "
            "or --set data.sources[0].weight=2.",
        ),
    ] = None,
    ranks: Annotated[int, RANKS] = 1,
) -> None:
    """Pre-train, continue pre-training or fine-tune (full, LoRA, QLoRA) from a recipe."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from mm1_mlx.train.recipe import global_batch_size, load_recipe
    from mm1_mlx.train.trainer import train as run

    settings = load_recipe(recipe, set_ or [], out)
    run_as_ranks(ranks, global_batch_size(settings))
    columns = [
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=False, auto_refresh=False) as progress:
        task = progress.add_task("train", total=settings.train.steps, status="")

        def report(step: int, values: dict) -> None:
            status = f"loss {values['loss']:.4f}  lr {values['lr']:.2e}  "
            speed = "tokens_per_s" if "tokens_per_s" in values else "images_per_s"
            status += f"{values[speed]:.0f} {speed.split('_')[0]}/s"
            scores = {k: v for k, v in values.items() if k not in (*STEP_METRICS, speed)}
            if scores:  # a validation
                line = "  ".join(f"{k} {v:.4g}" for k, v in scores.items())
                progress.console.print(f"step {step}: {line}")
            progress.update(task, completed=step, status=status, refresh=True)

        with interruption_reported():
            result = run(settings, resume=resume, reporter=report)
    typer.echo(f"wrote {result.out} after {result.steps} steps; {result.summary}")


data_app = typer.Typer(help="Datasets: the synthetic world.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    n: Annotated[int, typer.Option(min=1, help="Training images (half shapes, half screens).")],
    seed: Annotated[int, seed_option("Random seed (same seed, same files).")] = 0,
    style: Annotated[str, typer.Option(help="Renderer: plain, alt or mixed.")] = "mixed",
    eval_per_task: Annotated[
        int, typer.Option(min=0, help="Held-out examples per task in OUT/eval/.")
    ] = 200,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Generate the synthetic world: images, pre-training and SFT JSONL, held-out eval sets."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from mm1_mlx.train.synth import TASKS, count_images, write_dataset

    with Progress(TextColumn("[bold]synth"), BarColumn(), MofNCompleteColumn()) as progress:
        task = progress.add_task("synth", total=count_images(n, eval_per_task))
        write_dataset(
            out, n, seed, style, eval_per_task, force, on_image=lambda: progress.advance(task)
        )
    typer.echo(f"wrote {out}: {n} training images, {eval_per_task} per task x {len(TASKS)} tasks")


@data_app.command("tokenizer")
def data_tokenizer(
    files: Annotated[list[Path], typer.Argument(help="JSONL data files (any of the formats).")],
    out: Annotated[Path, typer.Option(help="Output tokenizer folder.")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size (at most 1,000,000).")] = 4096,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Train a byte-level BPE tokenizer for a model trained from scratch (one token per
    box coordinate 0..1000), with a User/Assistant chat template."""
    from mm1_mlx.train.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(files, out, vocab_size, force)
    typer.echo(f"wrote {out}: {len(tokenizer)} tokens")


@data_app.command("inspect")
def data_inspect(
    source: Annotated[
        str, typer.Argument(help="A data file, or tar shards as a brace pattern (a{00..09}.tar).")
    ],
    format: Annotated[
        str | None,
        typer.Option(help="caption, interleaved, text or chat (.tar: caption, .json: chat)."),
    ] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="How many examples to show.")] = 3,
    model: Annotated[
        str | None, typer.Option(help="Model folder or hub id (default: the demo model).")
    ] = None,
    images: Annotated[
        str | None, typer.Option(help="Image folder, .zip, or folder in a .zip (a.zip/train).")
    ] = None,
    image_column: Annotated[str | None, typer.Option(help="Parquet: the images' column.")] = None,
    text_column: Annotated[str | None, typer.Option(help="Parquet: the text's column.")] = None,
    caption_field: Annotated[
        str | None, typer.Option(help="Tar: KEY.json's caption field.")
    ] = None,
) -> None:
    """Show a source's first examples as training sees them: the text, where images go, and
    the tokens that carry loss between ⟦ ⟧."""
    from mm1_mlx.train.inspect import InspectSettings, inspect_source

    settings = InspectSettings(source, format, images, caption_field, image_column, text_column)
    inspect_source(settings, model, n)


@app.command("eval")
def eval_(
    data: Annotated[
        list[Path],
        typer.Option(help="Eval JSONL, or with --task the benchmark's parquet files (repeatable)."),
    ],
    task: Annotated[
        str | None,
        typer.Option(
            help="A benchmark: vqav2, textvqa, docvqa, mmmu, scienceqa_img, refcoco, screenspot."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model folder or hub id (default: the demo model).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="At most N examples per file (--task: in all).")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(min=1, help="Most tokens per answer (32; --task: the task's).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="--task: a JSON line per example, as it comes; a rerun resumes it."),
    ] = None,
    predictions: Annotated[
        Path | None,
        typer.Option(help='--task: score these {"id", "answer"} lines instead of a model.'),
    ] = None,
) -> None:
    """Per-task accuracy on the synthetic world's JSONL: exact match after trimming and
    lower-casing; boxes by IoU >= 0.5. With --task, a standard benchmark from its parquet
    files, prompted and scored as lmms-eval does (VQA accuracy, ANLS, MMMU's answer parsing,
    box IoU, point in box)."""
    if task is not None:
        from mm1_mlx.tasks.command import BenchmarkRun, evaluate_benchmark

        settings = (model, predictions, limit, out, max_tokens, json_out)
        evaluate_benchmark(BenchmarkRun(task, data, *settings))
        return
    if out is not None or predictions is not None:
        raise UserError("--out and --predictions go with --task")
    max_tokens = 32 if max_tokens is None else max_tokens
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from mm1_mlx.evaluate import check_prompts, evaluate, load_examples
    from mm1_mlx.loading import check_file_writable, load, model_or_default, write_text_atomic

    if json_out is not None:
        check_file_writable(json_out)
    model = model_or_default(model)
    examples = [example for path in data for example in load_examples(path, limit)]
    loaded, processor = load(model)
    check_prompts(loaded, processor, examples)
    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn()) as progress:
        task = progress.add_task("eval", total=len(examples))
        report = evaluate(
            loaded, processor, examples, max_tokens, on_example=lambda: progress.advance(task)
        )
    table = Table(title=f"{model} on {len(examples)} examples")
    for column in ("task", "n", "correct", "accuracy"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for row in report.rows():
        table.add_row(*row)
    Console().print(table)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(report.to_json(), indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


def main() -> None:
    """Console entry point: user errors are one line on stderr and exit code 1, bad flags one
    line and exit code 2 (Typer would draw a usage box). SIGTERM stops a command as Ctrl-C
    does, so what it was writing is cleaned up (a scheduler's or a timeout's stop)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        code = app(standalone_mode=False)
    except UserError as error:
        fail(str(error), 1)
    except TyperException as error:  # a usage error; without a message, the help was shown
        fail(error.format_message(), error.exit_code)
    except typer.Abort:
        fail("aborted", 1)
    except OSError as error:  # what no check could foresee: a disk that fills, a file removed
        fail(os_error_line(error), 1)
    if code:  # typer.Exit's code (Ctrl-C: 130; ranks: theirs)
        sys.exit(code)


def os_error_line(error: OSError) -> str:
    if error.filename is None or error.strerror is None:
        return str(error)
    return f"{error.filename}: {error.strerror}"


def fail(message: str, code: int) -> None:
    if message:
        print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(code)

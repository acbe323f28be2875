"""The terminal chat behind `mm1-mlx chat`: one-shot answers and an interactive session."""

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from rich.console import Console

from mm1_mlx.annotate import save_annotated
from mm1_mlx.errors import UserError
from mm1_mlx.generate import ChatSession, GenerationChunk
from mm1_mlx.processor import load_image

HELP = (
    "Commands: /image PATH (attach to the next question), /reset (new conversation), "
    "/history (show it), /quit. Up-arrow recalls earlier lines."
)


def stats_line(chunk: GenerationChunk) -> str:
    return (
        f"TTFT {chunk.ttft_s:.2f} s | prefill {chunk.prompt_tokens} tokens, "
        f"{chunk.prefill_tps:.1f} tok/s ({chunk.cached_tokens} cached) | decode "
        f"{chunk.generated_tokens} tokens, {chunk.decode_tps:.1f} tok/s | peak memory "
        f"{chunk.peak_memory_gb:.2f} GB"
    )


def check_images(paths: Sequence[Path]) -> list:
    """Open every image up front, so a bad file fails before the model is loaded."""
    return [load_image(path) for path in paths]


def check_markers(session: ChatSession, prompt: str, num_images: int) -> None:
    marker = session.processor.config.image_token
    markers = prompt.count(marker)
    if markers > num_images:
        raise UserError(f"the prompt has {markers} {marker} markers but only {num_images} images")


def stream_answer(
    session: ChatSession, prompt: str, images: Sequence, out: TextIO | None = None
) -> GenerationChunk:
    """Print the answer as it streams (to stdout as it is now, not at import); returns the last
    chunk (its statistics)."""
    out = out or sys.stdout
    check_markers(session, prompt, len(images))
    chunk = None
    for chunk in session.ask(prompt, images):
        out.write(chunk.text)
        out.flush()
    out.write("\n")
    return chunk


def annotate_answer(session: ChatSession, path: Path, console: Console) -> None:
    """Draw the last answer's boxes on the conversation's latest image, into `path`."""
    if not session.images:
        console.print(f"[dim]no image to draw on: {path} not written[/]", highlight=False)
        return
    count = save_annotated(path, session.images[-1], session.messages[-1]["content"])
    boxes = f"{count} box{'es' * (count != 1)}"
    console.print(f"[dim]drew {boxes} on {path}[/]", highlight=False)


def _read_lines(console: Console) -> Iterator[str]:
    try:
        import readline  # noqa: F401  (line editing and up-arrow history where available)
    except ImportError:
        pass
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8: refused per line, later
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            yield console.input("[bold green]> [/]")
        except EOFError:
            return


def interactive(
    session: ChatSession,
    images: list,
    verbose: bool,
    console: Console,
    annotate: Path | None = None,
) -> None:
    console.print(f"[dim]{HELP}[/]")
    pending = list(images)
    for line in _read_lines(console):
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            session.reset()
            pending = []
            console.print("[dim]new conversation[/]")
        elif line == "/history":
            for message in session.messages:
                console.print(f"{message['role']}: {message['content']}", markup=False)
        elif line.startswith("/image"):
            pending += _attach(line.removeprefix("/image").strip(), console)
        elif line.startswith("/"):
            console.print(f"[red]unknown command {line.split()[0]}[/]. {HELP}")
        else:
            try:
                chunk = stream_answer(session, line, pending)
            except UserError as error:
                console.print(f"[red]error:[/] {error}", highlight=False)
                continue
            pending = []
            if verbose:
                console.print(f"[dim]{stats_line(chunk)}[/]", highlight=False)
            if annotate:
                annotate_answer(session, annotate, console)


def _attach(path: str, console: Console) -> list:
    if not path:
        console.print("[red]usage: /image PATH[/]")
        return []
    try:
        image = load_image(Path(path).expanduser())
    except UserError as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        return []
    console.print(f"[dim]attached {path} ({image.width}x{image.height})[/]", highlight=False)
    return [image]

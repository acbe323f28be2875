"""The README's pictures, made from a model (the shipped demo model unless --model):

    python docs/screenshots.py [--model M] [--seed 1] [--out docs]

- demo-send.png: the Quick-start command's answer drawn on examples/screen.png, as
  `mm1-mlx chat --image examples/screen.png "Where is the Send button?" --annotate` draws it;
- app.png and app-phone.png: the app (`mm1-mlx app`) in headless Chromium, on a screen the
  synthetic world's generator draws fresh from --seed (a random stream no training data uses;
  the first screen with three buttons or more), asked where its first button is and then to
  list its buttons.

Needs the app's and the tests' extras (starlette, uvicorn, playwright) and a Chromium
(`apt-get install chromium` on Debian and Ubuntu, Google Chrome on macOS). Prints every answer
next to the right one, scored as `mm1-mlx eval` scores it (a box by its IoU with the true one).
"""

import argparse
import io
import os
import random
import shutil
import sys
from pathlib import Path

from PIL import Image

from mm1_mlx.annotate import draw_boxes
from mm1_mlx.apps import server
from mm1_mlx.boxes import format_box
from mm1_mlx.evaluate import iou, is_correct, whole_box
from mm1_mlx.generate import generate
from mm1_mlx.loading import load, model_or_default
from mm1_mlx.train import synth

ROOT = Path(__file__).resolve().parent.parent
QUICK_START = ROOT / "examples" / "screen.png"
QUICK_START_SEND = "[388, 309, 831, 425]"  # examples/README.md
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
MAC_CHROME = "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"
VIEWPORTS = {  # file -> Playwright context options
    "app.png": {"viewport": {"width": 1000, "height": 900}},
    "app-phone.png": {"viewport": {"width": 390, "height": 844}, "is_mobile": True},
}


def verdict(answer: str, right: str, size: tuple[int, int]) -> str:
    """'right: [..]; IoU 0.75, right' (a box) or 'right: Send, OK; wrong' (anything else)."""
    scored = "right" if is_correct(answer, right, size) else "wrong"
    truth, predicted = whole_box(right, size), whole_box(answer, size)
    if truth is not None and predicted is not None:
        scored = f"IoU {iou(predicted, truth):.2f}, {scored}"
    return f"right: {right}; {scored}"


def quick_start(model, processor, out: Path) -> None:
    """demo-send.png: the README's first command, answered and drawn."""
    question = "Where is the Send button?"
    image = Image.open(QUICK_START)
    content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
    answer = generate(model, processor, [{"role": "user", "content": content}], max_tokens=32)
    scored = verdict(answer, QUICK_START_SEND, image.size)
    print(f"{QUICK_START.name}: {question} -> {answer}   ({scored})")
    annotated, _ = draw_boxes(image, answer)
    annotated.save(out / "demo-send.png", optimize=True)


def fresh_screen(seed: int) -> tuple[bytes, tuple[int, int], list[tuple[str, str]]]:
    """A newly drawn screen with three buttons or more (PNG bytes), its size, and the
    questions asked about it with their answers."""
    rng = random.Random(f"screenshots-{seed}")
    scene = synth.sample_screen_scene(rng)
    while len(scene.buttons) < 3:
        scene = synth.sample_screen_scene(rng)
    picture = io.BytesIO()
    synth.render(scene, "plain").save(picture, format="PNG")
    buttons = synth.reading_order(scene)
    first = buttons[0]
    questions = [
        (f"Where is the {first.label} button?", format_box(first.box, scene.size)),
        ("List the buttons.", ", ".join(button.label for button in buttons)),
    ]
    return picture.getvalue(), scene.size, questions


def browser_path() -> str:
    found = [shutil.which(name) for name in BROWSERS] + [MAC_CHROME]
    path = next((path for path in found if path and Path(path).exists()), None)
    if path is None:
        raise SystemExit("error: no Chromium or Chrome found (apt-get install chromium)")
    return path


def app_screenshots(
    url: str, picture: bytes, size: tuple[int, int], questions: list[tuple[str, str]], out: Path
) -> None:
    """app.png and app-phone.png: the page after each question's answer has streamed in."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=browser_path(), args=["--headless=new", "--no-sandbox"]
        )
        for name, options in VIEWPORTS.items():
            page = browser.new_context(**options).new_page()
            page.goto(url)
            upload = {"name": "screen.png", "mimeType": "image/png", "buffer": picture}
            page.set_input_files("#files", files=[upload])
            answers = page.locator(".turn.assistant")
            for number, (question, right) in enumerate(questions, 1):
                page.fill("#prompt", question)
                page.click("#send")
                expect(answers).to_have_count(number)
                streaming = page.locator(".turn.assistant.streaming")
                expect(streaming).to_have_count(0, timeout=300_000)
                answer = answers.last.locator(".text").inner_text()
                if "error" in (answers.last.get_attribute("class") or ""):
                    raise SystemExit(f"error: the app refused {question!r}: {answer}")
                print(f"{name}: {question} -> {answer}   ({verdict(answer, right, size)})")
            shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
            # A palette keeps the PNG small enough to commit.
            shot.quantize(colors=64, dither=Image.Dither.NONE).save(out / name, optimize=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the shipped demo model")
    parser.add_argument("--seed", type=int, default=1, help="which fresh screen the app shows")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    if not args.out.is_dir():
        raise SystemExit(f"error: {args.out}: no such folder")
    model, processor = load(model_or_default(args.model))
    quick_start(model, processor, args.out)
    picture, size, questions = fresh_screen(args.seed)
    with server.serving_in_thread(server.create_app(model, processor, "demo")) as url:
        app_screenshots(url, picture, size, questions, args.out)


if __name__ == "__main__":
    main()
    # The pictures are written. Leave without Python's teardown: MLX, used from the app's
    # threads, now and then aborts the process while the interpreter finalizes
    # (ml-explore/mlx#3126: about 1 run in 20 here).
    sys.stdout.flush()
    os._exit(0)

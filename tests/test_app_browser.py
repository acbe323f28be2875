"""The chat page end to end in a real headless Chromium (Debian's, driven by Playwright).

The tiny test model answers gibberish, so the test first teaches it one answer, as MM1.5-UI is
taught to ground widgets: asked "Where is the Send button?" about the test screen, it answers
with the button's box. The page then really streams that answer from the real server and must
draw the box over the button; nothing in the server or the page knows it is a test.
"""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from app_helpers import (  # noqa: E402
    SCREEN_SIZE,
    SEND_BUTTON,
    data_url,
    record_generation,
    screen_png,
)
from box_cases import CASES as BOX_CASES  # noqa: E402
from PIL import Image  # noqa: E402

import mm1_mlx  # noqa: E402
from mm1_mlx.apps import server  # noqa: E402
from mm1_mlx.boxes import format_box  # noqa: E402
from mm1_mlx.generate import generate  # noqa: E402

# Screenshots of the test go to a temporary folder, to look at when it fails (the README's come
# from docs/screenshots.py and the demo model).
SCREENSHOTS = Path(os.environ.get("MM1_MLX_SCREENSHOTS") or tempfile.mkdtemp(prefix="mm1-shots-"))
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
NAME = "tiny-ui"
QUESTION = "Where is the Send button?"
ANSWER = f"The Send button is at {format_box(SEND_BUTTON, SCREEN_SIZE)}."
SCREEN = screen_png()


def chromium_paths() -> list[str]:
    """Debian's Chromium first; on Ubuntu /usr/bin/chromium may be a snap stub, hence the rest;
    on macOS, Google Chrome's app."""
    names = ["/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "chrome",
             "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"]  # fmt: skip
    return list(dict.fromkeys(path for path in map(shutil.which, names) if path))


@pytest.fixture(scope="module")
def browser():
    failures = []
    with sync_api.sync_playwright() as playwright:
        for path in chromium_paths():
            try:
                launched = playwright.chromium.launch(
                    executable_path=path, args=CHROMIUM_ARGS, timeout=30_000
                )
            except sync_api.Error as error:
                failures.append(f"{path}: {str(error).splitlines()[0]}")
                continue
            yield launched
            launched.close()
            return
    reason = "no working Chromium (apt-get install chromium)"
    reason += f": {'; '.join(failures)}" if failures else ", none found"
    if os.environ.get("MM1_MLX_REQUIRE_BROWSER"):  # .ci/run installed one: it must work
        pytest.fail(reason)
    pytest.skip(reason)


def page_request(messages: list) -> bytes:
    """The body the page posts for `messages`."""
    return json.dumps({"model": NAME, "messages": messages, "stream": True}).encode()


def first_question() -> dict:
    image = {"type": "image_url", "image_url": {"url": data_url(SCREEN)}}
    return {"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}


def teach(model, inputs, answer: list[int], max_steps: int = 300) -> None:
    """Fine-tune `model` (all of it) until it answers the prompt `inputs` with the token ids
    `answer` (a loss this low makes it the greedy answer)."""
    ids = mx.array([inputs.input_ids + answer])
    pixels = mx.array(inputs.tiles)
    start = len(inputs.input_ids)

    def loss(model):
        logits = model(ids[:, :-1], pixels)
        return nn.losses.cross_entropy(logits[:, start - 1 :], ids[:, start:]).mean()

    optimizer = optim.Adam(learning_rate=3e-3)
    loss_and_grad = nn.value_and_grad(model, loss)
    for _ in range(max_steps):  # about 50
        value, grads = loss_and_grad(model)
        if value.item() < 0.005:
            return
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    """The app on a fresh copy of the tiny model, taught ANSWER to the page's first question."""
    model, processor = mm1_mlx.load(tiny_model_dir)
    app = server.create_app(model, processor, NAME)
    prompt = server.parse_request(page_request([first_question()]), app.state.served).inputs
    tokenizer = processor.tokenizer
    answer = tokenizer.encode(ANSWER, add_special_tokens=False) + [tokenizer.eos_token_id]
    teach(model, prompt, answer)
    content = [{"type": "image", "image": SCREEN}, {"type": "text", "text": QUESTION}]
    answered = generate(model, processor, [{"role": "user", "content": content}], max_tokens=40)
    assert answered == ANSWER, "teaching failed"
    return app


@pytest.fixture(scope="module")
def url(app):
    with server.serving_in_thread(app) as base:
        yield base


@pytest.fixture
def open_page(browser, url):
    """Opens the page in a fresh context; afterwards checks it loaded nothing from elsewhere
    and logged no errors (a Content-Security-Policy violation is one; the API refusing a
    question is not: the page shows it)."""
    contexts, problems = [], []

    def on_console(message) -> None:
        refused = message.location.get("url", "").endswith("/v1/chat/completions")
        if message.type == "error" and not refused:
            problems.append(message.text)

    def opener(**context_options):
        context = browser.new_context(**context_options)
        contexts.append(context)
        page = context.new_page()
        page.on("request", lambda r: r.url.startswith((url, "data:")) or problems.append(r.url))
        page.on("console", on_console)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(url)
        sync_api.expect(page.locator("#model")).to_have_text(NAME)
        return page

    yield opener
    for context in contexts:
        context.close()
    assert problems == []


def upload(page, name: str = "screen.png", data: bytes = SCREEN) -> None:
    page.set_input_files("#files", files=[{"name": name, "mimeType": "image/png", "buffer": data}])
    sync_api.expect(page.locator("#pending .thumb")).to_have_count(1)


def ask(page, question: str) -> None:
    """Types the question, sends it and waits until its answer is complete."""
    answers = page.locator(".turn.assistant")
    before = answers.count()
    page.fill("#prompt", question)
    page.click("#send")
    sync_api.expect(answers).to_have_count(before + 1)
    sync_api.expect(answers.last.locator(".meta")).to_contain_text("TTFT", timeout=20_000)


def watch_answer_lengths(page) -> None:
    """Records the length of the last answer's text at every change of the conversation."""
    page.evaluate("""() => {
        window.answerLengths = [];
        new MutationObserver(() => {
            const answer = document.querySelector(".turn.assistant:last-child .text");
            if (answer) window.answerLengths.push(answer.textContent.length);
        }).observe(document.getElementById("turns"),
                   {subtree: true, childList: true, characterData: true});
    }""")


def on_page(image: dict, fractions: list[float]) -> list[float]:
    """Points x, y, x, y, ... as fractions of a displayed image's width and height (its
    bounding box) -> page pixels."""
    return [
        image["x"] + f * image["width"] if i % 2 == 0 else image["y"] + f * image["height"]
        for i, f in enumerate(fractions)
    ]


def corners(rect: dict) -> list[float]:
    return [rect["x"], rect["y"], rect["x"] + rect["width"], rect["y"] + rect["height"]]


def save_screenshot(page, name: str) -> None:
    """A small, commit-worthy PNG (reduced to a palette)."""
    image = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=64, dither=Image.Dither.NONE).save(SCREENSHOTS / name, optimize=True)


def test_the_answer_streams_and_its_box_is_drawn_over_the_button(open_page):
    page = open_page(viewport={"width": 1000, "height": 900})
    upload(page)
    page.click("text=Where is the Send button?")  # a suggested prompt fills the question
    assert page.input_value("#prompt") == QUESTION
    watch_answer_lengths(page)
    ask(page, QUESTION)

    answer = page.locator(".turn.assistant").last
    assert answer.locator(".text").inner_text() == ANSWER
    lengths = page.evaluate("window.answerLengths")
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), lengths  # grew piece by piece
    stats = answer.locator(".meta").inner_text()
    assert re.fullmatch(r"TTFT \d+\.\d\d s · \d+\.\d tokens/s · \d+ tokens", stats), stats

    box = answer.locator(".shot .box")
    sync_api.expect(box).to_have_count(1)
    assert box.inner_text() == "1 The Send button"
    image = answer.locator(".shot img").bounding_box()
    grid = [int(value) / 1000 for value in re.findall(r"\d+", ANSWER)]
    assert corners(box.bounding_box()) == pytest.approx(on_page(image, grid), abs=1.0)
    # ... which is where the button is in the picture:
    button = [value / SCREEN_SIZE[i % 2] for i, value in enumerate(SEND_BUTTON)]
    assert corners(box.bounding_box()) == pytest.approx(on_page(image, button), abs=2.0)
    assert answer.locator("mark.ref").inner_text().endswith(format_box(SEND_BUTTON, SCREEN_SIZE))
    save_screenshot(page, "app.png")


def test_the_page_parses_boxes_as_mm1_mlx_boxes_does(open_page):
    page = open_page()
    texts = [text for text, _ in BOX_CASES]
    found = page.evaluate(
        "(texts) => texts.map((text) => parseBoxes(text).map((b) => [b.box, [b.start, b.end]]))",
        texts,
    )
    expected = [[[list(box), list(span)] for box, span in boxes] for _, boxes in BOX_CASES]
    assert dict(zip(texts, found, strict=True)) == dict(zip(texts, expected, strict=True))


def test_dragging_on_the_image_refers_to_the_region_and_multi_turn_answers(open_page, url):
    import httpx

    page = open_page(viewport={"width": 1100, "height": 760})
    upload(page)
    ask(page, QUESTION)
    shot = page.locator(".turn.user .shot img").first
    shot.scroll_into_view_if_needed()
    image = shot.bounding_box()
    x1, y1, x2, y2 = on_page(image, [0.125, 0.3, 0.48, 0.36])
    page.mouse.move(x1, y1)
    page.mouse.down()
    page.mouse.move(x2, y2, steps=5)
    page.mouse.up()
    region = [int(v) for v in re.findall(r"\d+", page.input_value("#prompt"))]
    assert region == pytest.approx([125, 300, 480, 360], abs=1)

    page.locator("#prompt").press("End")
    page.keyboard.type("What is this?")
    question = page.input_value("#prompt").strip()
    ask(page, question)
    referred = page.locator(".turn.user").last
    sync_api.expect(referred.locator(".shot .box")).to_have_count(1)  # the region, on the image
    history = [
        first_question(),
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": [{"type": "text", "text": question}]},
    ]
    expected = httpx.post(f"{url}/v1/chat/completions", json={"messages": history}, timeout=30)
    reply = page.locator(".turn.assistant").last.locator(".text").inner_text()
    assert reply == expected.json()["choices"][0]["message"]["content"]


def test_stop_cancels_the_generation_on_the_server(open_page, monkeypatch):
    gate = threading.Event()  # the worker waits for the test before it starts generating
    served = record_generation(monkeypatch, hold=gate)
    page = open_page(viewport={"width": 1100, "height": 760})
    page.fill("#prompt", "Describe the screen.")
    page.click("#send")
    sync_api.expect(page.locator("#stop")).to_be_visible()
    page.click("#stop")
    answer = page.locator(".turn.assistant").last
    sync_api.expect(answer.locator(".meta")).to_have_text("stopped")
    sync_api.expect(page.locator("#send")).to_be_visible()
    gate.set()
    page.wait_for_timeout(300)
    assert len(served) <= 1  # stopped at its first token, if it got that far


def test_drop_and_paste_add_images_and_refused_ones_come_back(open_page):
    page = open_page(viewport={"width": 1100, "height": 760})
    # What a browser dispatches when files are dropped on the page, or pasted.
    page.evaluate(
        """(png) => {
        const bytes = Uint8Array.from(atob(png), (c) => c.charCodeAt(0));
        window.transfer = (...names) => {
            const transfer = new DataTransfer();
            for (const name of names) {
                const image = name.endsWith(".png");
                const type = image ? "image/png" : "text/plain";
                transfer.items.add(new File([image ? bytes : "hi"], name, {type}));
            }
            return transfer;
        };
    }""",
        base64.b64encode(SCREEN).decode(),
    )
    page.evaluate("""() => {
        const dropped = transfer("screen.png", "notes.txt");
        for (const type of ["dragenter", "dragover", "drop"]) {
            const event = {dataTransfer: dropped, bubbles: true, cancelable: true};
            document.body.dispatchEvent(new DragEvent(type, event));
        }
    }""")
    sync_api.expect(page.locator("#pending .thumb")).to_have_count(1)
    sync_api.expect(page.locator("#notice")).to_have_text("Not an image: notes.txt")
    assert page.locator("#drop").is_hidden()
    page.evaluate("""() => document.dispatchEvent(
        new ClipboardEvent("paste", {clipboardData: transfer("pasted.png")}))""")
    sync_api.expect(page.locator("#pending .thumb")).to_have_count(2)

    page.locator("#pending .remove").first.click()
    upload_bad = {"name": "fake.png", "mimeType": "image/png", "buffer": b"not a png"}
    page.set_input_files("#files", files=[upload_bad])
    sync_api.expect(page.locator("#pending .thumb")).to_have_count(2)
    page.fill("#prompt", "What is this?")
    page.click("#send")
    error = page.locator(".turn.assistant.error .text")
    sync_api.expect(error).to_contain_text("not an image")
    assert page.input_value("#prompt") == "What is this?"  # back in the composer, to fix
    sync_api.expect(page.locator("#pending .thumb")).to_have_count(2)

    page.click("#reset")
    sync_api.expect(page.locator(".turn")).to_have_count(0)
    sync_api.expect(page.locator("#pending .thumb")).to_have_count(0)
    assert page.locator("#welcome").is_visible()


def test_phone_sized_viewport_fits_without_horizontal_scrolling(open_page):
    page = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    upload(page)
    ask(page, QUESTION)
    sync_api.expect(page.locator(".turn.assistant .box")).to_have_count(1)
    widths = page.evaluate("""() => {
        const chat = document.getElementById("chat");
        return [document.documentElement.scrollWidth, window.innerWidth,
                chat.scrollWidth, chat.clientWidth];
    }""")
    assert widths[0] <= widths[1] and widths[2] <= widths[3], widths
    composer = page.locator("#composer").bounding_box()
    assert composer["x"] >= 0 and composer["x"] + composer["width"] <= 390
    assert composer["y"] + composer["height"] <= 844
    save_screenshot(page, "app-phone.png")


def test_the_readme_pictures_script_runs(tmp_path):
    """docs/screenshots.py, as the README runs it (the demo model): the three pictures, and
    each answer printed and scored; the Quick-start box is right, as the README says."""
    if not chromium_paths():
        pytest.skip("no Chromium")
    script = Path(__file__).resolve().parent.parent / "docs" / "screenshots.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "app-phone.png",
        "app.png",
        "demo-send.png",
    ]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("screen.png: Where is the Send button? -> ")
    assert lines[0].endswith(", right)") and "IoU " in lines[0], lines[0]
    assert sum("List the buttons. -> " in line for line in lines) == 2

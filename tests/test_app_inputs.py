"""The app's API against hostile and careless input, on the tiny model: every bad request is a
4xx JSON error, prompts must fit the model's context, a client that leaves mid-prefill frees the
worker, decoded pictures do not outlive their request, and no answer names the server's paths."""

import gc
import io
import logging
import socket
import struct
import threading
import time
import weakref
import zlib
from types import SimpleNamespace

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from app_helpers import data_url  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from mm1_mlx import generate as generation  # noqa: E402
from mm1_mlx.apps import server  # noqa: E402
from mm1_mlx.generate import generate  # noqa: E402

MAX_BODY = 300_000
MAX_IMAGES = 2
PREFILL_PIECE = 16  # small, so a prompt of the tiny model's context is prefilled in many pieces
CONTEXT = 256  # the tiny model's max_position_embeddings (tests/builders.py)
HELLO = [{"role": "user", "content": "hello"}]
JSON = {"content-type": "application/json"}
PATH_REFUSAL = "no such image file, or none this server reads"


@pytest.fixture(scope="module")
def served_app(tiny_model):
    model, processor = tiny_model
    return server.create_app(
        model,
        processor,
        "tiny",
        max_images=MAX_IMAGES,
        max_body_bytes=MAX_BODY,
        allowed_hosts=server.LOOPBACK_HOSTS,
        prefill_piece=PREFILL_PIECE,
    )


@pytest.fixture(scope="module")
def url(served_app):
    with server.serving_in_thread(served_app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (1-bit grey) and holds a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def png_of(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def with_image(url: str, **fields) -> dict:
    image = {"type": "image_url", "image_url": {"url": url}}
    content = [image, {"type": "text", "text": "What is this?"}]
    return {"json": {"messages": [{"role": "user", "content": content}], **fields}}


def asking(**fields) -> dict:
    return {"json": {"messages": HELLO, **fields}}


def raw(body: bytes, headers: dict | None = None) -> dict:
    return {"content": body, "headers": JSON if headers is None else headers}


def user(content) -> dict:
    return {"json": {"messages": [{"role": "user", "content": content}]}}


def pictures(count: int) -> dict:
    part = {"type": "image_url", "image_url": {"url": data_url(png_of((8, 8), (0, 0, 0)))}}
    return user([part] * count)


def chunked(body: bytes, size: int = 50_000):
    """`body` sent chunked, without a Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


HELLO_JSON = b'{"messages": [{"role": "user", "content": "hello"}]'
TOO_BIG = b'{"messages": "' + b"x" * MAX_BODY + b'"}'
LONG_TEXT = "one two three four " * 100  # over the tiny model's context

# (case, request (httpx.post's arguments), status, words in the error's message)
BAD_REQUESTS = [
    ("nested 100k arrays", raw(b"[" * 100_000 + b"]" * 100_000), 400, "nested too deeply"),
    ("nested 40k objects", raw(b'{"a":' * 40_000 + b"1" + b"}" * 40_000), 400, "nested"),
    ("nested content", user([[[[["hi"]]]]]), 400, "messages[0].content[0]: a part is"),
    ("NaN temperature", raw(HELLO_JSON + b', "temperature": NaN}'), 400, "NaN"),
    ("Infinity top_p", raw(HELLO_JSON + b', "top_p": Infinity}'), 400, "Infinity"),
    ("temperature 1e999", raw(HELLO_JSON + b', "temperature": 1e999}'), 400, "finite"),
    ("not UTF-8", raw(b'{"messages": "\xff\xfe"}'), 400, "not valid JSON"),
    (
        "lone surrogate",
        raw(HELLO_JSON[:-1] + b', {"role": "user", "content": "\\ud800"}]}'),
        400,
        "not valid Unicode",
    ),
    ("temperature below 0", asking(temperature=-0.1), 400, "temperature must be from 0 to 2"),
    ("temperature text", asking(temperature="hot"), 400, "temperature must be a number"),
    ("temperature 1e308", asking(temperature=1e308), 400, "from 0 to 2, not 1e+308"),
    ("temperature 1e-320", asking(temperature=1e-320), 400, "must be 0 (greedy) or at least"),
    ("top_p over 1", asking(top_p=1.5), 400, "top_p must be from 0 to 1"),
    ("top_p list", asking(top_p=[0.5]), 400, "not a list"),
    ("max_tokens -1", asking(max_tokens=-1), 400, "max_tokens must be at least 1"),
    ("max_tokens 1.5", asking(max_tokens=1.5), 400, "max_tokens must be an integer"),
    ("max_tokens object", asking(max_tokens={"a": 1}), 400, "not an object"),
    ("max_completion_tokens 0", asking(max_completion_tokens=0), 400, "at least 1"),
    ("seed -1", asking(seed=-1), 400, "seed must be from 0"),
    ("seed 2**70", asking(seed=2**70), 400, "seed must be from 0"),
    ("seed 1.5", asking(seed=1.5), 400, "seed must be an integer"),
    ("seed true", asking(seed=True), 400, "seed must be an integer"),
    ("stream 1", asking(stream=1), 400, "stream must be true or false"),
    ("stop nested", asking(stop=[["a"]]), 400, "stop must be"),
    ("n text", asking(n="2"), 400, "n must be an integer"),
    ("n true", asking(n=True), 400, "n must be an integer"),
    ("top_p 0", asking(top_p=0), 400, "top_p must be above 0"),
    ("user number", asking(user=5), 400, "user must be a string"),
    ("stream_options text", asking(stream_options="yes"), 400, "must be an object"),
    ("stream_options unknown", asking(stream_options={"chunk": 1}), 400, "field 'chunk'"),
    ("usage text", asking(stream_options={"include_usage": "yes"}), 400, "include_usage must be"),
    ("model list", asking(model=["tiny"]), 404, "unknown model a list"),
    ("model long", asking(model="m" * 10_000), 404, "unknown model 'mmm"),
    ("unknown field", asking(tools=[]), 400, "unknown field 'tools'"),
    ("unsupported penalty", asking(frequency_penalty=0.5), 400, "unknown field"),
    ("messages object", {"json": {"messages": {"role": "user"}}}, 400, "non-empty list"),
    (
        "message field",
        {"json": {"messages": [{**HELLO[0], "tool_calls": []}]}},
        400,
        "messages[0]: unknown field 'tool_calls'",
    ),
    ("role number", {"json": {"messages": [{"role": 5, "content": "hi"}]}}, 400, "role"),
    ("role tool", {"json": {"messages": [{"role": "tool", "content": "hi"}]}}, 400, "role"),
    ("name list", {"json": {"messages": [{**HELLO[0], "name": []}]}}, 400, "name must be"),
    ("content number", user(5), 400, "content must be a string or a list of parts"),
    ("content null", user(None), 400, "content must be a string"),
    ("text part number", user([{"type": "text", "text": 5}]), 400, "text must be a string"),
    ("text part field", user([{"type": "text", "text": "a", "x": 1}]), 400, "unknown field 'x'"),
    ("part type list", user([{"type": ["text"]}]), 400, "a part is"),
    (
        "image_url field",
        user([{"type": "image_url", "image_url": {"url": "", "size": 1}}]),
        400,
        "image_url: unknown field 'size'",
    ),
    ("image_url null", user([{"type": "image_url", "image_url": None}]), 400, "needs a url"),
    (
        "image detail unknown",
        user([{"type": "image_url", "image_url": {"url": "", "detail": "ultra"}}]),
        400,
        "image_url.detail must be one of auto, low, high",
    ),
    ("image url number", with_image(5), 400, "needs a url"),
    ("data URL, no comma", with_image("data:image/png;base64"), 400, "empty"),
    ("data URL, bad padding", with_image("data:image/png;base64,abc"), 400, "base64 is invalid"),
    ("data URL, spaces", with_image("data:image/png;base64,iVBO Rw0K"), 400, "base64"),
    ("data URL, not base64", with_image("data:image/png,iVBORw0K"), 400, "must be base64"),
    ("text as image", with_image(data_url(b"hello, not a picture")), 400, "not an image"),
    ("zip as image", with_image(data_url(b"PK\x03\x04" + bytes(60))), 400, "not an image"),
    ("PNG short of pixels", with_image(data_url(png_header(64, 64))), 400, "not a readable"),
    ("8000x8000 picture", with_image(data_url(png_header(8000, 8000))), 400, "too many pixels"),
    ("5000x5000 picture", with_image(data_url(png_header(5000, 5000))), 400, "too many pixels"),
    (
        "PNG claiming 100k x 100k",
        with_image(data_url(png_header(100_000, 100_000))),
        400,
        "too many pixels",
    ),
    ("ftp URL", with_image("ftp://example.com/a.png"), 400, "'ftp' URLs are not fetched"),
    ("missing path", with_image("/nowhere/at/all.png"), 400, PATH_REFUSAL),
    ("path of a folder", with_image("/"), 400, PATH_REFUSAL),
    ("path of a non-image", with_image(server.__file__), 400, PATH_REFUSAL),
    ("too many images", pictures(MAX_IMAGES + 1), 400, f"at most {MAX_IMAGES}"),
    ("prompt over the context", user(LONG_TEXT), 400, f"context holds {CONTEXT}"),
    ("over-long body", raw(TOO_BIG), 413, f"over {MAX_BODY:,} bytes"),
    ("over-long body, chunked", raw(chunked(TOO_BIG)), 413, "over"),
    ("form body", raw(b"messages=hello", {}), 415, "JSON"),
    (
        "foreign Host",
        {"json": {"messages": HELLO}, "headers": {"host": "attacker.example"}},
        400,
        "Host header",
    ),
]


@pytest.mark.parametrize(
    "request_, status, words", [case[1:] for case in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_request_gets_a_json_error(client, request_, status, words):
    response = client.post("/v1/chat/completions", **request_)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert words in error["message"], error
    assert error["type"] and len(error["message"]) < 300


def test_the_server_serves_on_after_bad_requests(client):
    response = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
    assert response.status_code == 200, response.text


def test_a_path_error_does_not_tell_whether_the_file_exists(client, tmp_path):
    present = tmp_path / "present.png"
    present.write_bytes(b"not a picture")
    answers = [
        client.post("/v1/chat/completions", **with_image(str(path))).json()["error"]["message"]
        for path in (tmp_path / "missing.png", present, tmp_path)
    ]
    assert len(set(answers)) == 1, answers


def test_a_failure_inside_names_no_server_path(served_app, client, monkeypatch):
    processor = served_app.state.served.processor

    def failing(*args, **kwargs):
        raise RuntimeError("cannot open /srv/models/secret/tokenizer.json")

    monkeypatch.setattr(processor, "apply_chat_template", failing)
    response = client.post("/v1/chat/completions", json={"messages": HELLO})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "/srv" not in error["message"]


@pytest.mark.parametrize(
    "host, status",
    [
        ("localhost:8080", 200),
        ("127.0.0.1", 200),
        ("[::1]:8080", 200),
        ("LOCALHOST", 200),
        ("attacker.example", 400),
        ("localhost.attacker.example:8080", 400),
        ("[::1].attacker.example", 400),
        ("", 400),
    ],
)
def test_host_names_a_loopback_server_answers(served_app, host, status):
    local = TestClient(served_app)  # not entered: the app's lifespan goes on with the server's
    response = local.get("/v1/models", headers={"host": host})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert ("error" in response.json()) is (status != 200)


def test_models_show_the_folder_name_not_the_path(tiny_model, tiny_model_dir):
    model, processor = tiny_model
    app = server.create_app(model, processor, str(tiny_model_dir))
    with TestClient(app) as local:
        listing = local.get("/v1/models")
        answer = local.post(
            "/v1/chat/completions",
            json={"messages": HELLO, "max_tokens": 2, "model": tiny_model_dir.name},
        )
        by_path = local.post(
            "/v1/chat/completions", json={"messages": HELLO, "model": str(tiny_model_dir)}
        )
    assert [entry["id"] for entry in listing.json()["data"]] == [tiny_model_dir.name]
    assert str(tiny_model_dir.parent) not in listing.text
    assert answer.status_code == 200 and answer.json()["model"] == tiny_model_dir.name
    assert by_path.status_code == 404


# -- the context -------------------------------------------------------------------------------


def filler(words: int) -> str:
    return " ".join(["word"] * words)


def filler_of(processor, tokens: int) -> str:
    """Filler text whose prompt, alone in a user message, is at most `tokens` long."""
    words = 1
    while prompt_length(processor, [{"role": "user", "content": filler(words + 1)}]) <= tokens:
        words += 1
    return filler(words)


def prompt_length(processor, messages: list) -> int:
    return len(processor.apply_chat_template(messages).input_ids)


@pytest.fixture
def generations(monkeypatch) -> list:
    """(prompt length, tokens reused from the cache) of every generate_tokens call the worker
    makes: one per prefill piece, then the answer's."""
    calls = []
    generate_tokens = generation.generate_tokens

    def counting(model, processor, inputs, settings, cache, reuse=0, *args):
        calls.append((len(inputs.input_ids), reuse))
        return generate_tokens(model, processor, inputs, settings, cache, reuse, *args)

    monkeypatch.setattr(generation, "generate_tokens", counting)
    return calls


def test_a_prompt_over_the_context_is_refused_before_the_worker(client, generations):
    started = time.monotonic()
    response = client.post("/v1/chat/completions", **user(LONG_TEXT * 5))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "context_length_exceeded" and "tokens" in error["message"]
    assert time.monotonic() - started < 5 and generations == []


def test_a_client_gone_before_its_whole_body_leaves_no_traceback(url, client):
    errors = []
    handler = logging.Handler()
    handler.emit = errors.append
    uvicorn_log = logging.getLogger("uvicorn.error")  # where uvicorn writes a failed request
    uvicorn_log.addHandler(handler)
    try:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as gone:
            head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            head += "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            gone.sendall(f"{head}{{".encode())  # 1 byte of the 1000 it announced
        time.sleep(0.5)  # the server reads what came, then finds the client gone
        assert client.post("/v1/chat/completions", **user("hi"), timeout=60).status_code == 200
    finally:
        uvicorn_log.removeHandler(handler)
    assert [record.getMessage() for record in errors if record.exc_info] == []


def test_a_long_text_is_refused_from_its_first_part(client, monkeypatch):
    tokenized = []
    tokenize = server.Processor.tokenize
    monkeypatch.setattr(
        server.Processor,
        "tokenize",
        lambda self, text: tokenized.append(len(text)) or tokenize(self, text),
    )
    text = "one two three " * (MAX_BODY // 15)  # as much as a request body holds
    response = client.post("/v1/chat/completions", **user([{"type": "text", "text": text}]))
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "context_length_exceeded"
    assert tokenized == [CONTEXT * server.CHARS_PER_TOKEN_CHECKED]  # of 280,000 characters


def test_image_tokens_count_against_the_context(client, tiny_model):
    _, processor = tiny_model
    png = png_of((32, 32), (200, 30, 30))
    images = [{"type": "image", "image": png}] * MAX_IMAGES

    def messages(words: int, pictures: list) -> list:
        return [{"role": "user", "content": [*pictures, {"type": "text", "text": filler(words)}]}]

    words = next(  # the fewest words that fill the context with the images, not without them
        n for n in range(1, CONTEXT) if prompt_length(processor, messages(n, images)) >= CONTEXT
    )
    assert prompt_length(processor, messages(words, [])) < CONTEXT
    as_text = client.post(
        "/v1/chat/completions", json={"messages": messages(words, []), "max_tokens": 1}
    )
    assert as_text.status_code == 200, as_text.text
    parts = [{"type": "image_url", "image_url": {"url": data_url(png)}}] * MAX_IMAGES
    with_pictures = client.post("/v1/chat/completions", json={"messages": messages(words, parts)})
    assert with_pictures.status_code == 400
    assert with_pictures.json()["error"]["type"] == "context_length_exceeded"


def test_max_tokens_is_capped_to_what_the_context_leaves(client, tiny_model):
    _, processor = tiny_model
    messages = [{"role": "user", "content": filler_of(processor, 150)}]
    prompt = prompt_length(processor, messages)
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 10**9})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["prompt_tokens"] == prompt
    assert body["usage"]["total_tokens"] == CONTEXT
    assert body["choices"][0]["finish_reason"] == "length"


def test_a_long_prompt_prefilled_in_pieces_answers_as_the_library(client, tiny_model, generations):
    model, processor = tiny_model
    png = png_of((40, 24), (10, 120, 240))
    text = {"type": "text", "text": filler_of(processor, 100)}
    content = [text, {"type": "image", "image": png}, text]
    expected = generate(model, processor, [{"role": "user", "content": content}], max_tokens=8)
    generations.clear()
    content[1] = {"type": "image_url", "image_url": {"url": data_url(png)}}
    response = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": content}], "max_tokens": 8},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == expected
    assert len(generations) > 5  # prefilled in pieces
    usage = body["usage"]
    assert usage["prompt_tokens"] == generations[-1][0]
    assert usage["prompt_tokens_details"]["cached_tokens"] == generations[0][1]
    assert body["timing"]["ttft_s"] > 0


# -- a client that leaves --------------------------------------------------------------------


@pytest.fixture
def held_prefill(monkeypatch) -> SimpleNamespace:
    """Holds the worker in its first generate_tokens call (a prefill piece) until `release` is
    set; records the prompt of every call (`calls`), each image encoding (`encoded`) and
    whether a job was cancelled."""
    held = SimpleNamespace(calls=[], encoded=[])
    held.entered, held.release, held.cancelled = (threading.Event() for _ in range(3))
    generate_tokens, cancel = generation.generate_tokens, server.Job.cancel
    encode = generation.ImageFeatureCache.encode

    def holding(model, processor, inputs, *args, **kwargs):
        held.calls.append(inputs.input_ids)
        held.entered.set()
        held.release.wait(10)
        return generate_tokens(model, processor, inputs, *args, **kwargs)

    def cancelling(self):
        cancel(self)
        held.cancelled.set()

    def encoding(self, model, tiles, keys):
        held.encoded.append(len(keys))
        return encode(self, model, tiles, keys)

    monkeypatch.setattr(generation, "generate_tokens", holding)
    monkeypatch.setattr(server.Job, "cancel", cancelling)
    monkeypatch.setattr(generation.ImageFeatureCache, "encode", encoding)
    return held


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_leaving_during_prefill_stops_before_the_next_piece(
    url, client, tiny_model, held_prefill, stream
):
    held, processor = held_prefill, tiny_model[1]
    png = png_of((30, 30), (7, 77, 177 + stream))  # new to the feature cache
    text = {"type": "text", "text": filler_of(processor, 200)}
    image = {"type": "image_url", "image_url": {"url": data_url(png)}}
    body = {"messages": [{"role": "user", "content": [text, image]}], "stream": stream}
    if stream:  # the first event comes before the prefill: leave once the worker is in it
        with httpx.Client(base_url=url, timeout=10) as other:
            with other.stream("POST", "/v1/chat/completions", json=body) as events:
                lines = events.iter_lines()  # kept: once collected, it closes the connection
                next(lines)
                assert held.entered.wait(5)
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1)
    assert held.entered.is_set() and held.cancelled.wait(5), "the server did not see it go"
    held.release.set()
    response = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
    assert response.status_code == 200  # the worker is free
    library = [{"role": "user", "content": [text, {"type": "image", "image": png}]}]
    prompt = processor.apply_chat_template(library).input_ids
    pieces = [ids for ids in held.calls if ids == prompt[: len(ids)]]
    assert len(pieces) == 1, pieces  # unstopped: about a dozen pieces, then the answer
    assert held.encoded == [], "the picture after the first piece was encoded"


# -- memory ----------------------------------------------------------------------------------


@pytest.fixture
def decoded_pictures(monkeypatch):
    """Weak references to every picture the server decodes; the cyclic collector is off, so
    only what nothing refers to is freed."""
    pictures = []
    load_image = server.load_image

    def recording(source):
        image = load_image(source)
        pictures.append(weakref.ref(image))
        return image

    monkeypatch.setattr(server, "load_image", recording)
    gc.disable()
    yield pictures
    gc.enable()


@pytest.mark.parametrize(
    "case, status",
    [("answered", 200), ("prompt over the context", 400), ("second picture bad", 400)],
)
def test_decoded_pictures_are_freed_with_their_request(client, decoded_pictures, case, status):
    picture = {"type": "image_url", "image_url": {"url": data_url(png_of((1200, 900), (1, 2, 3)))}}
    bad = {"type": "image_url", "image_url": {"url": data_url(b"not a picture")}}
    text = {"type": "text", "text": LONG_TEXT if case == "prompt over the context" else "hi"}
    content = [picture, bad, text] if case == "second picture bad" else [picture, text]
    response = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": content}], "max_tokens": 2},
    )
    assert response.status_code == status, response.text
    deadline = time.monotonic() + 2  # the worker lets go of its job after the last chunk
    while any(ref() is not None for ref in decoded_pictures) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert decoded_pictures and all(ref() is None for ref in decoded_pictures)

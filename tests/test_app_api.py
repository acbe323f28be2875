"""The app's OpenAI-compatible API against a live server on the tiny model: answers, streaming,
settings, bad input, 20 concurrent requests in order, stopping on disconnect, no disk writes."""

import asyncio
import concurrent.futures
import io
import itertools
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from app_helpers import data_url, record_generation, screen_png  # noqa: E402
from helpers import run_cli  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from mm1_mlx import generate as generation  # noqa: E402
from mm1_mlx.apps import server  # noqa: E402
from mm1_mlx.generate import generate  # noqa: E402

MAX_BODY = 200_000  # small, so a too-large body fits the socket buffers (the client reads the 413)
MAX_IMAGES = 3
QUESTION = "Where is the Send button?"


@pytest.fixture(scope="module")
def app(tiny_model):
    model, processor = tiny_model
    # A context longer than the tiny model's, so that a long answer outlasts a client's timeout.
    return server.create_app(
        model, processor, "tiny", max_images=MAX_IMAGES, max_body_bytes=MAX_BODY, context=4096
    )


@pytest.fixture(scope="module")
def url(app):
    with server.serving_in_thread(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def png():
    return screen_png()


def image_message(text: str, image_url: str) -> dict:
    image = {"type": "image_url", "image_url": {"url": image_url}}
    return {"role": "user", "content": [image, {"type": "text", "text": text}]}


def library_message(text: str, png: bytes) -> dict:
    """image_message as the processor takes it."""
    return {
        "role": "user",
        "content": [{"type": "image", "image": png}, {"type": "text", "text": text}],
    }


def ask(client, messages, **options) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"messages": messages, **options})


def answer_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def read_events(lines) -> list:
    """The JSON objects of a server-sent event stream, checking it ends with [DONE]."""
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


def streamed_text(events: list) -> str:
    return "".join(event["choices"][0]["delta"].get("content", "") for event in events)


def test_models_lists_the_served_model(client):
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    assert [model["id"] for model in listing["data"]] == ["tiny"]


def test_answer_equals_the_library_answer(client, tiny_model, png):
    response = ask(client, [image_message(QUESTION, data_url(png))], max_tokens=8, model="tiny")
    body = response.json()
    model, processor = tiny_model
    expected = generate(model, processor, [library_message(QUESTION, png)], max_tokens=8)
    assert answer_of(response) == expected
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8
    assert body["timing"]["ttft_s"] > 0 and body["timing"]["decode_tps"] > 0


def test_stream_assembles_to_the_non_streamed_answer(client, png):
    messages = [image_message(QUESTION, data_url(png))]
    expected = answer_of(ask(client, messages, max_tokens=10))
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 10, "stream": True},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response.iter_lines())
    assert len(events) > 3  # streamed in pieces
    assert {event["object"] for event in events} == {"chat.completion.chunk"}
    assert len({event["id"] for event in events}) == 1
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert streamed_text(events) == expected
    assert all(event["choices"][0]["finish_reason"] is None for event in events[:-1])
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["usage"]["completion_tokens"] > 0 and "ttft_s" in events[-1]["timing"]


def test_image_by_path_and_file_url_equals_data_url(client, png, tmp_path):
    path = tmp_path / "screen.png"
    path.write_bytes(png)
    answers = {
        source: answer_of(ask(client, [image_message(QUESTION, source)], max_tokens=6))
        for source in (data_url(png), str(path), path.as_uri())
    }
    assert len(set(answers.values())) == 1


def test_multi_turn_equals_the_library_answer(client, tiny_model, png):
    first = image_message(QUESTION, data_url(png))
    reply = answer_of(ask(client, [first], max_tokens=4))
    messages = [first, {"role": "assistant", "content": reply}, {"role": "user", "content": "And?"}]
    model, processor = tiny_model
    library = [library_message(QUESTION, png), *messages[1:]]
    assert answer_of(ask(client, messages, max_tokens=6)) == generate(
        model, processor, library, max_tokens=6
    )


def test_a_resent_conversation_reuses_the_cache_unless_its_picture_changed(client, tiny_model, png):
    first = image_message(QUESTION, data_url(png))
    response = ask(client, [first], max_tokens=4).json()
    first_prompt = response["usage"]["prompt_tokens"]
    reply = response["choices"][0]["message"]["content"]
    follow_up = [
        first,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And?"},
    ]
    usage = ask(client, follow_up, max_tokens=4).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= first_prompt
    other = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 200, 0)).save(other, format="PNG")
    changed = [image_message(QUESTION, data_url(other.getvalue())), *follow_up[1:]]
    usage = ask(client, changed, max_tokens=4).json()["usage"]
    model, processor = tiny_model
    ids = processor.apply_chat_template([library_message(QUESTION, png)]).input_ids
    before_the_picture = ids.index(model.image_token_id)
    assert usage["prompt_tokens_details"]["cached_tokens"] == before_the_picture


def test_generation_settings_are_honoured(client):
    messages = [{"role": "user", "content": "Describe the screen."}]
    long = ask(client, messages, max_tokens=12).json()
    assert long["choices"][0]["finish_reason"] == "length"
    assert long["usage"]["completion_tokens"] == 12
    text = long["choices"][0]["message"]["content"]
    stop = text[len(text) // 2 :][:2]
    stopped = ask(client, messages, max_tokens=12, stop=[stop]).json()
    assert stopped["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    sampled = [
        answer_of(ask(client, messages, max_tokens=12, temperature=1.5, top_p=0.9, seed=seed))
        for seed in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] != sampled[2]
    assert sampled[0] != text


@cache
def huge_png() -> bytes:
    """9000x9000 pixels (over the processor's 64 MP limit) in a few kilobytes."""
    out = io.BytesIO()
    Image.new("1", (9000, 9000)).save(out, "PNG")
    return out.getvalue()


def bad_requests(png: bytes) -> dict:
    """name -> (request body, or (raw bytes, headers)), expected status, words in the message."""
    hello = [{"role": "user", "content": "hello"}]

    def image(url: str) -> dict:
        return {"messages": [image_message("hi", url)]}

    too_big = b'{"messages": "' + b"x" * MAX_BODY + b'"}'
    json_header = {"content-type": "application/json"}
    return {
        "malformed JSON": ((b'{"messages": [', json_header), 400, "not valid JSON"),
        "not JSON": ((b"messages=hello", {}), 415, "JSON"),
        "JSON array": ([hello], 400, "JSON object"),
        "no messages": ({"model": "tiny"}, 400, "messages"),
        "empty messages": ({"messages": []}, 400, "messages"),
        "message not an object": ({"messages": ["hello"]}, 400, "messages[0]"),
        "no role": ({"messages": [{"content": "hi"}]}, 400, "role"),
        "unknown part": (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            400,
            "messages[0].content[0]",
        ),
        "unknown model": ({"messages": hello, "model": "gpt-4o"}, 404, "unknown model 'gpt-4o'"),
        "not an image": (image(data_url(b"just some text")), 400, "not an image"),
        "empty image": (image("data:image/png;base64,"), 400, "empty"),
        "truncated image": (image(data_url(png[:200])), 400, "not a readable image"),
        "too many pixels": (image(data_url(huge_png())), 400, "too many pixels"),
        "bad base64": (image("data:image/png;base64,@@@"), 400, "base64"),
        "data URL not base64": (image("data:image/png,abc"), 400, "base64"),
        "remote URL": (image("https://example.com/a.png"), 400, "not fetched"),
        "missing file": (image("/nowhere/screen.png"), 400, "no such image file"),
        "too many images": (
            {"messages": [image_message("hi", data_url(png))] * (MAX_IMAGES + 1)},
            400,
            f"at most {MAX_IMAGES}",
        ),
        "marker without image": (
            {"messages": [{"role": "user", "content": "<image> hi"}]},
            400,
            "1 <image> markers but 0 images",
        ),
        "too large": ((too_big, json_header), 413, f"over {MAX_BODY:,} bytes"),
        "too large, chunked": ((pieces(too_big), json_header), 413, "over"),
        "max_tokens 0": ({"messages": hello, "max_tokens": 0}, 400, "must be at least 1"),
        "max_tokens text": ({"messages": hello, "max_tokens": "9"}, 400, "must be an integer"),
        "max_tokens true": ({"messages": hello, "max_tokens": True}, 400, "an integer"),
        "temperature 5": ({"messages": hello, "temperature": 5}, 400, "from 0 to 2"),
        "stream text": ({"messages": hello, "stream": "yes"}, 400, "true or false"),
        "stop list of numbers": ({"messages": hello, "stop": [1]}, 400, "stop must be"),
        "two choices": ({"messages": hello, "n": 2}, 400, "n must be 1"),
    }


def pieces(body: bytes, size: int = 50_000):
    """`body` as a stream (sent chunked, without a Content-Length)."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize("name", list(bad_requests(b"")))
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(client, png, name):
    body, status, words = bad_requests(png)[name]
    if isinstance(body, tuple):
        content, headers = body
        response = client.post("/v1/chat/completions", content=content, headers=headers)
    else:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"]
    assert answer_of(ask(client, [{"role": "user", "content": "hi"}], max_tokens=2)) is not None


def test_unknown_routes_and_methods_answer_json(client):
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    wrong = client.get("/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["message"]


@pytest.fixture
def record_order(monkeypatch):
    """Records, as ("arrived" | "served", question number), when each request reached the
    generator's queue and when the worker started generating it."""
    events = []
    submit, generate_tokens = server.Generator.submit, generation.generate_tokens

    def question(processor, inputs) -> int:
        return int(re.search(r"Question (\d+)", processor.decode(inputs.input_ids)).group(1))

    def recording_submit(self, inputs, settings):
        events.append(("arrived", question(self.processor, inputs)))
        return submit(self, inputs, settings)

    def recording_generate(model, processor, inputs, *args, **kwargs):
        events.append(("served", question(processor, inputs)))
        return generate_tokens(model, processor, inputs, *args, **kwargs)

    monkeypatch.setattr(server.Generator, "submit", recording_submit)
    monkeypatch.setattr(generation, "generate_tokens", recording_generate)
    return events


def test_twenty_concurrent_requests_complete_in_arrival_order(url, client, png, record_order):
    def body(i: int) -> dict:
        question = f"Question {i}: what is on the screen?"
        messages = [image_message(question, data_url(png))]
        return {"messages": messages, "max_tokens": 8, "stream": i % 2 == 0}

    alone = [answer_of(ask(client, **{**body(i), "stream": False})) for i in range(20)]
    record_order.clear()

    async def one(http: httpx.AsyncClient, i: int) -> str:
        response = await http.post("/v1/chat/completions", json=body(i))
        assert response.status_code == 200, response.text
        if body(i)["stream"]:
            return streamed_text(read_events(response.text.splitlines()))
        return response.json()["choices"][0]["message"]["content"]

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(*(one(http, i) for i in range(20)))

    assert asyncio.run(all_at_once()) == alone
    arrived = [i for kind, i in record_order if kind == "arrived"]
    served = [i for kind, i in record_order if kind == "served"]
    assert sorted(arrived) == list(range(20))
    assert served == arrived
    queued = list(itertools.accumulate(1 if kind == "arrived" else -1 for kind, _ in record_order))
    assert max(queued) > 2, "the requests never waited for each other"


@pytest.fixture
def generated(monkeypatch):
    return record_generation(monkeypatch)


LONG = {"messages": [{"role": "user", "content": "Describe the screen."}], "max_tokens": 3000}


def assert_stopped_early(client, generated):
    """The generation stopped before its end, and the worker is free again."""
    time.sleep(0.2)
    count = len(generated)
    assert answer_of(ask(client, [{"role": "user", "content": "hi"}], max_tokens=2)) is not None
    assert 0 < count < 1000, count  # unstopped: 3000 tokens (about 10 s)
    assert all(chunk.finish_reason is None for chunk in generated[:count])


def test_closing_a_stream_stops_its_generation(url, client, generated):
    with httpx.Client(base_url=url, timeout=30) as other:
        with other.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as stream:
            # the first event only names the role (content ""): wait for generated text
            events = (json.loads(line[6:]) for line in stream.iter_lines() if line[6:7] == "{")
            while not next(events)["choices"][0]["delta"].get("content"):
                pass
    assert_stopped_early(client, generated)


def test_a_client_that_gives_up_stops_its_generation(url, client, generated):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=LONG, timeout=0.5)
    assert_stopped_early(client, generated)


def test_requests_the_server_stops_before_answering_get_503(tiny_model, monkeypatch):
    model, processor = tiny_model
    app = server.create_app(model, processor, "tiny")
    generator, release = app.state.served.generator, threading.Event()
    original = server.Generator._generate

    def held(self, job):  # the worker is busy until released
        release.wait(10)
        yield from original(self, job)

    monkeypatch.setattr(server.Generator, "_generate", held)
    hi = [{"role": "user", "content": "hi"}]
    with server.serving_in_thread(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(ask, client, hi)
            time.sleep(0.2)
            queued = pool.submit(ask, client, hi)
            time.sleep(0.2)
            generator.close()  # what Ctrl+C does
            release.set()
            responses = [running.result(), queued.result()]
        responses.append(ask(client, hi))  # after the server began stopping
    for response in responses:
        assert response.status_code == 503
        assert response.json()["error"]["message"].startswith("the server is stopping")


_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
_written: list | None = None  # a list while files_written() records


def _record_writes(event: str, args: tuple) -> None:
    if event == "open" and _written is not None and (args[2] or 0) & _WRITES:
        _written.append(args[0])


@cache
def _install_audit_hook() -> None:
    sys.addaudithook(_record_writes)  # it stays for the session: it records only when asked


@contextmanager
def files_written() -> Iterator[list]:
    """The files this process (every thread: the live server too) opens for writing."""
    global _written
    _install_audit_hook()
    _written = []
    try:
        yield _written
    finally:
        _written = None


def test_uploads_stay_in_memory(client, png, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    messages = [image_message(QUESTION, data_url(png))]
    with files_written() as written:
        answer_of(ask(client, messages, max_tokens=4))
        ask(client, messages, max_tokens=4, stream=True).raise_for_status()
    assert written == []
    assert list(tmp_path.iterdir()) == []
    with files_written() as written:  # the check itself sees writes
        Path("probe.txt").write_text("written")
    assert written == ["probe.txt"]


def test_page_and_its_files_are_served_from_here(client):
    page = client.get("/")
    assert (
        page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    )
    for name in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        assert client.get(name).status_code == 200, name
    for path in server.STATIC.iterdir():
        assert not re.search(r"https?://|=\"//", path.read_text()), (
            f"{path.name} loads from elsewhere"
        )


def test_loopback_server_refuses_other_host_names_and_paths(tiny_model, png, tmp_path):
    model, processor = tiny_model
    hosts = server.LOOPBACK_HOSTS
    app = server.create_app(model, processor, "tiny", read_paths=False, allowed_hosts=hosts)
    path = tmp_path / "screen.png"
    path.write_bytes(png)
    with TestClient(app, base_url="http://localhost:8080") as local:
        assert local.get("/v1/models").status_code == 200
        assert local.get("/v1/models", headers={"host": "attacker.example"}).status_code == 400
        refused = ask(local, [image_message("hi", str(path))])
        assert refused.status_code == 400 and "reads no local files" in refused.text
        assert ask(local, [image_message("hi", data_url(png))], max_tokens=2).status_code == 200


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("host, local", [("127.0.0.1", True), ("0.0.0.0", False)])
def test_app_command_serves_the_model_and_ctrl_c_ends_its_generations(
    tiny_model_dir, monkeypatch, host, local
):
    import uvicorn

    servers = []

    def run(self, sockets):  # instead of serving: what Ctrl+C does
        (listener,) = sockets
        servers.append((self, listener.getsockname()[1]))
        listener.close()
        self.handle_exit(signal.SIGINT, None)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    port = free_port()
    code, out, err = run_cli(
        "app", "--model", str(tiny_model_dir), "--host", host, "--port", str(port)
    )
    assert code == 0, err
    assert f"http://{host}:{port}" in out
    assert ("beyond this machine" in out) is not local
    ((uvicorn_server, listening),) = servers
    assert (uvicorn_server.config.host, uvicorn_server.config.port, listening) == (host, port, port)
    served = uvicorn_server.config.app.state.served
    assert served.name == str(tiny_model_dir) and served.read_paths is local
    assert served.generator.closing.is_set() and uvicorn_server.should_exit


def test_app_command_serves_the_demo_model_without_one(monkeypatch):
    import uvicorn

    from mm1_mlx.loading import DEMO_MODEL

    servers = []

    def run(self, sockets):  # no serving
        servers.append(self)
        sockets[0].close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    code, _, err = run_cli("app", "--port", str(free_port()))
    assert code == 0, err
    assert servers[0].config.app.state.served.name == str(DEMO_MODEL)

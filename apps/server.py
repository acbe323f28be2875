"""The chat app's server (`mm1-mlx app`): the page and an OpenAI-compatible API on one model.

Routes: `GET /` is the page (static/index.html; its script and styles under /static),
`GET /v1/models` lists the one model, `POST /v1/chat/completions` is OpenAI's chat completions:
messages with text and `image_url` parts (data URLs, or local paths), answered whole or streamed
as server-sent events. The page uses that same endpoint.

A request is parsed (JSON, images decoded, prompt laid out) on one thread, so requests reach the
generator in the order they arrived and bad input is refused before anything is queued. The
generator runs one request at a time on its own thread, first come first served: one model and
one KV cache in memory, and MLX work stays off the event loop so streams keep flowing. A client
resends the whole conversation every turn: the cache keeps the last prompt and answer, so what
a request shares with them (tokens and pictures) is not prefilled or encoded again. A request
whose client goes away is cancelled: skipped while queued, stopped at its next token once running.
Uploaded images stay in memory (bytes -> PIL images); nothing is written to disk.
"""

import asyncio
import base64
import binascii
import ipaddress
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mm1_mlx.errors import UserError
from mm1_mlx.generate import GenerationChunk, GenerationSettings, ImageFeatureCache, PromptCache
from mm1_mlx.model import MM1Model
from mm1_mlx.processor import Processor, PromptInputs

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 20 << 20
MAX_IMAGES = 8
LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
# Everything the page uses comes from this server; images are data: URLs of the uploads.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
_KINDS = {int: "an integer", float: "a number", bool: "true or false"}


class ApiError(Exception):
    """A refused request, answered with `status` and {"error": {"message", "type"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


# -- generation ------------------------------------------------------------------------------


@dataclass
class Job:
    """One request's generation: the worker thread fills `chunks`, the request reads them."""

    inputs: PromptInputs
    settings: GenerationSettings
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item: GenerationChunk | Exception | None) -> None:
        """From the worker: a chunk, the error that ended the generation, or None when done."""
        self.loop.call_soon_threadsafe(self.chunks.put_nowait, item)

    def cancel(self) -> None:
        """Skip the generation if it is queued, stop it at its next token if it is running."""
        self.cancelled.set()


class Generator:
    """Runs every request's generation on one thread, in the order they were submitted."""

    def __init__(self, model: MM1Model, processor: Processor):
        self.processor = processor
        self.prompt_cache = PromptCache(model)  # the worker thread alone uses the caches
        self.image_cache = ImageFeatureCache()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="mm1-generate")
        self.closing = threading.Event()

    def submit(self, inputs: PromptInputs, settings: GenerationSettings) -> Job:
        job = Job(inputs, settings, asyncio.get_running_loop())
        self.worker.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        try:
            if not (job.cancelled.is_set() or self.closing.is_set()):
                for chunk in self.prompt_cache.generate(
                    self.processor, job.inputs, job.settings, self.image_cache
                ):
                    job.put(chunk)
                    if job.cancelled.is_set() or self.closing.is_set():
                        break
        except Exception as error:  # the request reports it; the worker serves the next one
            job.put(error)
        job.put(None)

    def close(self) -> None:
        """Stop the running generation; the queued ones end at once, empty."""
        self.closing.set()
        self.worker.shutdown(wait=False)


async def answer(job: Job) -> AsyncIterator[GenerationChunk]:
    """The job's chunks as they come."""
    while (item := await job.chunks.get()) is not None:
        if isinstance(item, Exception):
            raise item
        yield item


# -- requests --------------------------------------------------------------------------------


@dataclass
class Served:
    """What the routes share: the model's name, its processor and generator, and the limits."""

    name: str
    processor: Processor
    generator: Generator
    max_images: int
    max_body_bytes: int
    read_paths: bool  # whether image_url may name a file on this machine
    parser: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="mm1-parse")
    )


@dataclass
class ChatRequest:
    inputs: PromptInputs
    settings: GenerationSettings
    stream: bool


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused as soon as it is known to exceed `limit` bytes."""
    too_large = ApiError(413, f"the request body is over {limit:,} bytes", "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_request(body: bytes, served: Served) -> ChatRequest:
    """A chat completion request's JSON -> the prompt's model inputs and the settings."""
    try:
        request = json.loads(body)
    except ValueError as error:
        raise ApiError(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = request.get("model")
    if model not in (None, "", served.name):
        raise ApiError(404, f"unknown model {model!r}; this server has {served.name!r}")
    if request.get("n", 1) != 1:
        raise ApiError(400, "n must be 1: one answer per request")
    settings, stream = read_settings(request), _option(request, "stream", bool, False)
    messages, images = read_messages(request.get("messages"), served.read_paths)
    if images > served.max_images:
        raise ApiError(400, f"too many images: {images}, at most {served.max_images} a request")
    try:  # decodes the images and lays out the prompt
        inputs = served.processor.apply_chat_template(messages)
    except UserError as error:
        raise ApiError(400, str(error)) from None
    return ChatRequest(inputs, settings, stream)


def read_messages(messages: Any, read_paths: bool) -> tuple[list[dict[str, Any]], int]:
    """OpenAI messages -> the processor's (an image part holds its bytes or its path), and how
    many images they hold. The processor checks roles and contents."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects")
    converted, images = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object with a role and a content")
        content = message.get("content")
        if isinstance(content, list):
            where = f"messages[{i}].content"
            content = [
                read_part(part, f"{where}[{j}]", read_paths) for j, part in enumerate(content)
            ]
            images += sum(part["type"] == "image" for part in content)
        converted.append({"role": message.get("role"), "content": content})
    return converted, images


def read_part(part: Any, where: str, read_paths: bool) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url  # {"url": ...} or the url itself
        return {"type": "image", "image": read_image_url(url, where, read_paths)}
    raise ApiError(
        400, f'{where}: a part is {{"type": "text", "text": ...}} or {{"type": "image_url", ...}}'
    )


def read_image_url(url: Any, where: str, read_paths: bool) -> bytes | Path:
    """A data URL's bytes, or the path a file:// URL or a plain path names. The processor
    decodes them, in memory, and refuses what is not an image or is too large."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}: image_url needs a url (a data URL or a local path)")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, f"{where}: the data URL must be base64 (data:image/png;base64,...)")
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error:
            raise ApiError(400, f"{where}: the data URL's base64 is invalid") from None
    parsed = urlparse(url)
    if parsed.scheme not in ("", "file"):
        raise ApiError(400, f"{where}: {parsed.scheme} URLs are not fetched; send a data URL")
    if not read_paths:
        raise ApiError(400, f"{where}: this server reads no local files; send a data URL")
    return Path(unquote(parsed.path) if parsed.scheme else url).expanduser()


def read_settings(request: dict[str, Any]) -> GenerationSettings:
    defaults = GenerationSettings()
    max_tokens = _option(request, "max_tokens", int, defaults.max_tokens, low=1)
    return GenerationSettings(
        max_tokens=_option(request, "max_completion_tokens", int, max_tokens, low=1),
        temperature=_option(request, "temperature", float, defaults.temperature, low=0, high=2),
        top_p=_option(request, "top_p", float, defaults.top_p, low=0, high=1),
        stop=read_stop(request.get("stop")),
        seed=_option(request, "seed", int, None),
    )


def _option(
    request: dict[str, Any],
    name: str,
    kind: type,
    default: Any,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """request[name] checked for its type and range; `default` where it is missing or null."""
    value = request.get(name)
    if value is None:
        return default
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:  # `type`, not isinstance: true is not an integer here
        raise ApiError(400, f"{name} must be {_KINDS[kind]}, not {json.dumps(value)[:40]}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ApiError(400, f"{name} must be {bounds}, not {value}")
    return value


def read_stop(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a string or a list of non-empty strings")
    return tuple(stops)


# -- responses -------------------------------------------------------------------------------


@dataclass
class Completion:
    """The fields every response object of one completion shares."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, delta: dict[str, str], last: GenerationChunk | None = None) -> dict[str, Any]:
        finish_reason = last.finish_reason if last else None
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {**self.head("chat.completion.chunk"), "choices": [choice], **statistics(last)}

    def message(self, text: str, last: GenerationChunk) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": last.finish_reason}
        return {**self.head("chat.completion"), "choices": [choice], **statistics(last)}


def statistics(last: GenerationChunk | None) -> dict[str, Any]:
    """OpenAI's usage, and (not OpenAI's) the timing the page shows: for the last chunk only."""
    if last is None:
        return {}
    prompt = last.prompt_tokens + last.cached_tokens
    usage = {"prompt_tokens": prompt, "completion_tokens": last.generated_tokens}
    usage["prompt_tokens_details"] = {"cached_tokens": last.cached_tokens}
    timing = {"ttft_s": last.ttft_s, "prefill_tps": last.prefill_tps}
    timing |= {"decode_tps": last.decode_tps, "peak_memory_gb": last.peak_memory_gb}
    return {"usage": usage | {"total_tokens": prompt + last.generated_tokens}, "timing": timing}


def error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def stream_events(job: Job, completion: Completion) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: a first chunk with the role, the text's chunks,
    a last chunk with the finish reason (and the statistics), then [DONE]."""
    try:
        yield sse(completion.chunk({"role": "assistant", "content": ""}))
        async for chunk in answer(job):
            if chunk.text:
                yield sse(completion.chunk({"content": chunk.text}))
            if chunk.finish_reason:
                yield sse(completion.chunk({}, chunk))
    except Exception as error:  # the status line is sent: the error goes in the stream
        yield sse(error_body(f"generation failed: {error}", "server_error"))
    finally:
        job.cancel()  # where the client went away (the stream was closed early)
    yield "data: [DONE]\n\n"


async def collect(job: Job) -> tuple[str, GenerationChunk]:
    pieces = []
    async for chunk in answer(job):
        pieces.append(chunk.text)
    return "".join(pieces), chunk


async def disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def complete(request: Request, job: Job, completion: Completion) -> Response:
    """The whole answer as one chat.completion, unless the client leaves first."""
    answering = asyncio.ensure_future(collect(job))
    leaving = asyncio.ensure_future(disconnected(request))
    await asyncio.wait([answering, leaving], return_when=asyncio.FIRST_COMPLETED)
    leaving.cancel()
    if not answering.done():
        answering.cancel()
        job.cancel()
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    return JSONResponse(completion.message(*answering.result()))


# -- routes ----------------------------------------------------------------------------------


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})


async def list_models(request: Request) -> Response:
    served: Served = request.app.state.served
    model = {"id": served.name, "object": "model", "created": 0, "owned_by": "mm1-mlx"}
    return JSONResponse({"object": "list", "data": [model]})


async def chat_completions(request: Request) -> Response:
    served: Served = request.app.state.served
    # JSON only. This also keeps other web sites' pages out: a browser sends their JSON posts
    # only after a CORS preflight, which this server does not grant.
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "send the request as JSON (Content-Type: application/json)")
    body = await read_body(request, served.max_body_bytes)
    loop = asyncio.get_running_loop()
    chat = await loop.run_in_executor(served.parser, parse_request, body, served)
    job = served.generator.submit(chat.inputs, chat.settings)
    completion = Completion(served.name)
    if chat.stream:
        events = stream_events(job, completion)
        return StreamingResponse(events, media_type="text/event-stream")
    return await complete(request, job, completion)


async def api_error(request: Request, error: ApiError) -> Response:
    return JSONResponse(error_body(error.message, error.kind), status_code=error.status)


async def http_error(request: Request, error: HTTPException) -> Response:
    """Unknown paths and methods answer in the API's error format too."""
    return JSONResponse(error_body(error.detail, "invalid_request_error"), error.status_code)


async def server_error(request: Request, error: Exception) -> Response:
    return JSONResponse(error_body(f"internal error: {error}", "server_error"), status_code=500)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    served: Served = app.state.served
    served.generator.close()
    served.parser.shutdown(wait=False, cancel_futures=True)


def create_app(
    model: MM1Model,
    processor: Processor,
    name: str,
    *,
    max_images: int = MAX_IMAGES,
    max_body_bytes: int = MAX_BODY_BYTES,
    read_paths: bool = True,
    allowed_hosts: list[str] | None = None,
) -> Starlette:
    """The app serving `model` as `name`. `allowed_hosts`: the Host names requests may carry
    (None: any); a loopback server allows only loopback names, so a web page that rebinds its
    own domain to 127.0.0.1 cannot reach it."""
    app = Starlette(
        routes=[
            Route("/", page),
            Route("/v1/models", list_models),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["*"])],
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            Exception: server_error,
        },
        lifespan=lifespan,
    )
    generator = Generator(model, processor)
    app.state.served = Served(name, processor, generator, max_images, max_body_bytes, read_paths)
    return app


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model: str | None, host: str = "127.0.0.1", port: int = 8080) -> None:
    """`mm1-mlx app`: load the model, then serve the page and the API until Ctrl+C."""
    from mm1_mlx.loading import load, model_or_default

    model = str(model_or_default(model))
    loaded, processor = load(model)
    local = is_loopback(host)
    hosts = [*LOOPBACK_HOSTS, host] if local else None
    app = create_app(loaded, processor, model, read_paths=local, allowed_hosts=hosts)
    address = f"[{host}]" if ":" in host else host
    print(f"mm1-mlx app: http://{address}:{port}  (Ctrl+C stops it)", flush=True)
    if not local:
        print("Listening beyond this machine: anyone who reaches it can use the model; "
              "image paths are refused, only uploads are read.", flush=True)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    handle_exit = server.handle_exit

    def stop(signum: int, frame: Any) -> None:
        # Ctrl+C ends the generations first: their answers end, so uvicorn, which waits for
        # open responses, exits at once instead of after every answer's last token.
        app.state.served.generator.close()
        handle_exit(signum, frame)

    server.handle_exit = stop
    server.run()

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
whose client goes away is cancelled: skipped while queued, stopped between the pieces its prompt
is prefilled in (its images encoded as their pieces come) or at its next token once answering.
A prompt must fit the model's context with at least one token of answer; max_tokens is capped
to what the context leaves. Uploaded images stay in memory (bytes -> PIL images, freed with the
request); nothing is written to disk. Every refusal is a JSON error, {"error": {...}}.
"""

import asyncio
import base64
import binascii
import dataclasses
import io
import ipaddress
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import uvicorn
from mlx_lm.models.cache import can_trim_prompt_cache
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from mm1_mlx.errors import UserError
from mm1_mlx.generate import (
    MAX_TEMPERATURE,
    GenerationChunk,
    GenerationSettings,
    ImageFeatureCache,
    PromptCache,
    check_context,
    model_context,
)
from mm1_mlx.model import MM1Model
from mm1_mlx.processor import Processor, PromptInputs, load_image, read_image_size

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 20 << 20
MAX_IMAGES = 8
# A picture is decoded whole before it is resized to the encoder's tiles: 4096x4096 holds a
# 12 MP photo and caps one picture at 48 MB of RGB, well below the processor's own limit.
MAX_IMAGE_PIXELS = 4096 * 4096
PREFILL_PIECE = 512  # prompt tokens prefilled between two looks for a cancelled request
LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
# Everything the page uses comes from this server; images are data: URLs of the uploads.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
ROLES = ("system", "user", "assistant")
# What a request may hold; anything else is refused rather than silently ignored.
REQUEST_FIELDS = (
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
    "seed", "stream", "n", "user", "stream_options",
)  # fmt: skip
MESSAGE_FIELDS = ("role", "content", "name")
IMAGE_URL_FIELDS = ("url", "detail")
# OpenAI's image detail levels: accepted, and every picture is tiled as the model's config says.
IMAGE_DETAILS = ("auto", "low", "high")
SEED_RANGE = (0, 2**64 - 1)
_KINDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "an object",
}
ONE_TOKEN = GenerationSettings(max_tokens=1)  # what a prefill piece is answered with
log = logging.getLogger(__name__)


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
        """Skip the generation if it is queued, stop it after its prefill piece or at its next
        token if it is running."""
        self.cancelled.set()


class Generator:
    """Runs every request's generation on one thread, in the order they were submitted."""

    def __init__(self, model: MM1Model, processor: Processor, prefill_piece: int = PREFILL_PIECE):
        self.processor = processor
        self.prompt_cache = PromptCache(model)  # the worker thread alone uses the caches
        self.image_cache = ImageFeatureCache()
        self.prefill_piece = prefill_piece
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="mm1-generate")
        self.closing = threading.Event()

    def submit(self, inputs: PromptInputs, settings: GenerationSettings) -> Job:
        if self.closing.is_set():
            raise ApiError(
                503, "the server is stopping; the request was not answered", "server_error"
            )
        job = Job(inputs, settings, asyncio.get_running_loop())
        self.worker.submit(self._run, job)
        return job

    def _stopped(self, job: Job) -> bool:
        return job.cancelled.is_set() or self.closing.is_set()

    def _run(self, job: Job) -> None:
        try:
            for chunk in self._generate(job):
                job.put(chunk)
                if self._stopped(job):
                    break
        except Exception as error:  # the request reports it; the worker serves the next one
            log.error("generation failed", exc_info=error)
            job.put(error)
        job.put(None)

    def _generate(self, job: Job) -> Iterator[GenerationChunk]:
        """The job's answer. A long prompt is first prefilled piece by piece (a prefix at a
        time, each answered with one token that the next piece trims off the cache), so a
        cancelled job stops between pieces instead of after the whole prefill."""
        started, inputs = time.perf_counter(), job.inputs
        if self._stopped(job):
            return
        reused = self.prompt_cache.reuse(inputs)
        pieces = self._piece_ends(inputs.input_ids, reused)
        for end in pieces:
            prefix = self._prefix(inputs, end)
            for _ in self.prompt_cache.generate(
                self.processor, prefix, ONE_TOKEN, self.image_cache
            ):
                pass
            if self._stopped(job):
                return
        answering = time.perf_counter()
        chunks = self.prompt_cache.generate(self.processor, inputs, job.settings, self.image_cache)
        if not pieces:
            yield from chunks
            return
        prefilled = len(inputs.input_ids) - reused
        for chunk in chunks:  # the statistics of the whole prompt, not of its last piece
            ttft = chunk.ttft_s + answering - started
            yield dataclasses.replace(
                chunk,
                prompt_tokens=prefilled,
                cached_tokens=reused,
                ttft_s=ttft,
                prefill_tps=prefilled / ttft,
            )

    def _piece_ends(self, ids: list[int], reused: int) -> list[int]:
        """Where the prompt's prefill pieces end: every `prefill_piece` tokens after the reused
        prefix, moved back out of image tiles (a tile's tokens come from one encoder call).
        None where the cache cannot be trimmed back after each piece (one piece, then)."""
        if not can_trim_prompt_cache(self.prompt_cache.cache):
            return []
        ends = []
        for end in range(reused + self.prefill_piece, len(ids) - 1, self.prefill_piece):
            end -= self._image_tokens(ids[:end]) % self._tile_tokens
            if end > (ends[-1] if ends else reused):
                ends.append(end)
        return ends

    @property
    def _tile_tokens(self) -> int:
        return self.prompt_cache.model.config.num_image_tokens

    def _image_tokens(self, ids: list[int]) -> int:
        return ids.count(self.prompt_cache.model.image_token_id)

    def _prefix(self, inputs: PromptInputs, end: int) -> PromptInputs:
        """The prompt's first `end` tokens with their images' tiles."""
        tiles = self._image_tokens(inputs.input_ids[:end]) // self._tile_tokens
        pixels = inputs.tiles[:tiles] if tiles else None
        return PromptInputs(
            inputs.input_ids[:end], pixels, inputs.tile_keys[:tiles], inputs.image_sizes
        )

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
    """What the routes share: the model's name (as loaded) and the id clients know it by, its
    processor and generator, and the limits."""

    name: str
    model_id: str
    processor: Processor
    generator: Generator
    max_images: int
    max_body_bytes: int
    read_paths: bool  # whether image_url may name a file on this machine
    context: int | None  # the tokens a prompt and its answer may hold together
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
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:  # gone before its whole body came: nobody to answer
        raise ApiError(400, "the client went away before its request's whole body came") from None
    return bytes(body)


def parse_request(body: bytes, served: Served) -> ChatRequest:
    """A chat completion request's JSON -> the prompt's model inputs and the settings."""
    request = read_json(body)
    unknown = [name for name in request if name not in REQUEST_FIELDS]
    if unknown:
        raise ApiError(
            400, f"unknown field {_shown(unknown[0])}; known: {', '.join(REQUEST_FIELDS)}"
        )
    model = request.get("model")
    if model not in (None, "", served.model_id):
        raise ApiError(404, f"unknown model {_shown(model)}; this server has {served.model_id!r}")
    if _option(request, "n", int, 1) != 1:
        raise ApiError(400, "n must be 1: one answer per request")
    _option(request, "user", str, None)
    read_stream_options(_option(request, "stream_options", dict, {}))
    settings, stream = read_settings(request), _option(request, "stream", bool, False)
    messages, images = read_messages(request.get("messages"), served.read_paths)
    if len(images) > served.max_images:
        raise ApiError(
            400, f"too many images: {len(images)}, at most {served.max_images} a request"
        )
    refuse_long_text(served.processor, messages, served.context)
    inputs = prompt_inputs(served.processor, messages, images)
    return ChatRequest(inputs, fit_context(inputs, settings, served.context), stream)


# OpenAI's stream options: usage comes with the last chunk whatever they say.
STREAM_OPTIONS = ("include_usage", "include_obfuscation")


def read_stream_options(options: dict[str, Any]) -> None:
    for name in options:
        if name not in STREAM_OPTIONS:
            known = ", ".join(STREAM_OPTIONS)
            raise ApiError(400, f"unknown stream_options field {_shown(name)}; known: {known}")
        _option(options, name, bool, None)


def read_json(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None
    except ValueError as error:
        raise ApiError(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise ApiError(400, "the body must be a JSON object")
    return request


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def prompt_inputs(
    processor: Processor, messages: list[dict[str, Any]], images: list
) -> PromptInputs:
    """The processor's inputs for the messages, whose image parts name the `images` they hold
    by index. The pictures are decoded here, one by one, and dropped once tiled."""
    decoded = [decode_image(source, where) for source, where in images]
    for message in messages:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image":
                    part["image"] = decoded[part["image"]]
    try:  # lays out the prompt and tiles the images
        return processor.apply_chat_template(messages)
    except UserError as error:
        raise ApiError(400, str(error)) from None


# Text this many times the context in characters is tokenized only in part first: a few
# megabytes would otherwise keep a parser thread busy for seconds before being refused.
CHARS_PER_TOKEN_CHECKED = 8


def refuse_long_text(processor: Processor, messages: list[dict[str, Any]], context: int | None):
    """Refuse, without tokenizing all of it, text whose first part alone overflows the context
    (the whole prompt is at least as long, give or take a token where the part is cut)."""
    if context is None:
        return
    texts = [
        part["text"] if isinstance(part, dict) else part
        for message in messages
        for part in (
            message["content"] if isinstance(message["content"], list) else [message["content"]]
        )
        if not isinstance(part, dict) or part["type"] == "text"
    ]
    text, limit = "\n".join(texts), context * CHARS_PER_TOKEN_CHECKED
    if len(text) > limit and len(processor.tokenize(text[:limit])) > context + 1:
        raise ApiError(
            400,
            f"the prompt's text is over {context:,} tokens; this model's context holds {context:,}",
            "context_length_exceeded",
        )


def fit_context(
    inputs: PromptInputs, settings: GenerationSettings, context: int | None
) -> GenerationSettings:
    """`settings` with max_tokens capped to what the context leaves after the prompt; a prompt
    that leaves no room for an answer is refused."""
    if context is None:
        return settings
    prompt = len(inputs.input_ids)
    try:
        check_context(prompt, context)
    except UserError as error:
        raise ApiError(400, str(error), "context_length_exceeded") from None
    return dataclasses.replace(settings, max_tokens=min(settings.max_tokens, context - prompt))


def read_messages(messages: Any, read_paths: bool) -> tuple[list[dict[str, Any]], list]:
    """OpenAI messages -> the processor's, each image part holding the index of its picture in
    the list of (bytes or path, where in the request) returned with them."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects")
    converted, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with a role and a content")
        _check_fields(message, MESSAGE_FIELDS, where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}")
        _option(message, "name", str, None)
        if isinstance(content, list):
            content = [
                read_part(part, f"{where}.content[{j}]", read_paths, images)
                for j, part in enumerate(content)
            ]
        else:
            content = _text(content, f"{where}.content", "a string or a list of parts")
        converted.append({"role": role, "content": content})
    return converted, images


def read_part(part: Any, where: str, read_paths: bool, images: list) -> dict[str, Any]:
    """A content part -> the processor's; an image's source is appended to `images`."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        _check_fields(part, ("type", "text"), where)
        return {"type": "text", "text": _text(part.get("text"), f"{where}.text", "a string")}
    if kind == "image_url":
        _check_fields(part, ("type", "image_url"), where)
        url = part.get("image_url")
        if isinstance(url, dict):  # {"url": ..., "detail": ...} or the url itself
            _check_fields(url, IMAGE_URL_FIELDS, f"{where}.image_url")
            if _option(url, "detail", str, "auto") not in IMAGE_DETAILS:
                raise ApiError(
                    400, f"{where}.image_url.detail must be one of {', '.join(IMAGE_DETAILS)}"
                )
            url = url.get("url")
        images.append((read_image_url(url, where, read_paths), where))
        return {"type": "image", "image": len(images) - 1}
    raise ApiError(
        400, f'{where}: a part is {{"type": "text", "text": ...}} or {{"type": "image_url", ...}}'
    )


def _check_fields(value: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = [name for name in value if name not in known]
    if unknown:
        raise ApiError(
            400, f"{where}: unknown field {_shown(unknown[0])}; known: {', '.join(known)}"
        )


def _text(value: Any, where: str, kinds: str) -> str:
    """A string the tokenizer can take (lone UTF-16 surrogates are no text)."""
    if not isinstance(value, str):
        raise ApiError(400, f"{where} must be {kinds}, not {_shown(value)}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ApiError(400, f"{where} is not valid Unicode (a lone surrogate)") from None
    return value


def read_image_url(url: Any, where: str, read_paths: bool) -> bytes | Path:
    """A data URL's bytes, or the path a file:// URL or a plain path names."""
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
        raise ApiError(
            400, f"{where}: {_shown(parsed.scheme)} URLs are not fetched; send a data URL"
        )
    if not read_paths:
        raise ApiError(400, f"{where}: this server reads no local files; send a data URL")
    return Path(unquote(parsed.path) if parsed.scheme else url).expanduser()


def decode_image(source: bytes | Path, where: str) -> Image.Image:
    """The picture, decoded in memory once its header shows at most MAX_IMAGE_PIXELS. Whatever
    fails with a path gets one message: the answer must not tell which files exist here."""
    try:
        width, height = image_size(source)
        if width * height > MAX_IMAGE_PIXELS:
            raise UserError(
                f"{width}x{height} has too many pixels (more than {MAX_IMAGE_PIXELS:,})"
            )
        return load_image(source)
    except UserError as error:
        hidden = isinstance(source, Path)
        message = "no such image file, or none this server reads" if hidden else str(error)
        raise ApiError(400, f"{where}: {message}") from None


def image_size(source: bytes | Path) -> tuple[int, int]:
    """The picture's (width, height) from its header; (0, 0) where the header does not say
    (load_image then names what is wrong)."""
    if isinstance(source, Path):
        return read_image_size(source)
    try:
        with Image.open(io.BytesIO(source)) as image:
            return image.size
    except Exception:  # PIL raises many types on bad headers
        return 0, 0


def read_settings(request: dict[str, Any]) -> GenerationSettings:
    defaults = GenerationSettings()
    max_tokens = _option(request, "max_tokens", int, defaults.max_tokens, low=1)
    try:
        return GenerationSettings(
            max_tokens=_option(request, "max_completion_tokens", int, max_tokens, low=1),
            temperature=_option(
                request, "temperature", float, defaults.temperature, low=0, high=MAX_TEMPERATURE
            ),
            top_p=_option(request, "top_p", float, defaults.top_p, low=0, high=1),
            stop=read_stop(request.get("stop")),
            seed=_option(request, "seed", int, None, *SEED_RANGE),
        )
    except UserError as error:  # what the settings themselves refuse
        raise ApiError(400, str(error)) from None


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
        raise ApiError(400, f"{name} must be {_KINDS[kind]}, not {_shown(value)}")
    if kind is float and not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, not {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ApiError(400, f"{name} must be {bounds}, not {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """A request value as an error message quotes it: scalars (shortened), else their kind."""
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, (int, float, bool)) or value is None:
        return json.dumps(value)[:40]
    return "a list" if isinstance(value, list) else "an object"


def read_stop(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a string or a list of non-empty strings")
    return tuple(_text(s, "stop", "a string") for s in stops)


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


async def stream_events(
    job: Job, completion: Completion, watcher: asyncio.Task
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: a first chunk with the role, the text's chunks,
    a last chunk with the finish reason (and the statistics), then [DONE]. `watcher` (see
    cancel_when_gone) ends with the stream."""
    try:
        yield sse(completion.chunk({"role": "assistant", "content": ""}))
        async for chunk in answer(job):
            if chunk.text:
                yield sse(completion.chunk({"content": chunk.text}))
            if chunk.finish_reason:
                yield sse(completion.chunk({}, chunk))
    except Exception as error:  # the status line is sent: the error goes in the stream
        yield sse(error_body(internal_error(error), "server_error"))
    finally:
        job.cancel()  # where the client went away (the stream was closed early)
        watcher.cancel()
    yield "data: [DONE]\n\n"


async def collect(job: Job) -> tuple[str, GenerationChunk]:
    pieces, last = [], None
    async for last in answer(job):
        pieces.append(last.text)
    if last is None:  # the server stopped the job before its first token
        raise ApiError(503, "the server is stopping; the request was not answered", "server_error")
    return "".join(pieces), last


async def disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def cancel_when_gone(request: Request, job: Job) -> asyncio.Task:
    """Cancels `job` when its client goes away: at once, even while nothing is being sent
    (a queued job, or one still prefilling). Ends with the connection."""

    async def watch() -> None:
        await disconnected(request)
        job.cancel()  # a no-op for a job already answered

    return asyncio.ensure_future(watch())


async def complete(request: Request, job: Job, completion: Completion) -> Response:
    """The whole answer as one chat.completion, unless the client leaves first."""
    leaving = cancel_when_gone(request, job)
    answering = asyncio.ensure_future(collect(job))
    await asyncio.wait([answering, leaving], return_when=asyncio.FIRST_COMPLETED)
    leaving.cancel()
    if not answering.done():
        answering.cancel()
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    return JSONResponse(completion.message(*answering.result()))


# -- routes ----------------------------------------------------------------------------------


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})


async def list_models(request: Request) -> Response:
    served: Served = request.app.state.served
    model = {"id": served.model_id, "object": "model", "created": 0, "owned_by": "mm1-mlx"}
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
    completion = Completion(served.model_id)
    if chat.stream:
        events = stream_events(job, completion, cancel_when_gone(request, job))
        return StreamingResponse(events, media_type="text/event-stream")
    return await complete(request, job, completion)


def internal_error(error: Exception) -> str:
    """What a client is told of a failure (its text may name files here): its kind only."""
    return f"internal error ({type(error).__name__}); the server's log has the details"


async def api_error(request: Request, error: ApiError) -> Response:
    return JSONResponse(error_body(error.message, error.kind), status_code=error.status)


async def http_error(request: Request, error: HTTPException) -> Response:
    """Unknown paths and methods answer in the API's error format too."""
    return JSONResponse(error_body(error.detail, "invalid_request_error"), error.status_code)


async def server_error(request: Request, error: Exception) -> Response:
    return JSONResponse(error_body(internal_error(error), "server_error"), status_code=500)


class HostGuard:
    """Refuses, with a JSON error, requests whose Host header names none of `hosts`: a web page
    that rebinds its own domain to this machine's address cannot reach the server."""

    def __init__(self, app: ASGIApp, hosts: list[str]):
        self.app, self.hosts = app, {host.lower() for host in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and host_name(Headers(scope=scope).get("host", "")) not in self.hosts
        ):
            message = "this server answers only to its own host names (the Host header)"
            refusal = JSONResponse(error_body(message, "invalid_request_error"), status_code=400)
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


def host_name(header: str) -> str:
    """A Host header without its port; an IPv6 address keeps its brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        address, _, port = header.partition("]")
        return address + "]" if port[:1] in ("", ":") else header
    return header.partition(":")[0]


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
    context: int | None = None,
    prefill_piece: int = PREFILL_PIECE,
) -> Starlette:
    """The app serving `model`, loaded from `name` (a folder or a name; clients see its last
    part, never a path). `allowed_hosts`: the Host names requests may carry (None: any); a
    loopback server allows only loopback names, so a web page that rebinds its own domain to
    127.0.0.1 cannot reach it. `context`: the tokens a prompt and its answer may hold (default:
    the model's max_position_embeddings). `prefill_piece`: the prompt tokens prefilled between
    two looks for a cancelled request."""
    app = Starlette(
        routes=[
            Route("/", page),
            Route("/v1/models", list_models),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[Middleware(HostGuard, hosts=allowed_hosts)] if allowed_hosts else [],
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            Exception: server_error,
        },
        lifespan=lifespan,
    )
    generator = Generator(model, processor, prefill_piece)
    app.state.served = Served(
        name,
        Path(name).name or name,
        processor,
        generator,
        max_images,
        max_body_bytes,
        read_paths,
        context or model_context(model),
    )
    return app


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, or a one-line UserError (an unknown host, a
    port in use or reserved): taken before the model loads, and kept for uvicorn, so no other
    program can take the port in between."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError):
        raise UserError(f"--host {host!r}: not an address of this machine") from None
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        listener.bind((host, port))
        listener.listen(128)
    except OSError as error:
        listener.close()
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return listener


@contextmanager
def serving_in_thread(app: Starlette) -> Iterator[str]:
    """`app` served by uvicorn on a free 127.0.0.1 port, in a thread of this process (for tests
    and scripts); yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


def serve(model: str | None, host: str = "127.0.0.1", port: int = 8080) -> None:
    """`mm1-mlx app`: load the model, then serve the page and the API until Ctrl+C."""
    from mm1_mlx.loading import load, model_or_default

    listener = listening_socket(host, port)
    model = str(model_or_default(model))
    loaded, processor = load(model)
    local = is_loopback(host)
    address = f"[{host}]" if ":" in host else host
    hosts = [*LOOPBACK_HOSTS, address] if local else None
    app = create_app(loaded, processor, model, read_paths=local, allowed_hosts=hosts)
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
    server.run(sockets=[listener])

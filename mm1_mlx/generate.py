"""Streaming generation with a KV cache, and chats that keep theirs between turns.

The decode loop is mlx-lm's own `generate_step` on the decoder, fed the prompt's embeddings
(image features in the image-token positions), so decoding costs what it costs in mlx-lm.
A `ChatSession` keeps its KV cache: each turn re-renders the conversation, reuses the cached
prefix it shares with the new prompt and prefills only the rest, so earlier turns and their
images are neither re-encoded nor re-prefilled. Encoded image tiles are also cached by content.
"""

import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mm1_mlx.errors import UserError
from mm1_mlx.jsonl import BadLine, check_text
from mm1_mlx.model import MM1Model
from mm1_mlx.processor import ImageInput, Processor, PromptInputs, common_prefix_length

MIN_TEMPERATURE = 1e-4  # below it, sampling is greedy in all but name
# OpenAI's range, and the app's: hotter only flattens the answers toward random tokens.
MAX_TEMPERATURE: float = 2  # an int: messages say "2"
# Seen tokens' logits are divided (positive) or multiplied (negative) by the penalty in the
# model's dtype (CTRL suggests 1.2): by 100 a seen token is all but ruled out, and a penalty far
# past it (or far under 1/100) takes logits out of float16's range.
MAX_REPETITION_PENALTY = 100.0


@dataclass
class GenerationSettings:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    repetition_context_size: int = 64
    stop: Sequence[str] = ()  # stop strings (not included in the answer); EOS always stops
    seed: int | None = None

    def __post_init__(self):
        # mlx-lm reads a negative max_tokens as "no limit": a model that never says EOS would
        # never stop.
        if self.max_tokens < 1:
            raise UserError(f"max_tokens must be at least 1, not {self.max_tokens}")
        # mlx-lm reads a top-p of 0 as "off"; a nucleus of no probability mass samples nothing.
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be above 0 and at most 1, not {self.top_p}")
        # Sampling multiplies the log-probabilities by 1 / temperature: under 1.5e-5 that
        # overflows half precision (under 1e-308 even Python's float), and 0 x inf at the
        # likeliest token is NaN: tokens came out at random instead of greedily.
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise UserError(
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, "
                f"not {self.temperature}"
            )
        if not self.temperature <= MAX_TEMPERATURE:
            raise UserError(
                f"temperature must be at most {MAX_TEMPERATURE:g}, not {self.temperature:g}"
            )
        low, high = 1 / MAX_REPETITION_PENALTY, MAX_REPETITION_PENALTY
        if not low <= self.repetition_penalty <= high:
            raise UserError(
                f"repetition_penalty must be from {low:g} to {high:g} (1: off), "
                f"not {self.repetition_penalty:g}"
            )

    def check_for(self, model: MM1Model) -> None:
        """What depends on the model: mlx-lm's top-k needs k below the vocabulary."""
        vocab = model.config.text_config.get("vocab_size")
        if self.top_k and isinstance(vocab, int) and self.top_k >= vocab:
            raise UserError(
                f"--top-k {self.top_k} must be below the model's vocabulary of {vocab} tokens"
            )


@dataclass
class GenerationChunk:
    """A piece of streamed text, with the running statistics of the call that made it."""

    text: str
    token: int | None
    finish_reason: str | None = None  # None while streaming, then "stop" or "length"
    prompt_tokens: int = 0  # prefilled in this call
    cached_tokens: int = 0  # reused from the KV cache instead
    generated_tokens: int = 0
    ttft_s: float = 0.0  # time to first token: image encoding, prefill and the first sample
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    peak_memory_gb: float = 0.0
    tokens: list[int] = field(default_factory=list)  # the last chunk: every generated token id


class ImageFeatureCache:
    """Encoded tiles by content key (least recently used dropped first)."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self.features: OrderedDict[str, mx.array] = OrderedDict()

    def encode(self, model: MM1Model, tiles: Any, keys: Sequence[str]) -> mx.array:
        """[num_tiles, T, hidden] for `tiles` ([num_tiles, S, S, 3]), encoding only new ones."""
        missing = [i for i, key in enumerate(keys) if key not in self.features]
        if missing:
            encoded = model.encode_images(mx.array(tiles[missing]))
            mx.eval(encoded)
            for row, i in enumerate(missing):
                self.features[keys[i]] = encoded[row]
        for key in keys:
            self.features.move_to_end(key)
        while len(self.features) > self.capacity:
            self.features.popitem(last=False)
        return mx.stack([self.features[key] for key in keys])


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could begin a stop string (not yet safe to show)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


def _image_tiles_before(
    input_ids: Sequence[int], position: int, image_token_id: int, per_tile: int
):
    """How many whole image tiles lie before `position`, and where a cut there is safe.

    A reused prefix may not end inside an image's token block: the block's features come from
    one encoder call, so the cut moves back to the block's start.
    """
    count = sum(1 for token in input_ids[:position] if token == image_token_id)
    partial = count % per_tile
    return count // per_tile, position - partial


def valid_text(text: str, what: str) -> None:
    """Refuse text the tokenizer cannot take: lone surrogates, which is how Python reads
    bytes that are not UTF-8 in arguments and on stdin."""
    try:
        check_text(text, what)
    except BadLine as error:
        raise UserError(str(error)) from None


def with_image_markers(text: str, num_images: int, marker: str) -> str:
    """Text that places its images with markers, or gets them first, one per line."""
    if num_images and marker not in text:
        return "\n".join([marker] * num_images + [text])
    return text


def model_context(model: MM1Model) -> int | None:
    """The positions the model's decoder was made for (None where its config does not say)."""
    return model.config.text_config.get("max_position_embeddings")


def check_context(prompt_tokens: int, context: int | None) -> None:
    """A prompt must leave the context (None: no limit) room for at least one token of answer."""
    if context is not None and prompt_tokens >= context:
        raise UserError(
            f"the prompt is {prompt_tokens:,} tokens (its text and images); this model's context "
            f"holds {context:,}, and the answer needs at least one"
        )


def generate_tokens(
    model: MM1Model,
    processor: Processor,
    inputs: PromptInputs,
    settings: GenerationSettings,
    cache: list[Any],
    reuse: int = 0,
    image_cache: ImageFeatureCache | None = None,
) -> Iterator[GenerationChunk]:
    """Stream the answer to `inputs`, whose first `reuse` tokens are already in `cache`."""
    settings.check_for(model)
    check_context(len(inputs.input_ids), model_context(model))
    start = time.perf_counter()
    if settings.seed is not None:
        mx.random.seed(settings.seed)
    ids = inputs.input_ids[reuse:]
    tiles_done, _ = _image_tiles_before(
        inputs.input_ids, reuse, model.image_token_id, model.config.num_image_tokens
    )
    features = None
    if inputs.tiles is not None and tiles_done < len(inputs.tiles):
        image_cache = image_cache or ImageFeatureCache()
        keys = inputs.tile_keys[tiles_done:]
        features = image_cache.encode(model, inputs.tiles[tiles_done:], keys)
    prompt = mx.array(ids)
    embeddings = model.embed(prompt[None], image_features=features)[0]

    sampler = make_sampler(
        settings.temperature, settings.top_p, settings.min_p, top_k=settings.top_k
    )
    processors = make_logits_processors(
        repetition_penalty=settings.repetition_penalty
        if settings.repetition_penalty != 1
        else None,
        repetition_context_size=settings.repetition_context_size,
    )
    detokenizer = processor.tokenizer.detokenizer
    detokenizer.reset()
    eos = set(processor.tokenizer.eos_token_ids)
    stats = GenerationChunk("", None, prompt_tokens=len(ids), cached_tokens=reuse)
    text, shown, first_token_at, generated, cut_at_stop = "", 0, 0.0, [], False
    steps = generate_step(
        prompt,
        model.decoder,
        max_tokens=settings.max_tokens,
        sampler=sampler,
        logits_processors=processors,
        prompt_cache=cache,
        input_embeddings=embeddings,
    )
    for token, _ in steps:
        generated.append(token)
        now = time.perf_counter()
        if stats.generated_tokens == 0:
            first_token_at = now
            stats.ttft_s = now - start
            stats.prefill_tps = len(ids) / stats.ttft_s
        stats.generated_tokens += 1
        if stats.generated_tokens > 1:
            stats.decode_tps = (stats.generated_tokens - 1) / (now - first_token_at)
        if token in eos:
            stats.finish_reason = "stop"
            break
        detokenizer.add_token(token)
        text += detokenizer.last_segment
        cut = min((text.find(s) for s in settings.stop if s in text), default=-1)
        if cut >= 0:
            text, stats.finish_reason, cut_at_stop = text[:cut], "stop", True
            break
        safe = len(text) - _held_back(text, settings.stop)
        if safe > shown:
            yield _chunk(stats, text[shown:safe], token)
            shown = safe
    else:
        stats.finish_reason = "length"
    if not cut_at_stop:  # the detokenizer may still hold the end of a multi-byte character
        detokenizer.finalize()
        text += detokenizer.last_segment
    stats.peak_memory_gb = mx.get_peak_memory() / 1e9
    stats.tokens = generated
    yield _chunk(stats, text[shown:], None)


def _chunk(stats: GenerationChunk, text: str, token: int | None) -> GenerationChunk:
    return GenerationChunk(**{**stats.__dict__, "text": text, "token": token})


def stream_generate(
    model: MM1Model,
    processor: Processor,
    prompt: str | list[dict],
    images: Sequence[ImageInput] = (),
    settings: GenerationSettings | None = None,
    chat_template: bool = True,
    **settings_overrides: Any,
) -> Iterator[GenerationChunk]:
    """One call for apps: a prompt (text with `<image>` markers, else the images go first, or
    chat messages) and its images in, streamed text pieces with timing out. Text goes through
    the chat template as one user turn unless `chat_template=False`."""
    settings = settings or GenerationSettings(**settings_overrides)
    if isinstance(prompt, str):
        prompt = with_image_markers(prompt, len(images), processor.config.image_token)
    if isinstance(prompt, str) and not chat_template:
        inputs = processor.encode(prompt, images)
    else:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        inputs = processor.apply_chat_template(messages, images)
    yield from generate_tokens(model, processor, inputs, settings, make_prompt_cache(model.decoder))


def generate(
    model: MM1Model, processor: Processor, prompt: str | list[dict], images=(), **settings: Any
) -> str:
    return "".join(
        chunk.text for chunk in stream_generate(model, processor, prompt, images, **settings)
    )


def cached_tokens(cache: list[Any], fallback: int) -> int:
    """How many tokens a KV cache holds. mlx-lm's trimmable caches (KVCache,
    RotatingKVCache, ...) count them in `offset`, an attribute rather than an interface
    (`size()` stops at a rotating cache's window): test_generate pins it. Caches without one
    (state-space layers) cannot be trimmed; `fallback` then decides whether to start afresh."""
    return getattr(cache[0], "offset", fallback) if cache else 0


class PromptCache:
    """A KV cache and the prompt it holds, kept between generations: the next prompt reuses the
    prefix it shares with it (the same tokens and the same image tiles) and prefills only the
    rest. The chat session and the app's server keep one each."""

    def __init__(self, model: MM1Model):
        self.model = model
        self.cache = make_prompt_cache(model.decoder)
        self.ids: list[int] = []  # the prompt and every sampled token, as the cache holds them
        self.tile_keys: list[str] = []

    def generate(
        self,
        processor: Processor,
        inputs: PromptInputs,
        settings: GenerationSettings,
        image_cache: ImageFeatureCache | None = None,
    ) -> Iterator[GenerationChunk]:
        """`generate_tokens` on this cache. Until the answer is complete the cache holds more
        than `ids` (a stream closed early); the next call trims it."""
        reuse = self.reuse(inputs)
        self.ids, self.tile_keys = self.ids[:reuse], inputs.tile_keys
        for chunk in generate_tokens(
            self.model, processor, inputs, settings, self.cache, reuse, image_cache
        ):
            yield chunk
        # EOS and text past a stop string included: the cache holds every sampled token.
        self.ids = inputs.input_ids + chunk.tokens

    def reuse(self, inputs: PromptInputs) -> int:
        """Trim the cache to the prefix it shares with `inputs`; returns its length."""
        ids = inputs.input_ids
        # Leave at least one token to prefill: its logits give the first answer token.
        shared = min(common_prefix_length(self.ids, ids), len(ids) - 1)
        image_token, per_tile = self.model.image_token_id, self.model.config.num_image_tokens
        tiles, shared = _image_tiles_before(ids, shared, image_token, per_tile)
        same_tiles = common_prefix_length(self.tile_keys, inputs.tile_keys)
        if same_tiles < tiles:  # a different picture: the prefix ends before its tokens
            positions = [i for i, token in enumerate(ids) if token == image_token]
            shared = positions[same_tiles * per_tile]
        cached = cached_tokens(self.cache, len(self.ids))
        if cached > shared and can_trim_prompt_cache(self.cache):
            trim_prompt_cache(self.cache, cached - shared)
        elif cached > shared:
            self.cache, shared = make_prompt_cache(self.model.decoder), 0
        return shared


@dataclass
class ChatSession:
    """A multi-turn chat that keeps its KV cache and encoded images between turns."""

    model: MM1Model
    processor: Processor
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    images: list[ImageInput] = field(default_factory=list)
    image_cache: ImageFeatureCache = field(default_factory=ImageFeatureCache)

    def __post_init__(self):
        self.settings.check_for(self.model)
        if self.system is not None:
            valid_text(self.system, "the system prompt")
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (encoded images stay cached)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.images = []
        self.prompt_cache = PromptCache(self.model)

    def ask(self, text: str, images: Sequence[ImageInput] = ()) -> Iterator[GenerationChunk]:
        """Stream the answer to a user turn; `<image>` markers place the images, else they go
        first."""
        valid_text(text, "the prompt")
        text = with_image_markers(text, len(images), self.processor.config.image_token)
        messages = [*self.messages, {"role": "user", "content": text}]
        inputs = self.processor.apply_chat_template(messages, [*self.images, *images])
        answer = ""
        for chunk in self.prompt_cache.generate(
            self.processor, inputs, self.settings, self.image_cache
        ):
            answer += chunk.text
            yield chunk
        # Committed only once the answer is complete: a stream closed early leaves the chat as
        # it was.
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        self.images = [*self.images, *images]

"""Generation: cache correctness, chats that keep their cache, sampling and stopping."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import (
    KVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.tokenizer_utils import TokenizerWrapper
from PIL import Image
from transformers import AutoTokenizer

from mm1_mlx.generate import (
    ChatSession,
    GenerationSettings,
    _held_back,
    cached_tokens,
    generate,
    stream_generate,
)
from mm1_mlx.processor import Processor


def picture(seed: int, size=(40, 56)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8))


def argmax_by_full_forwards(
    model, inputs, steps: int, eos: set[int], penalty: float = 1.0, context: int = 64
) -> list[int]:
    """The reference: no cache, the whole sequence through the model for every token. With
    `penalty`, the logits of the last `context` tokens (prompt and answer) are divided by it
    where positive and multiplied where negative (CTRL's repetition penalty)."""
    ids = list(inputs.input_ids)
    pixels = None if inputs.tiles is None else mx.array(inputs.tiles)
    out = []
    for _ in range(steps):
        logits = np.array(model(mx.array([ids]), pixels)[0, -1])
        seen = np.unique(ids[-context:])
        logits[seen] = np.where(logits[seen] < 0, logits[seen] * penalty, logits[seen] / penalty)
        token = int(np.argmax(logits))
        out.append(token)
        if token in eos:
            break
        ids.append(token)
    return out


def first_token_logits(model, inputs) -> np.ndarray:
    pixels = None if inputs.tiles is None else mx.array(inputs.tiles)
    return np.array(model(mx.array([inputs.input_ids]), pixels)[0, -1], np.float64)


def answer_tokens(chunks) -> list[int]:
    return list(chunks)[-1].tokens


def test_greedy_equals_argmax_of_full_forwards(tiny_model):
    model, processor = tiny_model
    images = [picture(0), picture(1)]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": "<image> and <image>: which has more objects?"}], images
    )
    expected = argmax_by_full_forwards(model, inputs, 12, set(processor.tokenizer.eos_token_ids))
    chunks = list(stream_generate(model, processor, "<image> and <image>: which has more objects?",
                                  images, max_tokens=12))  # fmt: skip
    assert chunks[-1].tokens == expected
    assert chunks[-1].finish_reason in ("stop", "length")


def test_follow_up_reuses_the_cache_and_equals_recomputing(tiny_model, monkeypatch):
    model, processor = tiny_model
    encoded = []
    original = type(model).encode_images
    monkeypatch.setattr(
        type(model),
        "encode_images",
        lambda self, p: encoded.append(p.shape[0]) or original(self, p),
    )
    settings = GenerationSettings(max_tokens=8)
    session = ChatSession(model, processor, settings)
    first = list(session.ask("What color is the square?", [picture(2)]))
    second = list(session.ask("How many objects are there?"))
    assert second[-1].cached_tokens > len(processor.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat color is the square?"}], [picture(2)]
    ).input_ids) - 2  # fmt: skip
    assert sum(encoded) == 1  # the picture was encoded once, for the first turn only

    fresh = ChatSession(model, processor, settings)
    fresh.messages = [
        {"role": "user", "content": "<image>\nWhat color is the square?"},
        {"role": "assistant", "content": "".join(c.text for c in first)},
    ]
    fresh.images = [picture(2)]
    recomputed = list(fresh.ask("How many objects are there?"))
    assert recomputed[-1].cached_tokens == 0
    assert second[-1].tokens == recomputed[-1].tokens


@pytest.mark.parametrize(
    "make_cache",
    [KVCache, lambda: RotatingKVCache(max_size=64)],
    ids=["KVCache", "RotatingKVCache"],
)
def test_mlx_lm_caches_count_their_tokens_as_prompt_cache_reads_them(tiny_model, make_cache):
    # PromptCache trims a cache back to a shared prefix from the count cached_tokens reads:
    # if mlx-lm stops keeping it in `offset`, this fails instead of a chat reusing a wrong cache.
    model, _ = tiny_model
    cache = [make_cache() for _ in model.decoder.layers]
    model.decoder(mx.arange(1, 21)[None], cache=cache)
    model.decoder(mx.array([[5]]), cache=cache)
    assert cached_tokens(cache, fallback=-1) == 21
    assert can_trim_prompt_cache(cache)
    trim_prompt_cache(cache, 6)
    assert cached_tokens(cache, fallback=-1) == 15


def test_the_same_picture_is_encoded_once(tiny_model, monkeypatch):
    model, processor = tiny_model
    calls = []
    original = type(model).encode_images
    monkeypatch.setattr(
        type(model), "encode_images", lambda self, p: calls.append(p.shape[0]) or original(self, p)
    )
    session = ChatSession(model, processor, GenerationSettings(max_tokens=2))
    list(session.ask("Describe the image.", [picture(3)]))
    session.reset()
    list(session.ask("Describe the image.", [picture(3)]))
    assert calls == [1]


def test_max_tokens_and_stop_strings(tiny_model):
    model, processor = tiny_model
    settings = dict(max_tokens=6, temperature=0.0)
    full = list(stream_generate(model, processor, "Describe the image.", [picture(4)], **settings))
    text = "".join(c.text for c in full)
    if full[-1].finish_reason == "length":
        assert full[-1].generated_tokens == 6
    assert len(text) >= 2, "the tiny model should produce some text"
    stop = text[1:3]
    stopped = generate(
        model, processor, "Describe the image.", [picture(4)], stop=[stop], **settings
    )
    assert stopped == text[: text.find(stop)]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny_model):
    model, processor = tiny_model
    prompt, images = "What is at [100, 200, 300, 400]?", [picture(5)]
    greedy = generate(model, processor, prompt, images, max_tokens=8)
    assert (
        generate(model, processor, prompt, images, max_tokens=8, temperature=2.0, top_k=1) == greedy
    )
    hot = [generate(model, processor, prompt, images, max_tokens=8, temperature=2.0, seed=7)
           for _ in range(2)]  # fmt: skip
    assert hot[0] == hot[1]


def test_repetition_penalty_is_applied_at_every_step(tiny_model):
    model, processor = tiny_model
    prompt = [{"role": "user", "content": "List the buttons."}]
    inputs = processor.apply_chat_template(prompt)
    eos = set(processor.tokenizer.eos_token_ids)
    plain = argmax_by_full_forwards(model, inputs, 24, eos)
    expected = argmax_by_full_forwards(model, inputs, 24, eos, penalty=50.0, context=64)
    assert expected != plain  # the tiny model repeats itself: the penalty must change that
    penalised = answer_tokens(stream_generate(model, processor, prompt, max_tokens=24,
                                              repetition_penalty=50.0))  # fmt: skip
    assert penalised == expected


SAMPLES = 400


def sampled_first_tokens(model, processor, prompt, **settings) -> np.ndarray:
    """The first answer token of SAMPLES generations, one seed each."""
    return np.array([
        answer_tokens(stream_generate(model, processor, prompt, max_tokens=1, seed=seed,
                                      **settings))[0]
        for seed in range(SAMPLES)
    ])  # fmt: skip


# The tiny model's next-token distribution is nearly flat (top token 0.4%): temperatures this
# low shape it into a head of a few likely tokens (top 72% and 31%).
@pytest.mark.parametrize("temperature", [0.03, 0.05])
def test_temperature_samples_from_the_softened_distribution(tiny_model, temperature):
    """Sampled tokens follow softmax(logits / T): each token's frequency within 4.5 standard
    errors of its probability. Greedy decoding, or another temperature, is far outside."""
    model, processor = tiny_model
    prompt = [{"role": "user", "content": "What is on the screen?"}]
    logits = first_token_logits(model, processor.apply_chat_template(prompt)) / temperature
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    assert probabilities.max() < 0.9  # a spread distribution, or greedy would pass
    tokens = sampled_first_tokens(model, processor, prompt, temperature=temperature)
    frequencies = np.bincount(tokens, minlength=len(probabilities)) / SAMPLES
    error = np.sqrt(probabilities * (1 - probabilities) / SAMPLES) + 1 / SAMPLES
    assert np.all(np.abs(frequencies - probabilities) < 4.5 * error)


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.03)])
def test_top_k_and_top_p_sample_only_from_the_head(tiny_model, top_k, top_p):
    model, processor = tiny_model
    prompt = [{"role": "user", "content": "What is on the screen?"}]
    logits = first_token_logits(model, processor.apply_chat_template(prompt))
    order = np.argsort(-logits)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    # top-p keeps the smallest head whose probability (before temperature) reaches p
    nucleus = np.searchsorted(np.cumsum(probabilities[order]), top_p) + 1
    head = set(order[: top_k or nucleus].tolist())
    assert 1 < len(head) < 20
    tokens = sampled_first_tokens(
        model, processor, prompt, temperature=1.0, top_k=top_k, top_p=top_p
    )
    assert set(tokens.tolist()) == head  # only the head, and all of it (400 samples)


def test_timing_statistics(tiny_model):
    model, processor = tiny_model
    last = list(
        stream_generate(model, processor, "Describe the image.", [picture(6)], max_tokens=5)
    )[-1]
    assert last.ttft_s > 0 and last.prefill_tps > 0 and last.peak_memory_gb > 0
    assert last.prompt_tokens > 4 and last.cached_tokens == 0
    if last.generated_tokens > 1:
        assert last.decode_tps > 0


@pytest.mark.parametrize("text, expected", [("abc", 0), ("ab", 2), ("xa", 1), ("", 0)])
def test_text_that_may_start_a_stop_string_is_held_back(text, expected):
    assert _held_back(text, ["abd", "q"]) == expected


def test_a_quantized_model_loads_and_generates(tiny_model_dir, tmp_path):
    import mm1_mlx
    from mm1_mlx.quantize import quantize_folder

    quantize_folder(tiny_model_dir, tmp_path / "q4", bits=4, group_size=32, report=False)
    model, processor = mm1_mlx.load(tmp_path / "q4")
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": "<image>\nDescribe the image."}], [picture(7)]
    )
    expected = argmax_by_full_forwards(model, inputs, 6, set(processor.tokenizer.eos_token_ids))
    chunks = list(
        stream_generate(model, processor, "Describe the image.", [picture(7)], max_tokens=6)
    )
    assert chunks[-1].tokens == expected and chunks[-1].generated_tokens == len(expected)


@pytest.mark.parametrize("ending", ["eos", "length"])
def test_a_multibyte_character_at_the_end_is_not_lost(
    tiny_model, tiny_model_dir, monkeypatch, ending
):
    model, processor = tiny_model
    scripted = processor.tokenizer.encode("café", add_special_tokens=False)
    assert len(scripted) > 1  # byte-level pieces: "é" spans tokens
    if ending == "eos":
        scripted = [*scripted, processor.tokenizer.eos_token_id]
    monkeypatch.setattr(
        "mm1_mlx.generate.generate_step", lambda *a, **k: ((t, None) for t in scripted)
    )
    assert generate(model, processor, "Say it.", max_tokens=len(scripted)) == "café"
    # A detokenizer may hold text back until finalize() (mlx-lm's SPM and BPE ones do for
    # incomplete characters); this one holds everything, so only finalize() reveals it.
    holding = TokenizerWrapper(AutoTokenizer.from_pretrained(tiny_model_dir), HoldingDetokenizer)
    processor = Processor(holding, processor.config)
    assert generate(model, processor, "Say it.", max_tokens=len(scripted)) == "café"


class HoldingDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.last_segment = tokenizer, [], ""

    def reset(self):
        self.tokens, self.last_segment = [], ""

    def add_token(self, token):
        self.tokens.append(token)
        self.last_segment = ""

    def finalize(self):
        self.last_segment = self.tokenizer.decode(self.tokens)

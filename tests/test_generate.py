"""Generation: cache correctness, chats that keep their cache, sampling and stopping."""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mm1_mlx.generate import (
    ChatSession,
    GenerationSettings,
    _held_back,
    generate,
    stream_generate,
)


def picture(seed: int, size=(40, 56)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8))


def argmax_by_full_forwards(model, inputs, steps: int, eos: set[int]) -> list[int]:
    """The reference: no cache, the whole sequence through the model for every token."""
    ids = list(inputs.input_ids)
    pixels = None if inputs.tiles is None else mx.array(inputs.tiles)
    out = []
    for _ in range(steps):
        token = int(mx.argmax(model(mx.array([ids]), pixels)[0, -1]).item())
        out.append(token)
        if token in eos:
            break
        ids.append(token)
    return out


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
        generate(model, processor, prompt, images, max_tokens=8, temperature=5.0, top_k=1) == greedy
    )
    hot = [generate(model, processor, prompt, images, max_tokens=8, temperature=2.0, seed=7)
           for _ in range(2)]  # fmt: skip
    assert hot[0] == hot[1]


def test_repetition_penalty_changes_the_answer(tiny_model):
    model, processor = tiny_model
    plain = answer_tokens(stream_generate(model, processor, "List the buttons.", max_tokens=24))
    penalised = answer_tokens(stream_generate(model, processor, "List the buttons.",
                                              max_tokens=24, repetition_penalty=50.0))  # fmt: skip
    assert len(set(penalised)) >= len(set(plain))
    if len(set(plain)) < len(plain):  # the greedy answer repeats itself; the penalty stops that
        assert penalised != plain


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
def test_a_multibyte_character_at_the_end_is_not_lost(tiny_model, monkeypatch, ending):
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
    monkeypatch.setattr(processor.tokenizer, "_detokenizer", HoldingDetokenizer(processor))
    assert generate(model, processor, "Say it.", max_tokens=len(scripted)) == "café"


class HoldingDetokenizer:
    def __init__(self, processor):
        self.processor, self.tokens, self.last_segment = processor, [], ""

    def reset(self):
        self.tokens, self.last_segment = [], ""

    def add_token(self, token):
        self.tokens.append(token)
        self.last_segment = ""

    def finalize(self):
        self.last_segment = self.processor.tokenizer.decode(self.tokens)

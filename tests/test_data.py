"""Training data: formats and their loss, packing, the mixture, resuming, ranks, bad data."""

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from builders import CHAT_TEMPLATE, retokenized_copy
from PIL import Image

import mm1_mlx
from mm1_mlx.errors import UserError
from mm1_mlx.processor import load_image, read_image_size
from mm1_mlx.train import data
from mm1_mlx.train.data import DataLoader, SourceConfig

S = 48  # the tiny encoder's input size
TOKENS = 4  # image tokens per tile
IMAGE = "<image>"
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


@pytest.fixture
def processor(tiny_model):
    return tiny_model[1]


def write_jsonl(path, records) -> str:
    """Records as JSONL lines (a str is written as it is: a raw line)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def png(folder, name, color=RED, size=(S, S)) -> str:
    Image.new("RGB", size, color).save(folder / name)
    return name


def loader(processor, path, fmt, **settings) -> DataLoader:
    settings = {"seq_len": 200, "batch_size": 1, **settings}
    return DataLoader([SourceConfig(path, fmt)], processor, **settings)


def trained_text(processor, batch, row=0) -> str:
    """The targets that carry loss, decoded."""
    return processor.decode(batch.targets[row][batch.weights[row] > 0].tolist())


def shown(processor, ids) -> str:
    """Decoded ids with each tile's run of image tokens shown as one <image>."""
    return processor.decode(list(ids)).replace(IMAGE * TOKENS, IMAGE)


def row_tokens(batch) -> np.ndarray:
    """Each row's seq_len + 1 tokens: the inputs and the last target."""
    return np.concatenate([batch.input_ids, batch.targets[:, -1:]], axis=1)


def batches(dataloader, count) -> list:
    return [dataloader.next_batch() for _ in range(count)]


def assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        for name in ("input_ids", "targets", "weights", "pixels"):
            np.testing.assert_array_equal(getattr(a, name), getattr(e, name), err_msg=name)


# -- formats and their loss -----------------------------------------------------------------


def test_caption_trains_on_the_caption_and_eos_with_the_inference_layout(processor, tmp_path):
    image = png(tmp_path, "a.png", size=(2 * S, 2 * S))
    path = write_jsonl(tmp_path / "captions.jsonl", [{"image": image, "text": "a red circle"}])
    batch = loader(processor, path, "caption", seq_len=60, split_images=True).next_batch()
    assert trained_text(processor, batch) == "a red circle</s>"
    inference = processor.encode(IMAGE + "a red circle", [tmp_path / image], split=True)
    expected = inference.input_ids + [processor.tokenizer.eos_token_id]
    assert batch.input_ids[0, : len(expected)].tolist() == expected
    np.testing.assert_array_equal(batch.pixels, inference.tiles)  # 2x2 tiles + overview
    image_id = processor.config.image_token_id
    assert not batch.weights[batch.targets == image_id].any()
    assert batch.input_ids.dtype == batch.targets.dtype == np.int32
    assert batch.weights.dtype == batch.pixels.dtype == np.float32


def test_text_trains_on_every_token_but_the_first(processor, tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "the blue square"}])
    first, *rest = processor.tokenize("the blue square")
    seq_len = len(rest) + 1  # the example and its EOS fill the row exactly
    batch = loader(processor, path, "text", seq_len=seq_len).next_batch()
    assert batch.input_ids[0, 0] == first  # nothing predicts the first token
    assert batch.targets[0].tolist() == [*rest, processor.tokenizer.eos_token_id]
    assert batch.weights[0].tolist() == [1.0] * seq_len


def test_interleaved_trains_on_text_not_images_or_tile_markers(processor, tmp_path):
    wide = png(tmp_path, "wide.png", BLUE, (2 * S, S))
    content = [
        {"image": png(tmp_path, "a.png")},
        {"text": " a red circle on the left,"},
        {"image": wide},
        {"text": " a blue square on the right"},
    ]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"content": content}])
    batch = loader(processor, path, "interleaved", split_images=True).next_batch()
    assert trained_text(processor, batch) == (
        " a red circle on the left, a blue square on the right</s>"
    )
    assert shown(processor, batch.input_ids[0]).startswith(
        "(1,1)<image>(1,2)<image>(2,1)<image>(2,2)<image>(overview)<image>"
        " a red circle on the left,"
        "(1,1)<image>(1,2)<image>(1,3)<image>(1,4)<image>"
        "(2,1)<image>(2,2)<image>(2,3)<image>(2,4)<image>(overview)<image>"
        " a blue square on the right</s>"
    )
    assert len(batch.pixels) == 5 + 9


CHAT = {
    "images": ["b.png"],
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "<image>\nwhat color?"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "and the shape?"},
        {"role": "assistant", "content": "square"},
    ],
}
LLAVA = {
    "image": "b.png",
    "conversations": [
        {"from": "human", "value": "<image>\nwhat color?"},
        {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "and the shape?"},
        {"from": "gpt", "value": "square"},
    ],
}


@pytest.mark.parametrize(
    "template, trained",
    [(CHAT_TEMPLATE, "blue</s>square</s>"), (None, " blue\n square\n</s>")],
)
def test_chat_trains_on_assistant_turns_only(tiny_model_dir, tmp_path, template, trained):
    # Without a template: the fallback "Role: content" format, no end-of-turn token.
    model_dir = retokenized_copy(tiny_model_dir, tmp_path / "model", chat_template=template)
    processor = mm1_mlx.load(model_dir)[1]
    png(tmp_path, "b.png", BLUE)
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    batch = loader(processor, path, "chat", seq_len=100).next_batch()  # room for one
    assert trained_text(processor, batch) == trained
    if template is not None:
        assert shown(processor, batch.input_ids[0]).startswith(
            "<|system|>be brief</s><|user|><image>\nwhat color?</s><|assistant|>blue</s>"
            "<|user|>and the shape?</s><|assistant|>square</s>"
        )


def test_llava_conversations_are_chat_messages(processor, tmp_path):
    png(tmp_path, "b.png", BLUE)
    messages = {**CHAT, "messages": CHAT["messages"][1:]}  # LLaVA's has no system prompt
    llava = loader(processor, write_jsonl(tmp_path / "llava.jsonl", [LLAVA]), "chat", seq_len=80)
    chat = loader(processor, write_jsonl(tmp_path / "chat.jsonl", [messages]), "chat", seq_len=80)
    assert_same_batches(batches(llava, 2), batches(chat, 2))
    assert trained_text(processor, llava.next_batch()) == "blue</s>square</s>"


def test_example_weighting_gives_each_example_a_total_of_one(processor, tmp_path):
    lines = [{"text": "green"}, {"text": "a red circle on the left and a blue square"}]
    path = write_jsonl(tmp_path / "text.jsonl", lines)
    by_token = loader(processor, path, "text", seq_len=40).next_batch()
    by_example = loader(processor, path, "text", seq_len=40, loss_weighting="example").next_batch()
    np.testing.assert_array_equal(by_token.weights > 0, by_example.weights > 0)
    assert set(by_token.weights[by_token.weights > 0].tolist()) == {1.0}
    ends = np.flatnonzero((by_example.targets[0] == 2) & (by_example.weights[0] > 0))
    assert len(ends) == 3  # green, the long one, green again, then no room
    spans = np.split(by_example.weights[0], ends[:-1] + 1)
    assert [round(float(span.sum()), 6) for span in spans] == [1.0, 1.0, 1.0]
    assert spans[0].max() == 1.0 and 0 < spans[1][spans[1] > 0].min() < 0.2


def test_turn_weighting_gives_each_answer_a_total_of_one(processor, tmp_path):
    png(tmp_path, "b.png", BLUE)
    long_answer = {"role": "assistant", "content": "a large blue square in the middle"}
    path = write_jsonl(
        tmp_path / "chat.jsonl", [{**CHAT, "messages": [*CHAT["messages"][:-1], long_answer]}]
    )
    by_turn = loader(processor, path, "chat", seq_len=120, loss_weighting="turn").next_batch()
    by_example = loader(processor, path, "chat", seq_len=120, loss_weighting="example")
    np.testing.assert_array_equal(by_turn.weights > 0, by_example.next_batch().weights > 0)
    trained = np.flatnonzero(by_turn.weights[0] > 0)
    turns = np.split(trained, np.flatnonzero(np.diff(trained) > 1) + 1)
    assert len(turns) == 2 and len(turns[0]) != len(turns[1])
    assert [round(float(by_turn.weights[0][turn].sum()), 6) for turn in turns] == [1.0, 1.0]


# -- packing --------------------------------------------------------------------------------


def test_packing_puts_eos_between_examples_and_carries_the_next_over(processor, tmp_path):
    texts = ["the blue square on the right", "green", "a red circle"]
    lengths = [len(processor.tokenize(text)) + 1 for text in texts]  # + EOS
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": text} for text in texts])
    seq_len = lengths[0] + lengths[1] + 1  # room for 2 pad tokens, not for the third example
    dataloader = loader(processor, path, "text", seq_len=seq_len, batch_size=2)
    batch = dataloader.next_batch()
    eos = processor.tokenizer.eos_token_id
    rows = row_tokens(batch).tolist()
    ids = [processor.tokenize(text) + [eos] for text in texts]
    assert rows[0] == ids[0] + ids[1] + [eos, eos]  # padded with EOS (no pad token)
    assert rows[1] == ids[2] + [eos] * (seq_len + 1 - lengths[2])  # the first does not fit
    assert not batch.weights[0, -2:].any() and not batch.weights[1, lengths[2] :].any()
    # The mask of real tokens (router losses leave the rest out): row 0 has 2 pad tokens, of
    # which the first is an input position; row 1 is padding after its example.
    assert batch.lengths.tolist() == [seq_len - 1, lengths[2]]
    assert batch.token_mask[0].tolist() == [True] * (seq_len - 1) + [False]
    assert batch.token_mask[1].sum() == lengths[2] and batch.token_mask[1, : lengths[2]].all()
    following = dataloader.next_batch().input_ids[0].tolist()  # carried over to the next batch
    assert following[: lengths[0]] == ids[0]


def test_at_most_max_images_per_sequence(processor, tmp_path):
    colors = enumerate([RED, GREEN, BLUE])
    records = [{"image": png(tmp_path, f"{i}.png", color), "text": "red"} for i, color in colors]
    path = write_jsonl(tmp_path / "captions.jsonl", records)
    dataloader = loader(processor, path, "caption", batch_size=3, max_images_per_sequence=2)
    batch = dataloader.next_batch()
    image_id = processor.config.image_token_id
    assert ((batch.input_ids == image_id).sum(axis=1) == 2 * TOKENS).all()
    assert len(batch.pixels) == 6
    colors = batch.pixels[:, 0, 0]  # rows: R G, B R, G B
    np.testing.assert_array_equal(colors[:3], colors[3:])
    assert len(np.unique(colors, axis=0)) == 3


def test_an_example_longer_than_a_sequence_is_skipped(processor, tmp_path):
    lines = [{"text": "the blue square on the right " * 4}, {"text": "a red circle"}]
    path = write_jsonl(tmp_path / "text.jsonl", lines)
    dataloader = loader(processor, path, "text", seq_len=8)
    assert trained_text(processor, dataloader.next_batch()) == " red circle</s>"
    assert dataloader.skipped["too long"] >= 1
    with pytest.raises(UserError, match=r"text.jsonl:1: \d+ tokens, over seq_len"):
        loader(processor, path, "text", seq_len=8, strict=True).next_batch()


# -- the mixture, determinism, resuming -----------------------------------------------------


def three_sources(tmp_path, weights=(45, 45, 10), lines=40) -> list[SourceConfig]:
    sources = []
    for word, weight in zip(["red", "green", "blue"], weights, strict=True):
        path = write_jsonl(tmp_path / f"{word}.jsonl", [{"text": word}] * lines)
        sources.append(SourceConfig(path, "text", weight))
    return sources


def test_the_mixture_follows_the_weights(processor, tmp_path):
    sources = three_sources(tmp_path)
    dataloader = DataLoader(sources, processor, seq_len=256, batch_size=4)
    rows = np.concatenate([row_tokens(batch) for batch in batches(dataloader, 12)])
    firsts = [processor.tokenize(word)[0] for word in ("red", "green", "blue")]
    assert len(set(firsts)) == 3
    counts = np.array([(rows == token).sum() for token in firsts])
    assert counts.sum() > 4000
    np.testing.assert_allclose(counts / counts.sum(), [0.45, 0.45, 0.10], atol=0.025)


def test_a_seed_gives_the_same_batches(processor, tmp_path):
    sources = three_sources(tmp_path, weights=(1, 1, 1))
    runs = [batches(DataLoader(sources, processor, 32, 2, seed=seed), 3) for seed in (7, 7, 8)]
    assert_same_batches(runs[0], runs[1])
    assert not np.array_equal(runs[0][0].input_ids, runs[2][0].input_ids)


def mixed_sources(tmp_path) -> list[SourceConfig]:
    """Short files of each format, with images: a few batches cross epoch boundaries."""
    captions = [
        {"image": png(tmp_path, "0.png", RED), "text": "a red circle"},
        {"image": png(tmp_path, "1.png", GREEN), "text": "green"},
    ]
    png(tmp_path, "b.png", BLUE, (2 * S, S))
    chats = [CHAT, LLAVA]
    texts = [{"text": "the blue square"}, {"text": "what color is the triangle"}]
    return [
        SourceConfig(write_jsonl(tmp_path / "captions.jsonl", captions), "caption", 2),
        SourceConfig(write_jsonl(tmp_path / "chats.jsonl", chats), "chat", 1),
        SourceConfig(write_jsonl(tmp_path / "texts.jsonl", texts), "text", 1),
    ]


@pytest.mark.parametrize("stop", [1, 2, 4])
def test_resuming_gives_the_batches_of_an_uninterrupted_run(processor, tmp_path, stop):
    sources = mixed_sources(tmp_path)
    settings = {"seq_len": 180, "batch_size": 2, "seed": 3, "split_images": True}
    expected = batches(DataLoader(sources, processor, **settings), 6)
    first = DataLoader(sources, processor, **settings)
    before = batches(first, stop)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["pending"] is not None  # an example carried over into the next batch
    assert stop < 4 or max(source["epoch"] for source in state["sources"]) >= 1
    resumed = DataLoader(sources, processor, **settings)
    resumed.load_state_dict(state)
    assert_same_batches(before + batches(resumed, 6 - stop), expected)


def test_a_data_state_naming_its_files_relative_to_the_working_directory_resumes(
    processor, tmp_path, monkeypatch
):
    sources = mixed_sources(tmp_path)
    settings = {"seq_len": 180, "batch_size": 2, "seed": 3, "split_images": True}
    first = DataLoader(sources, processor, **settings)
    batches(first, 1)
    state = first.state_dict()
    monkeypatch.chdir(tmp_path)
    for source in state["sources"]:
        source["path"] = Path(source["path"]).name
    DataLoader(sources, processor, **settings).load_state_dict(state)
    state["sources"][0]["path"] = "elsewhere.jsonl"
    with pytest.raises(UserError, match="the data state is for elsewhere.jsonl"):
        DataLoader(sources, processor, **settings).load_state_dict(state)


# -- ranks ----------------------------------------------------------------------------------


@pytest.fixture
def image_loads(monkeypatch) -> list:
    """The images decoded (the data module's load_image calls)."""
    loads = []

    def counting_load(image):
        loads.append(image)
        return load_image(image)

    monkeypatch.setattr(data, "load_image", counting_load)
    return loads


def test_two_ranks_together_give_the_one_rank_batch(processor, tmp_path):
    sources = mixed_sources(tmp_path)
    settings = {"seq_len": 180, "batch_size": 4, "split_images": True}
    whole = batches(DataLoader(sources, processor, **settings), 3)
    ranks = [DataLoader(sources, processor, rank=r, world_size=2, **settings) for r in range(2)]
    parts = [batches(rank, 3) for rank in ranks]
    for step, batch in enumerate(whole):
        for name in ("input_ids", "targets", "weights"):
            joined = np.concatenate([getattr(part[step], name) for part in parts])
            np.testing.assert_array_equal(joined, getattr(batch, name), err_msg=name)
        pixels = [part[step].pixels for part in parts if part[step].pixels is not None]
        np.testing.assert_array_equal(np.concatenate(pixels), batch.pixels)


def test_each_rank_decodes_only_the_images_of_its_rows(processor, tmp_path, image_loads):
    sources = mixed_sources(tmp_path)
    settings = {"seq_len": 100, "batch_size": 4}  # not split: one tile per image
    DataLoader(sources, processor, **settings).next_batch()
    everything, loads = list(image_loads), []
    for rank in range(2):
        image_loads.clear()
        batch = DataLoader(sources, processor, rank=rank, world_size=2, **settings).next_batch()
        assert len(image_loads) == len(batch.pixels) > 0
        loads += image_loads
    assert loads == everything


# -- bad data -------------------------------------------------------------------------------


def bad_caption(case: str, folder) -> tuple[str | dict, str, str]:
    """(a JSONL line, its skip reason, a text of its message)."""
    (folder / "notes.txt").write_text("not an image")
    good = png(folder, "a.png")
    return {
        "unparsable": ('{"image": "a.png", "text": ', "unparsable line", "not JSON"),
        "not_an_object": ("[1, 2]", "unparsable line", "not a JSON object"),
        "no_text": ({"image": good}, "invalid record", "'text'"),
        "two_markers": ({"image": good, "text": "<image> red"}, "invalid record", "2 <image>"),
        "missing_image": ({"image": "gone.png", "text": "red"}, "missing image", "gone.png"),
        "not_an_image": ({"image": "notes.txt", "text": "red"}, "corrupt image", "not an image"),
        "too_long": ({"image": good, "text": "red " * 80}, "too long", "tokens, over"),
        "lone_surrogate": ({"image": good, "text": "red \ud800"}, "unparsable line", "not valid"),
        "nested_deep": ("[" * 100_000 + "]" * 100_000, "unparsable line", "nested too deeply"),
        "long_name": ({"image": "a" * 5000 + ".png", "text": "red"}, "missing image", "too long"),
    }[case]


BAD_CASES = [
    "unparsable", "not_an_object", "no_text", "two_markers", "missing_image", "not_an_image",
    "too_long", "lone_surrogate", "nested_deep", "long_name",
]  # fmt: skip


def test_bad_examples_are_skipped_counted_and_summed_up(processor, tmp_path):
    bad = [bad_caption(case, tmp_path) for case in BAD_CASES]
    good = {"image": "a.png", "text": "a red circle"}
    path = write_jsonl(tmp_path / "captions.jsonl", [good] + [line for line, _, _ in bad])
    dataloader = loader(processor, path, "caption", seq_len=12)  # room for one: one epoch
    assert trained_text(processor, dataloader.next_batch()) == "a red circle</s>"
    reasons = [reason for _, reason, _ in bad]
    assert dataloader.skipped == {reason: reasons.count(reason) for reason in reasons}
    summary = dataloader.skipped_summary()
    assert summary.startswith("skipped 10 examples: 4 unparsable line (first: ")
    assert "\n" not in summary
    assert f"2 missing image (first: {path}:6: " in summary and "gone.png" in summary
    for _ in range(3):  # more epochs meet the same bad lines: they are not counted again
        dataloader.next_batch()
    assert dataloader.skipped == {reason: reasons.count(reason) for reason in reasons}


@pytest.mark.parametrize("case", BAD_CASES)
def test_strict_turns_bad_examples_into_errors_naming_the_line(processor, tmp_path, case):
    line, _, message = bad_caption(case, tmp_path)
    path = write_jsonl(tmp_path / "captions.jsonl", [{"image": "a.png", "text": "red"}, line])
    with pytest.raises(UserError, match=f"captions.jsonl:2: .*{message}"):
        loader(processor, path, "caption", seq_len=40, strict=True).next_batch()


def turns(*roles: str) -> dict:
    return {"messages": [{"role": role, "content": f"a {role} turn"} for role in roles]}


BOX = [0, 0, 500, 500]


def answered(question: dict | None = None, **answer) -> dict:
    """A chat asking "hi" and answering "a red", with keys added to either message."""
    question = {"role": "user", "content": "hi", **(question or {})}
    return {"messages": [question, {"role": "assistant", "content": "a red", **answer}]}


# (case, format, a line of the wrong shape, what the error says)
BAD_SHAPES = [
    ("chat opened by the assistant", "chat", turns("assistant", "user"),
     "starts with a user turn"),
    ("chat of the assistant alone", "chat", turns("system", "assistant"),
     "starts with a user turn"),
    ("chat role out of the three", "chat", turns("user", "tool"),
     "a role is one of system, user, assistant, not 'tool'"),
    ("chat name a number", "chat", {"messages": [{"role": "user", "content": "hi", "name": 3}]},
     "a chat message's name is a string, not 3"),
    ("chat name null", "chat", {"messages": [{"role": "user", "content": "hi", "name": None}]},
     "a chat message's name is a string, not None"),
    ("chat message of an unknown key", "chat",
     {"messages": [{"role": "user", "content": "hi", "weight": 0}]},
     "a chat message's keys are role, content, name, not 'weight'"),
    ("phrase boxes on a question", "chat", answered({"role": "user", "boxes": []}),
     "only an assistant message with text content has boxes"),
    ("phrase boxes not a list", "chat", answered(boxes={"span": [0, 1]}),
     "a message's boxes are a list, not {'span': [0, 1]}"),
    ("phrase box of an unknown key", "chat", answered(boxes=[{"span": [0, 1], "at": 2}]),
     "a phrase box is {span, box}"),
    ("phrase span past the answer", "chat", answered(boxes=[{"span": [2, 9], "box": BOX}]),
     "a phrase span is [start, end] of the content: [2, 9]"),
    ("phrase span empty", "chat", answered(boxes=[{"span": [1, 1], "box": BOX}]),
     "a phrase span is [start, end] of the content"),
    ("phrase box past 1000", "chat", answered(boxes=[{"span": [0, 1], "box": [0, 0, 9, 1001]}]),
     "a phrase box is [x1, y1, x2, y2] in 0..1000: [0, 0, 9, 1001]"),
    ("phrase box of three numbers", "chat", answered(boxes=[{"span": [0, 1], "box": [0, 0, 9]}]),
     "a phrase box is [x1, y1, x2, y2]"),
    ("phrase box of booleans", "chat",
     answered(boxes=[{"span": [0, 1], "box": [False, False, True, True]}]),
     "a phrase box is [x1, y1, x2, y2]"),
    ("interleaved part both text and image", "interleaved",
     {"content": [{"text": "red", "image": "a.png"}]}, "a content part is {text} or {image}"),
]  # fmt: skip


@pytest.mark.parametrize(
    "fmt, line, message", [case[1:] for case in BAD_SHAPES], ids=[case[0] for case in BAD_SHAPES]
)
def test_a_line_of_the_wrong_shape_is_refused_naming_it(processor, tmp_path, fmt, line, message):
    png(tmp_path, "a.png")
    path = write_jsonl(tmp_path / "lines.jsonl", [line])
    with pytest.raises(UserError) as error:
        loader(processor, path, fmt, seq_len=40, strict=True).next_batch()
    assert str(error.value).startswith(f"{path}:1: ") and message in str(error.value), error.value


def truncated_png(folder, name: str) -> str:
    """A PNG whose header is intact and whose pixels are cut off."""
    noise = np.random.default_rng(0).integers(0, 256, (2 * S, S, 3), np.uint8)
    Image.fromarray(noise).save(folder / name)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    return name


@pytest.mark.parametrize("strict", [False, True])
def test_an_image_corrupt_past_its_header_trains_nothing(processor, tmp_path, strict):
    cut = truncated_png(tmp_path, "cut.png")
    lines = [{"image": png(tmp_path, "a.png"), "text": "red"}, {"image": cut, "text": "red"}]
    path = write_jsonl(tmp_path / "captions.jsonl", lines)
    dataloader = loader(processor, path, "caption", seq_len=13, strict=strict)  # room for two
    if strict:
        with pytest.raises(UserError, match="captions.jsonl:2: .*cut.png.*truncated"):
            dataloader.next_batch()
        return
    batch = dataloader.next_batch()  # a.png's example, then cut.png's
    assert trained_text(processor, batch) == "red</s>"
    assert batch.pixels[0].any() and not batch.pixels[1].any()
    assert dataloader.skipped == {"corrupt image": 1}
    for _ in range(3):  # later epochs decode it again, and do not count it again
        assert not dataloader.next_batch().pixels[1].any()
    assert dataloader.skipped == {"corrupt image": 1}
    # Resuming keeps the epoch of an example carried over into the next row.
    state = json.loads(json.dumps(dataloader.state_dict()))
    resumed = loader(processor, path, "caption", seq_len=13)
    resumed.load_state_dict(state)
    resumed.next_batch()
    assert resumed.skipped == {"corrupt image": 1}


def test_a_line_that_is_not_utf8_is_skipped(processor, tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_bytes(b'{"image": "%s", "text": "caf\xe9"}\n' % png(tmp_path, "a.png").encode())
    with pytest.raises(UserError, match="captions.jsonl:1: not UTF-8 text"):
        loader(processor, str(path), "caption", strict=True).next_batch()
    with pytest.raises(UserError, match="not one usable example.*1 unparsable line"):
        loader(processor, str(path), "caption").next_batch()


def test_a_file_without_one_usable_example_is_an_error(processor, tmp_path):
    path = write_jsonl(tmp_path / "captions.jsonl", ["", "{oops", {"text": "no image"}])
    with pytest.raises(UserError, match="not one usable example.*1 unparsable line"):
        loader(processor, path, "caption").next_batch()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"batch_size": 3, "world_size": 2}, "split evenly over 2 ranks"),
        ({"loss_weighting": "sample"}, "loss_weighting"),
        ({"format": "video"}, "unknown format 'video'"),
        ({"path": "gone.jsonl"}, "no such data file"),
        ({"weight": 0.0}, "add up to 0"),
    ],
)
def test_bad_settings_are_user_errors(processor, tmp_path, settings, message):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "red"}])
    source = {"path": path, "format": "text", "weight": 1.0}
    source.update({k: settings.pop(k) for k in list(settings) if k in source})
    with pytest.raises(UserError, match=message):
        DataLoader(
            [SourceConfig(**source)], processor, **{"seq_len": 8, "batch_size": 1, **settings}
        )


# -- streaming and image headers ------------------------------------------------------------


def test_files_are_streamed_not_read_whole(processor, tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text('{"text": "the blue square on the right"}\n' * 100_000)  # 4 MB
    tracemalloc.start()
    try:
        dataloader = loader(processor, str(path), "text", seq_len=64, batch_size=4)
        dataloader.next_batch()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    assert dataloader.state_dict()["sources"][0]["offset"] < 2_000


def test_image_sizes_come_from_headers_as_load_image_turns_them(tmp_path, monkeypatch):
    pixels = np.zeros((20, 40, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 20 wide, 40 high
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif)
    png(tmp_path, "wide.png", size=(40, 20))
    expected = {name: load_image(tmp_path / name).size for name in ("photo.jpg", "wide.png")}
    assert expected == {"photo.jpg": (20, 40), "wide.png": (40, 20)}
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded the pixels"))
    assert {name: read_image_size(tmp_path / name) for name in expected} == expected

# ruff: noqa: E501  (the tables of cases: one line each)
"""Training data sources beyond JSONL: webdataset tar shards, parquet files and LLaVA's JSON.
Each is read, shuffled deterministically, resumed at the exact record, split over ranks, and
its bad records are skipped and counted (or errors naming file:record with strict)."""

import io
import json
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mm1_mlx.errors import UserError
from mm1_mlx.train import containers
from mm1_mlx.train.data import DataLoader, SourceConfig
from mm1_mlx.train.readers import make_reader
from mm1_mlx.train.recipe import load_recipe
from mm1_mlx.train.sources import Position, expand_braces

S = 48  # the tiny encoder's input size
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
COLORS = [RED, GREEN, BLUE, (255, 255, 0), (0, 255, 255), (255, 0, 255)]


@pytest.fixture
def processor(tiny_model):
    return tiny_model[1]


def image_bytes(color=RED, kind="PNG", size=(S, S)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, kind)
    return buffer.getvalue()


def loader(processor, source: SourceConfig, **settings) -> DataLoader:
    return DataLoader([source], processor, **{"seq_len": 60, "batch_size": 1, **settings})


def trained_texts(processor, dataloader: DataLoader, count: int) -> list[str]:
    """The trained text of the next `count` examples, in draw order."""
    texts = []
    for _ in range(count):
        example = dataloader.draw_example()
        ids = [t for t, trained in zip(example.tokens, example.trained, strict=True) if trained]
        texts.append(processor.decode(ids).removesuffix("</s>"))
    return texts


def assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        for name in ("input_ids", "targets", "weights", "pixels", "lengths"):
            np.testing.assert_array_equal(getattr(a, name), getattr(e, name), err_msg=name)


# -- building the data ---------------------------------------------------------------------------


def write_shards(folder: Path, shards: list[list[tuple[str, dict[str, bytes]]]]) -> str:
    """Tar shards of (key, {suffix: bytes}) samples; returns their brace pattern."""
    folder.mkdir(exist_ok=True)
    for index, samples in enumerate(shards):
        with tarfile.open(folder / f"shard-{index:03d}.tar", "w") as tar:
            for key, members in samples:
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"shard-{{000..{len(shards) - 1:03d}}}.tar")


def caption_shards(folder: Path, count: int = 12, per_shard: int = 4) -> str:
    """`count` samples "caption i", their images in turn PNG (with a .txt caption) and JPEG
    (a .json caption)."""
    shards = []
    for start in range(0, count, per_shard):
        samples = []
        for i in range(start, min(start + per_shard, count)):
            color = COLORS[i % len(COLORS)]
            if i % 2:
                caption = json.dumps({"caption": f"caption {i}"}).encode()
                samples.append((f"{i:05d}", {"jpg": image_bytes(color, "JPEG"), "json": caption}))
            else:
                samples.append(
                    (f"{i:05d}", {"png": image_bytes(color), "txt": b"caption %d\n" % i})
                )
        shards.append(samples)
    return write_shards(folder, shards)


def image_cell(color=RED) -> dict:
    return {"bytes": image_bytes(color), "path": None}


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 3) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return str(path)


def chat(question: str, answer: str, llava: bool = False) -> list[dict]:
    if llava:
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def llava_items(count: int) -> list[dict]:
    return [
        {
            "id": f"{i:06d}",
            "image": f"{i % 3}.png",
            "conversations": chat("<image>\nWhat is it?", f"answer {i}", llava=True),
        }
        for i in range(count)
    ]


def write_llava(folder: Path, items: list, zipped: bool = False) -> SourceConfig:
    """LLaVA's JSON list, its images 0.png, 1.png, 2.png in a folder or in a zip's folder."""
    folder.mkdir(exist_ok=True)
    path = folder / "llava.json"
    path.write_text(json.dumps(items, indent=1))
    names = {f"{i}.png": image_bytes(COLORS[i]) for i in range(3)}
    if zipped:
        images = folder / "images.zip"
        with zipfile.ZipFile(images, "w") as archive:
            for name, data in names.items():
                archive.writestr(f"train/{name}", data)
    else:
        images = folder / "images"
        images.mkdir()
        for name, data in names.items():
            (images / name).write_bytes(data)
    return SourceConfig(str(path), "chat", images=str(images / "train" if zipped else images))


def each_kind(tmp_path: Path, shuffle_buffer: int | None = 0) -> dict[str, SourceConfig]:
    """A source of every container kind, 12 records each."""
    tmp_path.mkdir(exist_ok=True)
    pattern = caption_shards(tmp_path / "shards")
    rows = [{"image": image_cell(COLORS[i % 6]), "text": f"caption {i}"} for i in range(12)]
    parquet = write_parquet(tmp_path / "captions.parquet", rows)
    llava = write_llava(tmp_path / "llava", llava_items(12))
    llava.shuffle_buffer = shuffle_buffer
    return {
        "tar": SourceConfig(pattern, "caption", shuffle_buffer=shuffle_buffer),
        "parquet": SourceConfig(parquet, "caption", shuffle_buffer=shuffle_buffer),
        "json": llava,
    }


# -- brace patterns -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, names",
    [
        ("a.tar", ["a.tar"]),
        ("s/{000..002}.tar", ["s/000.tar", "s/001.tar", "s/002.tar"]),
        ("{8..10}", ["8", "9", "10"]),
        ("{2..0}", ["2", "1", "0"]),
        ("{a,b}{1..2}", ["a1", "a2", "b1", "b2"]),
        ("x{a,b{1,2}}", ["xa", "xb1", "xb2"]),
        ("{,-val}.tar", [".tar", "-val.tar"]),
    ],
)
def test_brace_patterns_expand_as_the_shell_does(pattern, names):
    assert expand_braces(pattern) == names


@pytest.mark.parametrize(
    "pattern, message",
    [("a{0..2", "without its '}'"), ("a}", "without its '{'"), ("{x}", "a brace group is")],
)
def test_bad_brace_patterns_are_user_errors(pattern, message):
    with pytest.raises(UserError, match=message):
        expand_braces(pattern)


# -- reading each kind ----------------------------------------------------------------------------


def test_shards_give_their_captions_and_images_in_order(processor, tmp_path):
    source = SourceConfig(caption_shards(tmp_path / "shards", 6, 4), "caption", shuffle_buffer=0)
    dataloader = loader(processor, source)
    assert trained_texts(processor, dataloader, 7) == [f"caption {i}" for i in [*range(6), 0]]
    pixels = loader(processor, source).next_batch().pixels
    assert pixels.shape[1:] == (S, S, 3) and pixels[0, ..., 0].mean() > pixels[0, ..., 1].mean()


def test_a_shard_caption_field_is_configurable(processor, tmp_path):
    caption = json.dumps({"TEXT": "a red square"}).encode()
    pattern = write_shards(
        tmp_path / "shards", [[("a", {"webp": image_bytes(kind="WEBP"), "json": caption})]]
    )
    source = SourceConfig(pattern, "caption", caption_field="TEXT")
    assert trained_texts(processor, loader(processor, source), 1) == ["a red square"]


def test_parquet_captions_interleaved_documents_and_conversations(processor, tmp_path):
    captions = write_parquet(tmp_path / "c.parquet", [{"jpg": image_cell(), "txt": "a red square"}])
    documents = write_parquet(
        tmp_path / "d.parquet",
        [{"images": [image_cell(), None, None], "texts": [None, "First.", "Then."]}],
    )
    messages = [{"images": [image_cell()], "messages": chat("<image>\nColour?", "red")}]
    conversations = [
        {"image": image_cell(), "conversations": chat("<image>\nShape?", "square", True)}
    ]
    sources = [
        SourceConfig(captions, "caption", image_column="jpg", text_column="txt"),
        SourceConfig(documents, "interleaved"),
        SourceConfig(write_parquet(tmp_path / "m.parquet", messages), "chat"),
        SourceConfig(
            write_parquet(tmp_path / "v.parquet", conversations),
            "chat",
            image_column="image",
            text_column="conversations",
        ),
    ]
    texts = [trained_texts(processor, loader(processor, source), 1)[0] for source in sources]
    assert texts[0] == "a red square" and texts[1] == "First.\n\nThen."
    assert "red" in texts[2] and "square" in texts[3]
    example = loader(processor, sources[1]).draw_example()
    assert example.images[0].name.endswith("d.parquet:row 0:images[0]")


def test_parquet_images_given_by_path_are_found_in_the_images_folder(processor, tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(image_bytes())
    path = write_parquet(
        tmp_path / "p.parquet", [{"image": {"bytes": None, "path": "a.png"}, "text": "red"}]
    )
    source = SourceConfig(path, "caption", images=str(tmp_path / "pics"))
    assert loader(processor, source).draw_example().images == [tmp_path / "pics" / "a.png"]


@pytest.mark.parametrize("zipped", [False, True])
def test_llava_json_with_images_in_a_folder_or_a_zip(processor, tmp_path, zipped):
    source = write_llava(tmp_path / "llava", llava_items(4), zipped)
    source.shuffle_buffer = 0
    texts = trained_texts(processor, loader(processor, source), 4)
    assert [text.split("answer ")[1][:1] for text in texts] == ["0", "1", "2", "3"]
    pixels = loader(processor, source).next_batch().pixels
    assert pixels[0, ..., 0].mean() > 0.5 and pixels[0, ..., 2].mean() < -0.5  # 0.png: red


def test_the_json_parser_finds_items_across_chunks_and_multibyte_text(tmp_path, monkeypatch):
    monkeypatch.setattr(containers.JsonListParser, "CHUNK", 7)
    items = [{"id": i, "text": "ünïcode ✓ " * i} for i in range(20)]
    path = tmp_path / "list.json"
    path.write_text(
        " \n[\n" + ",\n".join(json.dumps(i, ensure_ascii=False) for i in items) + "\n]\n"
    )
    reads = list(
        containers.read_json_list([path], Position(0, 0, 0), SourceConfig(str(path), "chat"))
    )
    assert [read.value for read in reads] == items
    middle = reads[9].next  # resuming there gives the rest
    rest = containers.read_json_list([path], middle, SourceConfig(str(path), "chat"))
    assert [read.value for read in rest] == items[10:]


def test_the_llava_json_is_streamed_not_loaded_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(containers.JsonListParser, "CHUNK", 1 << 16)
    path = tmp_path / "big.json"
    item = llava_items(1)[0]
    with path.open("w") as file:
        file.write("[" + ",".join(json.dumps({**item, "id": i}) for i in range(40_000)) + "]")
    assert path.stat().st_size > 5_000_000
    source = SourceConfig(str(path), "chat")
    tracemalloc.start()
    count = sum(1 for _ in containers.read_json_list([path], Position(0, 0, 0), source))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 40_000 and peak < 1_000_000, peak  # the file as text alone is 5 MB


# -- shuffling, resuming, ranks ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tar", "parquet", "json"])
def test_shuffling_is_seeded_and_each_epoch_gives_every_record_once(processor, tmp_path, kind):
    source = each_kind(tmp_path, shuffle_buffer=5)[kind]
    first, again = (trained_texts(processor, loader(processor, source), 24) for _ in range(2))
    other = trained_texts(processor, loader(processor, source, seed=1), 24)
    assert first == again and first != other
    straight = trained_texts(processor, loader(processor, each_kind(tmp_path / "x", 0)[kind]), 12)
    assert first[:12] != straight and sorted(first[:12]) == sorted(straight)
    assert sorted(first[12:]) == sorted(straight) and first[12:] != first[:12]  # epoch 2


@pytest.mark.parametrize("kind", ["tar", "parquet", "json"])
def test_the_shuffle_buffer_slides(tmp_path, kind):
    """A sliding buffer, not blocks: records read after the first N come out before some of the
    first N, so the N records given out first are not the first N read."""
    reader = make_reader(each_kind(tmp_path, 5)[kind], [0, 0])
    starts = [tuple(reader.next_record(str).position[1]) for _ in range(12)]
    assert len(set(starts)) == 12
    assert sorted(starts[:5]) != sorted(starts)[:5]


def test_a_data_state_whose_buffer_is_not_in_the_files_is_refused(processor, tmp_path):
    source = each_kind(tmp_path, 5)["tar"]
    first = loader(processor, source)
    first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    state["sources"][0]["held"][0] = [0, 100, 1]  # not where a tar header starts
    with pytest.raises(ValueError, match="position"):
        loader(processor, source).load_state_dict(state)


@pytest.mark.parametrize("kind", ["tar", "parquet", "json"])
@pytest.mark.parametrize("stop", [1, 3, 5])
def test_resuming_gives_the_batches_of_an_uninterrupted_run(processor, tmp_path, kind, stop):
    """Small blocks, rows that carry an example over, and more batches than an epoch."""
    sources = [each_kind(tmp_path, shuffle_buffer=5)[kind], each_kind(tmp_path / "b", 3)["tar"]]
    settings = {"seq_len": 40, "batch_size": 2, "seed": 7}
    straight = DataLoader(sources, processor, **settings)
    expected = [straight.next_batch() for _ in range(8)]
    first = DataLoader(sources, processor, **settings)
    head = [first.next_batch() for _ in range(stop)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = DataLoader(sources, processor, **settings)
    resumed.load_state_dict(state)
    assert_same_batches(head + [resumed.next_batch() for _ in range(8 - stop)], expected)


def test_a_data_state_of_other_shards_is_refused(processor, tmp_path):
    sources = each_kind(tmp_path)
    state = loader(processor, sources["tar"]).state_dict()
    state["sources"][0]["path"] = str(tmp_path / "shards" / "shard-000.tar")
    with pytest.raises(UserError, match="the data state is for"):
        loader(processor, sources["tar"]).load_state_dict(state)
    state = loader(processor, sources["tar"]).state_dict()
    state["sources"][0]["end"] = [0, 100, 1]  # not where a tar header starts
    with pytest.raises(ValueError, match="position"):
        loader(processor, sources["tar"]).load_state_dict(state)


@pytest.mark.parametrize("kind", ["tar", "parquet", "json"])
def test_two_ranks_together_give_the_one_rank_batch(processor, tmp_path, kind):
    source = each_kind(tmp_path, shuffle_buffer=4)[kind]
    settings = {"seq_len": 40, "batch_size": 4, "seed": 3}
    whole = [loader(processor, source, **settings).next_batch() for _ in range(1)][0]
    halves = [
        loader(processor, source, rank=r, world_size=2, **settings).next_batch() for r in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate([h.input_ids for h in halves]), whole.input_ids)
    np.testing.assert_array_equal(np.concatenate([h.pixels for h in halves]), whole.pixels)
    rows = [tuple(row) for half in halves for row in half.input_ids]
    assert len(set(rows)) == len(rows)  # no row twice


# -- bad records ----------------------------------------------------------------------------------


def bad_shards(folder: Path) -> str:
    return write_shards(
        folder,
        [
            [
                ("good", {"png": image_bytes(), "txt": b"fine"}),
                ("corrupt", {"jpg": b"not a jpeg", "txt": b"x"}),
                ("nocaption", {"png": image_bytes()}),
                ("badjson", {"png": image_bytes(), "json": b"{nope"}),
                ("noimage", {"txt": b"x"}),
            ]
        ],
    )


def bad_parquet(folder: Path) -> str:
    rows = [
        {"image": image_cell(), "text": "fine"},
        {"image": None, "text": "no image"},
        {"image": {"bytes": b"junk", "path": None}, "text": "corrupt"},
        {"image": image_cell(), "text": None},
        {"image": {"bytes": None, "path": "http://example.com/a.png"}, "text": "a URL"},
    ]
    return write_parquet(folder / "bad.parquet", rows)


def bad_llava(folder: Path) -> SourceConfig:
    good = llava_items(1)[0]
    gone = {**good, "image": "gone.png"}
    source = write_llava(folder, [good, 3, {"id": "x", "image": "0.png"}, gone])
    text = Path(source.path).read_text()
    Path(source.path).write_text(text.rstrip().removesuffix("]") + ', {"id": "cut')
    return source


BAD = {
    "tar": (
        lambda folder: SourceConfig(bad_shards(folder), "caption"),
        {"corrupt image": 1, "invalid record": 2, "unparsable record": 1},
        "shard-000.tar:corrupt: ",
    ),
    "parquet": (
        lambda folder: SourceConfig(bad_parquet(folder), "caption"),
        {"invalid record": 2, "corrupt image": 1, "missing image": 1},
        "bad.parquet:row 1: ",
    ),
    "json": (
        bad_llava,
        {"invalid record": 2, "missing image": 1, "unparsable record": 1},
        "llava.json:[1]: ",
    ),
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_records_are_skipped_and_counted(processor, tmp_path, kind):
    make, counts, _ = BAD[kind]
    source = make(tmp_path)
    source.shuffle_buffer = 0
    dataloader = loader(processor, source)
    for _ in range(3):  # the one good record, again and again: bad ones count once
        dataloader.draw_example()
    assert dict(dataloader.skipped) == counts
    assert dataloader.skipped_summary().startswith(f"skipped {sum(counts.values())} examples")


@pytest.mark.parametrize("kind", BAD)
def test_strict_makes_the_first_bad_record_an_error_naming_it(processor, tmp_path, kind):
    make, _, origin = BAD[kind]
    source = make(tmp_path)
    source.shuffle_buffer = 0
    dataloader = loader(processor, source, strict=True)
    dataloader.draw_example()
    with pytest.raises(UserError, match=origin.replace("[", r"\[")):
        dataloader.draw_example()


def test_a_truncated_shard_is_one_unreadable_record_and_the_next_shard_is_read(processor, tmp_path):
    pattern = caption_shards(tmp_path / "shards", 8, 4)
    first = tmp_path / "shards" / "shard-000.tar"
    first.write_bytes(first.read_bytes()[:2000])  # inside the first sample's image
    dataloader = loader(processor, SourceConfig(pattern, "caption", shuffle_buffer=0))
    assert trained_texts(processor, dataloader, 4) == [f"caption {i}" for i in range(4, 8)]
    assert dict(dataloader.skipped) == {"unreadable shard": 1}


# -- recipes --------------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A recipe's folder with a model folder and a source of each kind (nothing loads)."""
    (tmp_path / "model").mkdir()
    caption_shards(tmp_path / "shards", 4, 2)
    write_parquet(tmp_path / "c.parquet", [{"image": image_cell(), "text": "red", "n": 1}])
    write_llava(tmp_path / "llava", llava_items(2))
    write_llava(tmp_path / "zipped", llava_items(2), zipped=True)
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    return tmp_path


SOURCES = {
    "tar": 'path = "shards/shard-{000..001}.tar"\nformat = "caption"',
    "parquet": 'path = "c.parquet"\nformat = "caption"',
    "json": 'path = "llava/llava.json"\nformat = "chat"\nimages = "llava/images"',
}
RECIPE_CASES = [
    # (case, source TOML, what the error says)
    ("shard missing", 'path = "shards/shard-{000..002}.tar"\nformat = "caption"', "data.sources[0].path: ", "shard-002.tar: no such data file"),
    ("brace unclosed", 'path = "shards/shard-{000..001.tar"\nformat = "caption"', "data.sources[0].path: ", "without its '}'"),
    ("path an empty list", 'path = []\nformat = "caption"', "data.sources[0].path must be a file, a brace pattern", ""),
    ("path a list of numbers", 'path = [1]\nformat = "caption"', "data.sources[0].path must be", ""),
    ("gzipped shards", 'path = "shards/a.tar.gz"\nformat = "caption"', "data.sources[0].path: ", "compressed shards are not read"),
    ("kinds mixed", 'path = ["c.parquet", "shards/shard-000.tar"]\nformat = "caption"', "data.sources[0].path: ", "mixes kinds"),
    ("two JSON files", 'path = ["llava/llava.json", "zipped/llava.json"]\nformat = "chat"', "data.sources[0].path: ", "is one file, not 2"),
    ("chat from shards", 'path = "shards/shard-000.tar"\nformat = "chat"', "data.sources[0].format: ", "holds caption, not 'chat'"),
    ("captions from LLaVA", 'path = "llava/llava.json"\nformat = "caption"', "data.sources[0].format: ", "holds chat, not 'caption'"),
    ("shuffle negative", SOURCES["tar"] + "\nshuffle_buffer = -1", "data.sources[0].shuffle_buffer must be an integer from 0 to", ""),
    ("shuffle a word", SOURCES["tar"] + '\nshuffle_buffer = "big"', "data.sources[0].shuffle_buffer must be", ""),
    ("shuffle of JSONL", 'path = "a.jsonl"\nformat = "text"\nshuffle_buffer = 10', "data.sources[0].shuffle_buffer: ", "not a JSONL file"),
    ("caption field of parquet", SOURCES["parquet"] + '\ncaption_field = "c"', "data.sources[0].caption_field: ", "is for webdataset shard (.tar) sources, not a parquet file"),
    ("caption field empty", SOURCES["tar"] + '\ncaption_field = ""', "data.sources[0].caption_field must be a non-empty string", ""),
    ("column of shards", SOURCES["tar"] + '\nimage_column = "jpg"', "data.sources[0].image_column: ", "is for parquet file sources"),
    ("images of shards", SOURCES["tar"] + '\nimages = "llava/images"', "data.sources[0].images: ", "not a webdataset shard"),
    ("image column missing", SOURCES["parquet"] + '\nimage_column = "jpg"', "data.sources[0].image_column: ", "has no column 'jpg' (it has image, text, n)"),
    ("text column missing", SOURCES["parquet"] + '\ntext_column = "caption"', "data.sources[0].text_column: ", "has no column 'caption'"),
    ("text column of numbers", SOURCES["parquet"] + '\ntext_column = "n"', "data.sources[0].text_column: ", "'n' holds int64, not text"),
    ("image column of text", SOURCES["parquet"] + '\nimage_column = "n"', "data.sources[0].image_column: ", "holds int64, not an image"),
    ("interleaved without lists", 'path = "c.parquet"\nformat = "interleaved"\nimage_column = "image"\ntext_column = "text"', "data.sources[0].", "not a list of"),
    ("images folder missing", SOURCES["json"].replace("llava/images", "nowhere"), "data.sources[0].images: ", "no such folder"),
    ("images zip without the folder", SOURCES["json"].replace("llava/images", "zipped/images.zip/val"), "data.sources[0].images: ", "has no folder 'val'"),
    ("images zip broken", SOURCES["json"].replace("llava/images", "broken.zip"), "data.sources[0].images: ", "not a readable one"),
    ("images a number", SOURCES["json"].replace('"llava/images"', "3"), "data.sources[0].images must be a non-empty string", ""),
]  # fmt: skip


def write_recipe(folder: Path, source: str) -> Path:
    (folder / "a.jsonl").write_text("")
    path = folder / "recipe.toml"
    path.write_text(f'model = "model"\nout = "run"\n[[data.sources]]\n{source}\n')
    return path


@pytest.mark.parametrize(
    "case, source, key, message", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES]
)
def test_bad_source_settings_are_one_line_errors_naming_the_key(
    project, case, source, key, message
):
    with pytest.raises(UserError) as error:
        load_recipe(write_recipe(project, source))
    assert key in str(error.value) and message in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_source_paths_are_relative_to_the_recipe(project, monkeypatch):
    recipe_path = write_recipe(project, SOURCES["tar"] + "\n[[data.sources]]\n" + SOURCES["json"])
    (project / "elsewhere").mkdir()
    monkeypatch.chdir(project / "elsewhere")
    recipe = load_recipe(Path("../recipe.toml"))
    tar, llava = recipe.data.sources
    assert tar.path == str(project / "shards" / "shard-{000..001}.tar")
    assert llava.images == str((project / "llava" / "images").resolve())
    zipped = load_recipe(
        recipe_path,
        [
            "data.sources=[{path='zipped/llava.json', format='chat', images='zipped/images.zip/train'}]"
        ],
    )
    assert zipped.data.sources[0].images == str(
        (project / "zipped" / "images.zip" / "train").resolve()
    )

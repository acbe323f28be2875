"""The from-scratch tokenizer: one token per box coordinate, exact round trips, chat turns."""

import json
from pathlib import Path

import numpy as np
import pytest
from builders import make_dataset, make_tokenizer
from helpers import run_cli
from transformers import AutoTokenizer

from mm1_mlx.errors import UserError
from mm1_mlx.loading import DEMO_MODEL, load
from mm1_mlx.train.tokenizer import CHAT_TEMPLATE, train_tokenizer

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "train/recipes/demo/config.json"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    make_dataset(root / "data")
    train_tokenizer(sorted((root / "data").glob("*.jsonl")), root / "tokenizer")
    return root / "tokenizer"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_every_coordinate_is_one_token(tokenizer):
    text = "Where is the red square? [0, 37, 480, 1000]"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces[-9:] == ["[", "0", ",", " 37", ",", " 480", ",", " 1000", "]"]
    for number in ("0", "7", "480", "1000"):
        assert len(tokenizer.encode(" " + number)) == 1 and len(tokenizer.encode(number)) == 1


def test_words_of_the_data_are_whole_tokens(tokenizer):
    assert len(tokenizer.encode(" square")) == 1 and len(tokenizer.encode(" red")) == 1


def test_chat_template_ends_assistant_turns_with_eos(tokenizer):
    messages = [{"role": "user", "content": "What color?"}, {"role": "assistant", "content": "red"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "User: What color?\nAssistant: red</s>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)


def test_the_demo_model_ships_the_chat_template():
    """The shipped folder's copies (written by the tokenizer's save) are CHAT_TEMPLATE."""
    config = json.loads((DEMO_MODEL / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (DEMO_MODEL / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_too_small_a_vocabulary_is_refused(tmp_path):
    make_dataset(tmp_path / "data", n=3)
    with pytest.raises(UserError, match="too small"):
        train_tokenizer([tmp_path / "data" / "text.jsonl"], tmp_path / "tok", vocab_size=600)


def test_cli_data_tokenizer(tmp_path):
    from helpers import run_cli

    make_dataset(tmp_path / "data", n=4)
    files = [str(p) for p in sorted((tmp_path / "data").glob("*.jsonl"))]
    code, out, err = run_cli("data", "tokenizer", *files, "--out", str(tmp_path / "tok"))
    assert code == 0, err
    assert (tmp_path / "tok" / "tokenizer.json").is_file() and "tokens" in out
    code, _, err = run_cli("data", "tokenizer", str(tmp_path / "none.jsonl"), "--out", "x")
    assert code == 1 and "no such file" in err


def coordinate_rows(model_dir, tokenizer, numbers) -> np.ndarray:
    model, _ = load(model_dir)
    table = np.array(model.token_embedding.weight)
    return table[[tokenizer.encode(f" {n}")[0] for n in numbers]]


def cosine(a, b) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_smooth_numbers_start_near_coordinates_near(tokenizer_dir, tokenizer, tmp_path):
    config = DEMO_CONFIG
    for smooth in (True, False):
        flag = ["--smooth-numbers"] if smooth else []
        out = tmp_path / str(smooth)
        code, _, err = run_cli(
            "init", str(config), "--tokenizer", str(tokenizer_dir), "--out", str(out), *flag
        )
        assert code == 0, err
        rows = coordinate_rows(out, tokenizer, (100, 102, 900))
        near, far = cosine(rows[0], rows[1]), cosine(rows[0], rows[2])
        if smooth:
            assert near > 0.35 and near - far > 0.25, (near, far)
        else:
            assert abs(near) < 0.2 and abs(far) < 0.2, (near, far)


def test_smooth_numbers_need_one_token_per_number(tmp_path):
    make_tokenizer(tmp_path / "tokenizer")
    config = DEMO_CONFIG
    code, _, err = run_cli(
        "init",
        str(config),
        "--tokenizer",
        str(tmp_path / "tokenizer"),
        "--out",
        str(tmp_path / "m"),
        "--smooth-numbers",
    )
    assert code == 1
    assert (
        err.strip()
        == "error: --smooth-numbers needs a tokenizer where each of 0..1000 is one token"
    )

"""The from-scratch tokenizer: one token per box coordinate, exact round trips, chat turns."""

import pytest
from builders import make_dataset

from mm1_mlx.errors import UserError
from mm1_mlx.train.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    make_dataset(root / "data")
    return train_tokenizer(sorted((root / "data").glob("*.jsonl")), root / "tokenizer")


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

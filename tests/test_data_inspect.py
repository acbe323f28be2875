"""`mm1-mlx data inspect`: a source's first examples as training lays them out."""

import io
import json
import tarfile

from helpers import run_cli
from PIL import Image


def png(color=(255, 0, 0), size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def write_shard(path, captions: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for index, caption in enumerate(captions):
            for suffix, data in (("png", png()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{index:04d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_shows_the_text_the_images_and_the_loss_with_the_demo_model(tmp_path):
    write_shard(tmp_path / "s-000.tar", ["a red square", "a blue circle", "a green star"])
    write_shard(tmp_path / "s-001.tar", ["a grey line"])
    code, out, err = run_cli("data", "inspect", str(tmp_path / "s-{000..001}.tar"), "--n", "2")
    assert code == 0, err
    assert "s-000.tar:0000 (" in out and "s-000.tar:0001 (" in out and "s-001" not in out
    assert "<image>⟦a red square</s>⟧" in out  # the caption and its EOS carry loss
    assert "image 1: " + str(tmp_path / "s-000.tar:0000.png") + " (64x48, tiles 1x1)" in out


def test_chat_loss_is_on_the_answer_only(tmp_path, tiny_model_dir):
    Image.new("RGB", (48, 48), (255, 0, 0)).save(tmp_path / "a.png")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    (tmp_path / "llava.json").write_text(
        json.dumps([{"id": "1", "image": "a.png", "conversations": turns}])
    )
    argv = ["data", "inspect", str(tmp_path / "llava.json"), "--model", str(tiny_model_dir)]
    code, out, err = run_cli(*argv)
    assert code == 0, err
    assert out.count("⟦") == 1 and "What colour?" in out.split("⟦")[0]
    assert "red" in out.split("⟦")[1] and "1 image)" in out


def test_bad_records_are_summed_up(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\nnot json\n')
    code, out, err = run_cli("data", "inspect", str(tmp_path / "a.jsonl"), "--format", "text")
    assert code == 0, err
    assert "⟦" in out and "skipped 1 example: 1 unparsable line" in out


def test_bad_options_are_one_line_errors_naming_them(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n')
    cases = [
        ([str(tmp_path / "a.jsonl")], "--format: needed for"),
        (
            [str(tmp_path / "a.jsonl"), "--format", "caption", "--caption-field", "c"],
            "--caption-field: is for",
        ),
        (
            [str(tmp_path / "none.tar")],
            "SOURCE: " + str(tmp_path / "none.tar") + ": no such data file",
        ),
        ([str(tmp_path / "a.jsonl"), "--format", "video"], "unknown format 'video'"),
        ([str(tmp_path / "a.jsonl"), "--format", "text", "--n", "0"], "--n"),
    ]
    for argv, message in cases:
        code, out, err = run_cli("data", "inspect", *argv)
        assert code in (1, 2) and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, err

"""Evaluation: scoring rules, reading eval files, per-task reports, and `mm1-mlx eval`."""

import json

import pytest
from helpers import run_cli
from PIL import Image

from mm1_mlx import evaluate as evaluation
from mm1_mlx.boxes import parse_boxes
from mm1_mlx.errors import UserError
from mm1_mlx.evaluate import evaluate, iou, is_correct, load_examples
from mm1_mlx.train import synth

COORDINATE_SIZE = (1000, 1000)  # pixels == coordinates, so IoUs are exact


# -- scoring --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, correct",
    [
        ("red", True),
        ("  Red \n", True),
        ("RED", True),
        ("red.", False),
        ("a red", False),
        ("", False),
    ],
)
def test_text_answers_match_after_trimming_and_lower_casing(prediction, correct):
    assert is_correct(prediction, "red", (128, 128)) is correct


def test_box_iou():
    a, b, c = (
        parse_boxes(text, COORDINATE_SIZE)[0]
        for text in ("[0, 0, 10, 10]", "[5, 0, 15, 10]", "[50, 50, 60, 60]")
    )
    assert iou(a, a) == 1
    assert iou(a, b) == pytest.approx(50 / 150)
    assert iou(a, c) == 0


@pytest.mark.parametrize(
    "prediction, correct",
    [
        ("[0, 0, 400, 1000]", True),
        (" [0,0,400,1000]\n", True),
        ("[0, 0, 200, 1000]", True),  # IoU 0.5: enough
        ("[0, 0, 199, 1000]", False),  # IoU 0.4975
        ("[200, 0, 600, 1000]", False),  # IoU 1/3
        ("[0, 0, 800, 1000]", True),  # IoU 0.5 from outside
        ("[0, 0, 801, 1000]", False),
        ("the box is [0, 0, 400, 1000]", False),  # a box answer with other text
        ("[0, 0, 400, 1000] blue", False),
        ("[0, 0, 400, 1000] [0, 0, 400, 1000]", False),
        ("[0, 0, 400]", False),
        ("a blue square", False),
    ],
)
def test_box_answers_count_by_iou(prediction, correct):
    assert is_correct(prediction, "[0, 0, 400, 1000]", COORDINATE_SIZE) is correct


def test_box_answers_on_a_real_image_size():
    truth = "[469, 78, 703, 312]"
    assert is_correct("[480, 90, 710, 320]", truth, (128, 128))
    assert not is_correct("[600, 78, 834, 312]", truth, (128, 128))  # IoU ~ 0.3
    assert not is_correct(truth, "a blue square", (128, 128))  # a box for a text answer


# -- reading --------------------------------------------------------------------------------


def example_record(image="a.png", **fields) -> dict:
    record = {
        "task": "color",
        "images": [image],
        "messages": [{"role": "user", "content": "<image>\nWhat color is the circle?"}],
        "answer": "red",
    }
    return {**record, **fields}


def write_examples(folder, records, name="eval.jsonl"):
    Image.new("RGB", (128, 128), "white").save(folder / "a.png")
    path = folder / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_load_examples_resolves_images_and_limits(tmp_path):
    path = write_examples(tmp_path, [example_record(), "", example_record(answer="blue")])
    examples = load_examples(path)
    assert [example.answer for example in examples] == ["red", "blue"]
    assert examples[0].images == [tmp_path / "a.png"]
    assert examples[1].origin == f"{path}:3"
    assert len(load_examples(path, limit=1)) == 1


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        (example_record(answer=None), "'answer'"),
        (example_record(task=""), "'task'"),
        (example_record(images="a.png"), "'images'"),
        (example_record(messages=[{"role": "assistant", "content": "hi"}]), "'messages'"),
        (example_record(messages=[]), "'messages'"),
        (example_record(image="missing.png"), "no such image"),
    ],
)
def test_bad_lines_name_their_place(tmp_path, line, message):
    path = write_examples(tmp_path, [example_record(), line])
    with pytest.raises(UserError, match=message) as error:
        load_examples(path)
    assert str(error.value).startswith(f"{path}:2: ")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="no such eval file"):
        load_examples(tmp_path / "nothing.jsonl")
    with pytest.raises(UserError, match="no examples"):
        load_examples(write_examples(tmp_path, []))


# -- reports --------------------------------------------------------------------------------


def test_evaluate_scores_each_task(tmp_path, monkeypatch):
    """With a stand-in model that knows colours and nothing else."""
    calls = []

    def answer(model, processor, messages, images, max_tokens):
        calls.append((messages, images, max_tokens))
        return " Red" if "color" in messages[-1]["content"] else "[0, 0, 1, 1]"

    monkeypatch.setattr(evaluation, "generate", answer)
    records = [
        example_record(),
        example_record(answer="blue"),
        example_record(task="ground_shape", answer="[10, 10, 500, 500]"),
    ]
    examples = load_examples(write_examples(tmp_path, records))
    report = evaluate(None, None, examples, max_tokens=7)
    assert calls[0] == (examples[0].messages, examples[0].images, 7)
    scores = report.scores()
    assert list(scores) == ["color", "ground_shape"]
    assert (scores["color"].n, scores["color"].correct, scores["color"].accuracy) == (2, 1, 0.5)
    assert report.rows() == [
        ("color", "2", "1", "50.0%"),
        ("ground_shape", "1", "0", "0.0%"),
        ("all", "3", "1", "33.3%"),
    ]
    data = report.to_json()
    assert data["tasks"]["color"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert data["all"]["n"] == 3
    assert data["examples"][0]["prediction"] == " Red" and data["examples"][0]["correct"]


# -- the command ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "sets"
    synth.write_eval(out, 2, seed=11)
    return out


def test_eval_cli_prints_a_table_and_writes_json(eval_sets, tiny_model_dir, tmp_path):
    tasks = ["describe", "ground_button", "compare"]
    data = [arg for task in tasks for arg in ("--data", str(eval_sets / f"{task}.jsonl"))]
    report = tmp_path / "report.json"
    args = ["eval", "--model", str(tiny_model_dir), *data, "--limit", "1", "--json", str(report)]
    code, stdout, stderr = run_cli(*args, "--max-tokens", "8")
    assert code == 0, stderr
    for word in [*tasks, "all", "accuracy"]:
        assert word in stdout
    result = json.loads(report.read_text())
    assert list(result["tasks"]) == tasks
    assert all(score["n"] == 1 for score in result["tasks"].values())
    assert len(result["examples"]) == 3


@pytest.mark.parametrize(
    "name, content, message",
    [("missing.jsonl", None, "no such eval file"), ("bad.jsonl", "{oops\n", "not JSON")],
)
def test_eval_cli_bad_input_is_one_line(tiny_model_dir, tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / name)]
    code, _, stderr = run_cli(*args)
    assert code == 1 and message in stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")

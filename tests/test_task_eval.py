"""`mm1-mlx eval --task`: tiny parquet files in each benchmark's own layout, prompts as lmms-eval
writes them, saved predictions scored end to end, a run of a tiny model with --out, an
interrupted run resumed, and bad input refused before any work."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import run_cli
from PIL import Image

from mm1_mlx.errors import UserError
from mm1_mlx.tasks import runner
from mm1_mlx.tasks.definitions import TASKS

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
VQA_ANSWER = pa.struct(
    [("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())]
)


def picture(size=(32, 24), color=(200, 30, 30), kind="PNG") -> dict:
    """An image cell as the hub stores it: {bytes, path}."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, kind)
    return {"bytes": buffer.getvalue(), "path": f"image.{kind.lower()}"}


def vqa_answers(*answers: str) -> list[dict]:
    return [
        {"answer": answer, "answer_confidence": "yes", "answer_id": number}
        for number, answer in enumerate(answers, 1)
    ]


# Per task: its columns (with arrow types where inference would not give the dataset's), the
# saved predictions by id, and each example's expected score (worked out by hand).
CASES = {
    "vqav2": (
        {
            "question_id": [1, 2, 3],
            "question": ["How many dogs?", "What color?", "What animal?"],
            "answers": (
                [vqa_answers(*["2"] * 10), vqa_answers(*["red"] * 2, *["blue"] * 8)]
                + [vqa_answers(*["dog"] * 10)],
                pa.list_(VQA_ANSWER),
            ),
            "image": [picture(), picture(kind="JPEG"), picture()],
        },
        {1: "Two", 2: "red", 3: "cat"},
        {1: 1.0, 2: 0.6, 3: 0.0},
    ),
    "textvqa": (
        {
            "question_id": ([7, 8], pa.int32()),
            "question": ["what does it say?", "what brand?"],
            "answers": [["dog 's ball"] * 10, ["helloworld"] * 3 + ["x"] * 7],
            "image": [picture(), picture()],
        },
        {7: "The dog's ball", 8: "Hello,World"},
        {7: 1.0, 8: 0.9},
    ),
    "docvqa": (
        {
            "questionId": ["q1", "q2"],
            "question": ["What year?", "Which code?"],
            "answers": [["1987"], ["ax"]],
            "image": [picture(), picture()],
        },
        {"q1": " 1987", "q2": "ab"},
        {"q1": 1.0, "q2": 0.5},
    ),
    "mmmu": (
        {
            "id": ["validation_Art_1", "validation_Math_2", "validation_Art_3"],
            "question": ["What is in <image 1>?", "What is 6 x 7?", "Which <image 1>?"],
            "options": ["['cat', 'dog']", "[]", "['red', 'blue']"],
            "answer": ["B", "42", "B"],
            "question_type": ["multiple-choice", "open", "multiple-choice"],
            **{f"image_{n}": ([picture()] * 3, IMAGE_TYPE) for n in range(1, 8)},
        },
        {
            "validation_Art_1": "(B)",
            "validation_Math_2": "The answer is 42",
            "validation_Art_3": "A",
        },
        {"validation_Art_1": 1.0, "validation_Math_2": 1.0, "validation_Art_3": 0.0},
    ),
    "scienceqa_img": (
        {
            "question": ["Which is a mammal?", "Which is hot?"],
            "choices": [["frog", "cat"], ["ice", "snow", "fire"]],
            "answer": ([1, 2], pa.int8()),
            "hint": ["", "Look at the picture."],
            "image": [picture(), picture()],
        },
        {0: "B", 1: "A. ice"},
        {0: 1.0, 1: 0.0},
    ),
    "refcoco": (
        {
            "question_id": ["r0", "r1"],
            "answer": [["red box", "the left one"], ["thing"]],
            "bbox": ([[50, 25, 100, 50], [0, 0, 100, 100]], pa.list_(pa.float32())),
            "image": [picture((200, 100)), picture((200, 100))],
        },
        {"r0#0": "[250, 250, 750, 750]", "r0#1": "[0, 0, 100, 100]", "r1#0": "[0, 0, 500, 1000]"},
        {"r0#0": 1.0, "r0#1": 0.0, "r1#0": 1.0},
    ),
    "screenspot": (
        {
            "instruction": ["open settings", "go back"],
            "bbox": [[0.2, 0.3, 0.4, 0.5], [0.0, 0.0, 0.1, 0.1]],
            "image": [picture(), picture()],
        },
        {0: "[300, 400]", 1: "[900, 900]"},
        {0: 1.0, 1: 0.0},
    ),
}


def write_parquet(path, columns: dict, drop: str | None = None):
    arrays = {}
    for name, values in columns.items():
        values, kind = values if isinstance(values, tuple) else (values, None)
        kind = IMAGE_TYPE if name.startswith("image") and kind is None else kind
        arrays[name] = pa.array(values, type=kind)
    arrays.pop(drop, None)
    pq.write_table(pa.table(arrays), path, row_group_size=2)  # several row groups to stream
    return path


def write_predictions(path, predictions: dict) -> str:
    lines = [json.dumps({"id": key, "answer": answer}) for key, answer in predictions.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def out_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def task_files(tmp_path, name: str):
    columns, predictions, _ = CASES[name]
    data = write_parquet(tmp_path / f"{name}.parquet", columns)
    return str(data), write_predictions(tmp_path / "predictions.jsonl", predictions)


# -- prompts and examples -------------------------------------------------------------------


def examples_of(name: str, limit=None):
    return list(runner.read_examples(TASKS[name], [CASES_FILES[name]], True, limit))


@pytest.fixture(scope="module", autouse=True)
def _files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    for name, (columns, _, _) in CASES.items():
        CASES_FILES[name] = write_parquet(folder / f"{name}.parquet", columns)


CASES_FILES = {}


def test_the_help_names_every_task():
    code, stdout, _ = run_cli("eval", "--help")
    assert code == 0
    assert all(name in stdout for name in TASKS)


def test_prompts_follow_lmms_eval():
    vqa, text, mmmu, science = (
        examples_of(n)[i]
        for n, i in [("vqav2", 0), ("textvqa", 0), ("mmmu", 0), ("scienceqa_img", 1)]
    )
    short = "Answer the question using a single word or phrase."
    assert vqa.prompt == f"How many dogs?\n{short}"
    assert text.prompt == f"What does it say?\n{short}"  # capitalised
    letter = "Answer with the option's letter from the given choices directly."
    assert mmmu.prompt == f"What is in <image 1>?\nA. cat\nB. dog\n\n{letter}"
    assert examples_of("mmmu")[1].prompt == f"What is 6 x 7?\n\n{short}"
    assert science.prompt == (
        f"Context: Look at the picture.\nWhich is hot?\nA. ice\nB. snow\nC. fire\n{letter}"
    )
    assert examples_of("scienceqa_img")[0].prompt.startswith("Which is a mammal?\nA. frog")


def test_examples_carry_ids_images_and_references():
    vqa = examples_of("vqav2")
    assert [e.id for e in vqa] == [1, 2, 3] and all(len(e.images) == 1 for e in vqa)
    assert vqa[1].reference == ["red"] * 2 + ["blue"] * 8
    assert Image.open(io.BytesIO(vqa[1].images[0])).format == "JPEG"
    assert len(examples_of("mmmu")[0].images) == 1  # only the images the text refers to
    assert examples_of("mmmu")[1].images == []
    refcoco = examples_of("refcoco")
    assert [e.id for e in refcoco] == ["r0#0", "r0#1", "r1#0"]  # one per expression
    assert "describes: the left one" in refcoco[1].prompt
    assert [e.id for e in examples_of("screenspot")] == [0, 1]
    assert [e.id for e in examples_of("refcoco", limit=2)] == ["r0#0", "r0#1"]
    assert runner.count_examples(TASKS["refcoco"], [CASES_FILES["refcoco"]]) == 3
    assert runner.count_examples(TASKS["vqav2"], [CASES_FILES["vqav2"]]) == 3


def test_images_are_not_read_to_score_saved_predictions():
    without = list(runner.read_examples(TASKS["vqav2"], [CASES_FILES["vqav2"]], False))
    assert all(e.images == [] for e in without)


@pytest.mark.parametrize(
    "name, column, value, message",
    [
        ("vqav2", "answers", None, "answers is not a list of strings"),
        ("mmmu", "image_1", None, "image_1 is empty"),
        ("mmmu", "options", "not a list", "options is not a list"),
        ("scienceqa_img", "answer", 5, "not the index of one of the choices"),
        ("screenspot", "bbox", [20.0, 30.0, 40.0, 50.0], "not in fractions 0..1"),
        ("refcoco", "bbox", [1.0, 2.0], "not 4 finite numbers"),
    ],
)
def test_bad_rows_name_their_place(tmp_path, name, column, value, message):
    columns = dict(CASES[name][0])
    values, kind = (
        columns[column] if isinstance(columns[column], tuple) else (columns[column], None)
    )
    columns[column] = ([value, *values[1:]], kind)
    path = write_parquet(tmp_path / "bad.parquet", columns)
    with pytest.raises(UserError, match=message) as error:
        list(runner.read_examples(TASKS[name], [path], True))
    assert f"{path} row 0" in str(error.value)


# -- scoring saved predictions through the command ------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_saved_predictions_are_scored(tmp_path, name):
    data, predictions = task_files(tmp_path, name)
    out = tmp_path / "results.jsonl"
    summary = tmp_path / "summary.json"
    args = ["eval", "--task", name, "--data", data, "--predictions", predictions]
    code, stdout, stderr = run_cli(*args, "--out", str(out), "--json", str(summary))
    assert code == 0, stderr
    expected = CASES[name][2]
    lines = out_lines(out)
    assert {line["id"]: line["score"] for line in lines} == pytest.approx(expected)
    assert all(line["task"] == name and "prediction" in line for line in lines)
    score = sum(expected.values()) / len(expected)
    assert f"{score:.2%}" in stdout
    assert json.loads(summary.read_text()) == pytest.approx(
        {"task": name, "n": len(expected), "score": score}
    )


def test_examples_without_a_prediction_are_counted_not_scored(tmp_path):
    data, _ = task_files(tmp_path, "vqav2")
    predictions = write_predictions(tmp_path / "some.jsonl", {"2": "red", 99: "x"})
    code, stdout, stderr = run_cli(
        "eval", "--task", "vqav2", "--data", data, "--predictions", predictions
    )
    assert code == 0, stderr
    assert "60.00%" in stdout and "2 examples had no prediction" in stdout
    none = write_predictions(tmp_path / "none.jsonl", {"98": "x"})
    code, _, stderr = run_cli("eval", "--task", "vqav2", "--data", data, "--predictions", none)
    assert code == 1 and "no prediction has the id of an example" in stderr


# -- a model, --out, and resuming -----------------------------------------------------------


def test_a_model_run_writes_out_and_an_interrupted_run_resumes(
    tiny_model_dir, tmp_path, monkeypatch
):
    data, _ = task_files(tmp_path, "vqav2")
    out = tmp_path / "results.jsonl"
    args = ["eval", "--task", "vqav2", "--model", str(tiny_model_dir), "--data", data]
    args += ["--out", str(out), "--max-tokens", "4"]
    code, stdout, stderr = run_cli(*args, "--limit", "1")
    assert code == 0, stderr
    (first,) = out_lines(out)
    assert first["id"] == 1 and isinstance(first["prediction"], str)
    assert first["score"] in (0.0, 0.3, 0.6, 0.9, 1.0) and "vqav2" in stdout

    asked = []

    def interrupted(model, processor, prompt, images, **settings):
        asked.append(prompt)
        if len(asked) == 2:
            raise KeyboardInterrupt
        return " Red "

    monkeypatch.setattr(runner, "generate", interrupted)
    code, _, stderr = run_cli(*args)
    assert code == 130  # Ctrl-C
    assert [line["id"] for line in out_lines(out)] == [1, 2]  # example 2 was flushed at once
    assert out_lines(out)[1] == {"task": "vqav2", "id": 2, "prediction": "Red", "score": 0.6}

    with out.open("a") as file:
        file.write('{"task": "vqav2", "id": 3, "predic')  # cut off mid-write
    asked.clear()
    monkeypatch.setattr(runner, "generate", lambda *a, **k: asked.append(a) or "dog")
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    assert len(asked) == 1  # only example 3 was answered
    lines = out_lines(out)  # the torn line is gone
    assert [line["id"] for line in lines] == [1, 2, 3] and lines[2]["score"] == 1.0
    total = (first["score"] + 0.6 + 1.0) / 3
    assert f"{total:.2%}" in stdout and "2 of the 3 scores were already in" in stdout


def test_a_last_line_without_its_newline_is_kept(tmp_path):
    data, predictions = task_files(tmp_path, "vqav2")
    out = tmp_path / "results.jsonl"
    out.write_text('{"task": "vqav2", "id": 1, "prediction": "2", "score": 1.0}')
    args = ["eval", "--task", "vqav2", "--data", data, "--predictions", predictions]
    code, _, stderr = run_cli(*args, "--out", str(out))
    assert code == 0, stderr
    assert [line["id"] for line in out_lines(out)] == [1, 2, 3]


# -- refused before any work ----------------------------------------------------------------

BAD = [
    ("unknown task", ["--task", "vqa3", "--data", "{data}"], "the tasks are vqav2, textvqa"),
    ("missing file", ["--data", "{tmp}/nope.parquet"], "no such data file"),
    ("not parquet", ["--data", "{text}"], "not a readable parquet file"),
    ("missing column", ["--data", "{no_answers}"], "no column 'answers'"),
    ("same file twice", ["--data", "{data}", "--data", "{data}"], "given twice"),
    ("limit 0", ["--data", "{data}", "--limit", "0"], "--limit"),
    ("out in no folder", ["--data", "{data}", "--out", "{tmp}/no/r.jsonl"], "no such folder"),
    ("out onto the data", ["--data", "{data}", "--out", "{data}"], "holds the input"),
    (
        "out onto predictions",
        ["--data", "{data}", "--predictions", "{predictions}", "--out", "{predictions}"],
        "holds the input",
    ),
    ("out of another task", ["--data", "{data}", "--out", "{other_task}"], "another --out"),
    ("out with a bad line", ["--data", "{data}", "--out", "{bad_out}"], "bad_out.jsonl:1:"),
    (
        "predictions missing",
        ["--data", "{data}", "--predictions", "{tmp}/p.jsonl"],
        "no such predictions file",
    ),
    (
        "prediction without answer",
        ["--data", "{data}", "--predictions", "{no_answer}"],
        'no_answer.jsonl:2: a prediction is {"id"',
    ),
    (
        "prediction not json",
        ["--data", "{data}", "--predictions", "{text}"],
        "text.txt:1: not JSON",
    ),
    ("prediction twice", ["--data", "{data}", "--predictions", "{twice}"], "already given"),
    (
        "predictions and model",
        ["--data", "{data}", "--predictions", "{predictions}", "--model", "{tmp}"],
        "takes no --model",
    ),
]


@pytest.mark.parametrize("args, message", [case[1:] for case in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_before_any_work(tmp_path, args, message):
    data, predictions = task_files(tmp_path, "vqav2")
    paths = {"tmp": tmp_path, "data": data, "predictions": predictions}
    paths["text"] = tmp_path / "text.txt"
    paths["text"].write_text("hello\n")
    paths["no_answers"] = write_parquet(tmp_path / "x.parquet", CASES["vqav2"][0], "answers")
    paths["other_task"] = tmp_path / "other.jsonl"
    paths["other_task"].write_text('{"task": "docvqa", "id": "q1", "score": 1}\n')
    paths["bad_out"] = tmp_path / "bad_out.jsonl"
    paths["bad_out"].write_text('{"id": 1}\n{"task": "vqav2", "id": 2, "score": 1}\n')
    paths["no_answer"] = tmp_path / "no_answer.jsonl"
    paths["no_answer"].write_text('{"id": 1, "answer": "2"}\n{"id": 2}\n')
    paths["twice"] = tmp_path / "twice.jsonl"
    paths["twice"].write_text('{"id": 1, "answer": "2"}\n{"id": "1", "answer": "3"}\n')
    filled = [arg.format(**paths) for arg in args]
    if "--task" not in filled:
        filled = ["--task", "vqav2", *filled]
    if "--predictions" not in filled and "--model" not in filled:
        filled += ["--model", str(tmp_path / "no-model")]  # loading it would fail otherwise
    code, stdout, stderr = run_cli("eval", *filled)
    assert code != 0 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")


def test_out_and_predictions_need_a_task(tmp_path):
    code, _, stderr = run_cli("eval", "--data", "x.jsonl", "--out", str(tmp_path / "o.jsonl"))
    assert code == 1 and "go with --task" in stderr


def test_mmmu_open_answers_written_as_a_list(tmp_path):
    columns = dict(CASES["mmmu"][0])
    columns["answer"] = ["B", "['1.5', '1.50']", "B"]
    path = write_parquet(tmp_path / "mmmu.parquet", columns)
    example = list(runner.read_examples(TASKS["mmmu"], [path], False))[1]
    assert example.reference.answers == ["1.5", "1.50"]
    assert TASKS["mmmu"].score("so it is 1.5", example) == 1.0


def test_rows_count_on_over_several_files(tmp_path):
    columns = dict(CASES["scienceqa_img"][0])
    first = write_parquet(tmp_path / "a.parquet", columns)
    second = write_parquet(tmp_path / "b.parquet", columns)
    examples = list(runner.read_examples(TASKS["scienceqa_img"], [first, second], False))
    assert [e.id for e in examples] == [0, 1, 2, 3]  # ids over the files
    assert examples[3].origin == f"{second} row 1"  # places within each file

"""Every script under benchmarks/ runs as documented, on a tiny configuration, in seconds: a
smoke test (the numbers are not measurements), so a benchmark cannot rot unnoticed."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import shapes_picture

from mm1_mlx.loading import DEMO_MODEL, load
from mm1_mlx.train.synth import STYLES, TASKS, Button, ScreenScene, Shape, ShapeScene

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(name: str, *args: str) -> str:
    """The script's standard output; it must exit 0, with MLX on OpenBLAS (mm1_mlx imported
    before mlx.core)."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mlx was imported before mm1_mlx" not in result.stderr
    return result.stdout


def test_every_benchmark_has_a_smoke_test():
    tested = ["answer_errors", "conv_pooling", "demo_eval", "demo_training", "encoder_probe",
              "grounding_attention", "grounding_probe", "grounding_trace", "inference",
              "openblas_matmul", "spec_renderer", "training"]  # fmt: skip
    assert sorted(path.stem for path in BENCHMARKS.glob("*.py")) == tested


def test_conv_pooling():
    out = run_benchmark("conv_pooling.py", "--tiles", "2", "--rounds", "1")
    assert [line.split(":")[0] for line in out.splitlines()] == [
        "nn.MaxPool2d", "reshapes (vision.py)", "ratio"
    ]  # fmt: skip


@pytest.mark.parametrize("flags", [[], ["--shuffle-image-tokens"]])
def test_grounding_probe(flags):
    out = run_benchmark("grounding_probe.py", "--n", "3", *flags)
    rows = [line for line in out.splitlines() if line.startswith("| ground_")]
    counts = [row.split(" | ")[:2] for row in rows]
    assert counts == [["| ground_shape", "3"], ["| ground_button", "3"]]


def test_grounding_attention():
    out = run_benchmark("grounding_attention.py", "--n", "2")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")][1:]
    config = json.loads((DEMO_MODEL / "config.json").read_text())["text_config"]
    assert len(rows) == config["num_hidden_layers"] * config["num_attention_heads"]
    assert all(len(row) == 8 and 0 <= float(row[-1].strip(" |")) <= 1 for row in rows)


def test_attention_weights_are_causal_distributions_of_every_layer():
    spec = importlib.util.spec_from_file_location(
        "attention", BENCHMARKS / "grounding_attention.py"
    )
    attention = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(attention)
    model, processor = load(DEMO_MODEL)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": f"{processor.image_token}\nWhere is it?"}], [shapes_picture()]
    )
    ids = list(prompt.input_ids)
    weights = attention.attention_weights(model, ids, prompt.tiles)
    assert len(weights) == len(model.decoder.layers)
    heads = model.config.text_config["num_attention_heads"]
    assert weights[0].shape == (heads, len(ids), len(ids))
    assert mx.allclose(weights[-1].sum(-1), mx.array(1.0), atol=1e-5)
    assert float(mx.triu(weights[-1], k=1).abs().max()) == 0  # causal


def test_grounding_trace():
    out = run_benchmark("grounding_trace.py", "--n", "10", "--steps", "2")
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]  # past the header
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    layers = config["text_config"]["num_hidden_layers"]
    # the mean box, the token probe, a row per decoder layer, the answer; four numbers each
    assert len(rows) == 3 + layers and all(len(row.split(" | ")) == 5 for row in rows)


def test_openblas_matmul():
    out = run_benchmark("openblas_matmul.py", "--size", "64", "--repeats", "2")
    assert "bundled BLAS" in out and "ratio" in out


def test_inference(tmp_path):
    out = run_benchmark("inference.py", "--tiny", "--json", str(tmp_path / "r.json"))
    assert "| decode tok/s, fp32 |" in out and "mlx-vlm LLaVA" in out
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["image_tokens"] == {"mm1": 4, "llava": 16}
    assert set(results["decode"]) == {"mm1-mlx", "mlx-lm", "mm1-mlx 4-bit"}
    assert results["llava_hf"]["same_answer"] and "same llava-hf checkpoint" in out


@pytest.mark.slow
def test_training(tmp_path):
    out = run_benchmark(
        "training.py", "--tiny", "--rounds", "1", "--json", str(tmp_path / "r.json")
    )
    assert "| tokens/s |" in out and "MM1 step split" in out
    results = json.loads((tmp_path / "r.json").read_text())
    assert set(results["decoder"]) == {"mlx", "mlx-2", "torch"}
    assert all(side["tokens_per_s"] > 0 for side in results["decoder"].values())
    assert all(0 < side["forward_backward_s"] for side in results["decoder"].values())
    assert set(results["elementwise"]) == {"softmax", "SiLU"} and "| softmax |" in out


@pytest.mark.slow
def test_demo_eval(tmp_path):
    out = run_benchmark("demo_eval.py", "--n", "2", "--json", str(tmp_path / "r.json"))
    results = json.loads((tmp_path / "r.json").read_text())
    assert list(results) == list(TASKS)
    styles = (*STYLES, "independent")
    assert all(results[task][style]["n"] == 1 for task in TASKS for style in styles)
    assert all(f"| {task} |" in out for task in TASKS)


def test_answer_errors():
    out = run_benchmark("answer_errors.py", "--n", "4")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")]
    rows = [row for row in rows if row[1] != "right"]
    assert [row[0] for row in rows] == [
        "| describe", "| list_buttons", "| color", "| refer_shape", "| refer_button",
        "| count_kind",
    ]  # fmt: skip
    assert all(sum(int(cell.strip(" |")) for cell in row[1:]) == 4 for row in rows)


def test_answer_errors_refuses_an_odd_count():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "answer_errors.py"), "--n", "3"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and result.stderr.strip().startswith("error: --n")


def answer_errors_module():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import answer_errors
    finally:
        sys.path.remove(str(BENCHMARKS))
    return answer_errors


def test_answer_errors_sorts_a_wrong_list_by_what_went_wrong():
    errors = answer_errors_module()
    truth = "a red circle, a blue square and a blue circle"
    wrong_count, repeats, wrong_order, wrong_thing = errors.KINDS
    assert errors.error_kind("a red circle and a blue square", truth) == wrong_count
    assert errors.error_kind("a red circle, a red circle and a blue circle", truth) == repeats
    assert errors.error_kind("a blue square, a red circle and a blue circle", truth) == wrong_order
    assert errors.error_kind("a red circle, a blue square and a red square", truth) == wrong_thing
    assert errors.error_kind("Send, Send", "Send, Back") == repeats
    assert errors.error_kind("Send, Send", "Send, Send, Back") == wrong_count
    assert errors.error_kind("Send, Send, Back", "Send, Back, Send") == wrong_order


def test_answer_errors_tells_another_things_answer_from_a_misreading():
    errors = answer_errors_module()
    red, blue = Shape("circle", "red", (0, 0, 20, 20)), Shape("square", "blue", (40, 0, 60, 20))
    scene = ShapeScene((red, blue))
    another, nothing = errors.LOOKUP_KINDS
    kind = errors.lookup_error_kind
    assert kind("color", scene, "blue", "red") == another
    assert kind("color", scene, "green", "red") == nothing
    assert kind("refer_shape", scene, "a blue square", "a red circle") == another
    assert kind("refer_shape", scene, "a blue circle", "a red circle") == nothing
    screen = ScreenScene("Music", (Button("Send", "blue", (10, 50, 90, 80)),))
    assert kind("refer_button", screen, "Back", "Send") == nothing
    absent, too_few, too_many = errors.COUNT_KINDS
    assert kind("count_kind", scene, "1", "0") == absent
    assert kind("count_kind", scene, "0", "1") == too_few
    assert kind("count_kind", scene, "2", "1") == too_many


@pytest.mark.slow
def test_encoder_probe():
    out = run_benchmark("encoder_probe.py", str(DEMO_MODEL), "--n", "8")
    header, _, row = out.strip().splitlines()[-3:]
    assert header.startswith("| model | colour | kind |") and header.endswith(
        "box error | word code |"
    )
    assert row.startswith(f"| {DEMO_MODEL} |")


@pytest.mark.slow
def test_demo_training(tmp_path):
    out = run_benchmark("demo_training.py", "--tiny", "--json", str(tmp_path / "r.json"))
    results = json.loads((tmp_path / "r.json").read_text())
    assert len(results) == 3 and all(set(r) == {"1 process", "2 ranks"} for r in results.values())
    assert "| SFT (tokens/s) |" in out


@pytest.mark.slow
def test_demo_training_of_one_stage(tmp_path):
    out = run_benchmark("demo_training.py", "--tiny", "--stages", "sft")
    assert "| SFT (tokens/s) |" in out and "dense" not in out.split("command:")[0]
    assert "--stages sft" in out


def test_the_independent_renderer_keeps_to_the_specification(tmp_path):
    """Its pictures are the generator's scenes in the page's colours and places, drawn with
    other pixels (that is its purpose): they mostly agree with the generator's, not exactly."""
    import random

    import numpy as np

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import spec_renderer
    finally:
        sys.path.remove(str(BENCHMARKS))
    from mm1_mlx.train import synth

    assert spec_renderer.COLOURS == synth.COLORS  # read from docs/synthetic-world.md
    rng, differing = random.Random(0), []
    for _ in range(20):
        for scene in (synth.sample_shape_scene(rng), synth.sample_screen_scene(rng)):
            ours = np.asarray(spec_renderer.render(scene))
            theirs = np.asarray(synth.render(scene, "plain"))
            assert ours.shape == theirs.shape
            differing.append((ours != theirs).any(-1).mean())
            things = scene.shapes if isinstance(scene, synth.ShapeScene) else scene.buttons
            for thing in things:  # a thing's colour fills its box's centre (a label may not)
                x1, y1, x2, y2 = thing.box
                if isinstance(thing, synth.Shape):
                    colour = synth.COLORS[thing.color]
                else:
                    colour = synth.BUTTON_STYLES[thing.style][0]
                assert tuple(ours[y1 + 2, (x1 + x2) // 2]) == colour
    assert 0 < np.mean(differing) < 0.05 and max(differing) < 0.1
    out = run_benchmark("spec_renderer.py", str(tmp_path), "--n", "1")
    assert "wrote 4 pictures" in out and len(list(tmp_path.glob("*.png"))) == 4

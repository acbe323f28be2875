"""A converted LLaVA checkpoint is an ordinary model folder: quantize, the app, eval and LoRA
training (the decoder's adapters, and the connector when a recipe asks) all work on it."""

import base64
import io
import json
import shutil

import numpy as np
import pytest
from builders import make_dataset
from helpers import run_cli
from PIL import Image
from test_llava import llavas  # noqa: F401  (the fixture: converted tiny LLaVA checkpoints)
from test_train import weights

import mm1_mlx
from mm1_mlx.generate import generate
from mm1_mlx.train.recipe import load_recipe
from mm1_mlx.train.trainer import train

RECIPES = mm1_mlx.train.__path__[0] + "/recipes"
QUESTION = "What color is the square?"


@pytest.fixture(scope="module")
def converted(llavas):  # noqa: F811
    _, root = llavas("clip-llama")
    return root / "model"


def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 64, 3), np.uint8))


def answer(folder, max_tokens: int = 6) -> str:
    model, processor = mm1_mlx.load(folder)
    messages = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    return generate(model, processor, messages, [picture()], max_tokens=max_tokens)


def test_quantized_it_loads_and_answers(converted, tmp_path):
    out = tmp_path / "q4"
    code, _, err = run_cli("quantize", str(converted), "--bits", "4", "--group-size", "32",
                           "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert isinstance(answer(out), str)


def test_the_app_answers_as_the_library_does(converted):
    from starlette.testclient import TestClient

    from mm1_mlx.apps import server

    model, processor = mm1_mlx.load(converted)
    png = io.BytesIO()
    picture().save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    app = server.create_app(model, processor, "llava")
    with TestClient(app, base_url="http://127.0.0.1") as client:
        response = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": content}], "max_tokens": 6},
        )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == answer(converted)


def test_eval_scores_it(converted, tmp_path):
    picture().save(tmp_path / "picture.png")
    example = {
        "task": "color",
        "images": ["picture.png"],
        "messages": [{"role": "user", "content": f"<image>\n{QUESTION}"}],
        "answer": "red",
    }
    data, scores = tmp_path / "eval.jsonl", tmp_path / "scores.json"
    data.write_text(json.dumps(example) + "\n")
    code, _, err = run_cli("eval", "--model", str(converted), "--data", str(data),
                           "--json", str(scores), "--max-tokens", "4")  # fmt: skip
    assert code == 0, err
    report = json.loads(scores.read_text())
    assert report["tasks"]["color"]["n"] == 1
    assert report["examples"][0]["prediction"] == answer(converted, max_tokens=4)


def test_lora_trains_the_adapters_and_the_connector_it_is_asked_to(converted, tmp_path):
    shutil.copytree(converted, tmp_path / "model")
    shutil.copy(f"{RECIPES}/tiny-sft.toml", tmp_path / "sft.toml")  # LoRA + connector in full
    make_dataset(tmp_path / "data")
    recipe = load_recipe(tmp_path / "sft.toml", ["train.steps=3", "log.eval_every=0"])
    result = train(recipe)
    before, after = weights(converted, ""), weights(result.out, "")
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed and all(name.startswith(("connector.", "decoder.")) for name in changed)
    assert any(name.startswith("connector.") for name in changed)
    assert not any(name.startswith("vision.") for name in changed)
    assert isinstance(answer(result.out), str)

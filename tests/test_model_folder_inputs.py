"""A model folder's config.json (and weight index) with a value outside its domain: a one-line
error naming the file and the key, from mm1_mlx.load and the CLI, before any weights load."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import run_cli

import mm1_mlx
from mm1_mlx.errors import UserError


def set_key(key: str, value):
    """An edit of config.json: `key` (dotted) set to `value`."""

    def edit(config: dict) -> None:
        *parents, last = key.split(".")
        for part in parents:
            config = config[part]
        config[last] = value

    return edit


CASES = [
    # (edit of config.json, what the one-line message must contain)
    (set_key("vision_config", "clip"), "vision_config must be an object"),
    (set_key("vision_config.act", "swish"), "vision_config.act must be one of"),
    (set_key("vision_config.patch_size", 0), "vision_config.patch_size must be an integer >= 1"),
    (set_key("vision_config.patch_size", 64), "vision_config.patch_size must be at most"),
    (set_key("vision_config.image_size", -48), "vision_config.image_size must be an integer"),
    (set_key("vision_config.image_size", "48"), "vision_config.image_size must be an integer"),
    (set_key("vision_config.class_token", 1), "vision_config.class_token must be true or false"),
    (set_key("vision_config.layer_norm_eps", 0), "vision_config.layer_norm_eps must be"),
    (set_key("vision_config.feature_layer", 99), "vision_config.feature_layer must be within"),
    (set_key("vision_config.conv_channels", 3), "vision_config.conv_channels must be an even"),
    (set_key("vision_config.conv_channels", -2), "vision_config.conv_channels must be an integer"),
    (set_key("connector_config.model_type", "qformer"), "connector_config.model_type must be"),
    (set_key("connector_config.num_tokens", True), "connector_config.num_tokens must be"),
    (set_key("text_config", [1, 2]), "text_config must be an object"),
    (set_key("text_config.vocab_size", "336"), "text_config.vocab_size must be an integer"),
    (set_key("image_token", 5), "image_token must be a non-empty string"),
    (set_key("num_image_tokens", 9), "num_image_tokens must be the connector's tokens per image"),
    (set_key("quantization", "4bit"), "quantization must be an object"),
    (set_key("quantization", {"bits": 4}), "quantization.group_size is missing"),
    (set_key("preprocess_config.splitting", "yes"), "preprocess_config.splitting must be"),
    (set_key("preprocess_config.splitting", {"n_min": 3, "n_max": 2}), "splitting.n_max must be"),
    (set_key("preprocess_config.splitting", {"enable": True}), "unknown key 'enable'"),
    (set_key("preprocess_config.mean", [0.5]), "preprocess_config.mean must be a list of 3"),
    (set_key("preprocess_config.std", [0, 0, 0]), "preprocess_config.std must be a list of 3"),
    (set_key("preprocess_config.std", [0.5, 0.5, 1e999]), "preprocess_config.std must be"),
    (set_key("preprocess_config.resize_mode", "fit"), "preprocess_config.resize_mode must be"),
    (set_key("preprocess_config.interpolation", "cubic"), "preprocess_config.interpolation"),
    (set_key("image_token_id", "335"), "image_token_id must be an integer >= 0"),
    (set_key("image_token_id", -1), "image_token_id must be an integer >= 0"),
    (set_key("image_token_id", 336), "image_token_id must be an integer in 0..335"),
]


@pytest.fixture
def edited_folder(tiny_model_dir, tmp_path):
    """A copy of the tiny model whose config.json an `edit` changes."""

    def make(edit) -> str:
        folder = tmp_path / "model"
        shutil.copytree(tiny_model_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        return str(folder)

    return make


def assert_refused(folder: str, expected: str, file: str = "config.json") -> None:
    with pytest.raises(UserError) as raised:
        mm1_mlx.load(folder)
    message = str(raised.value)
    assert message.startswith(f"{folder}/{file}: ") and expected in message, message
    assert "\n" not in message

    code, out, err = run_cli("chat", "--model", folder, "hi")
    lines = err.strip().splitlines()
    assert code != 0 and "Traceback" not in err + out, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


@pytest.mark.parametrize("edit, expected", CASES)
def test_bad_config_value(edited_folder, edit, expected):
    assert_refused(edited_folder(edit), expected)


def test_weight_map_not_an_object(edited_folder):
    folder = edited_folder(lambda config: None)
    index = {"metadata": {}, "weight_map": ["model.safetensors"]}
    (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(folder, "weight_map must be an object", "model.safetensors.index.json")


def weight_files(*shards: str, index: dict | None = None, single: bool = True):
    """A change to a model folder: copies of model.safetensors named `shards`, an index whose
    weight_map is `index`, model.safetensors kept if `single`."""

    def change(folder: Path) -> None:
        for name in shards:
            shutil.copy(folder / "model.safetensors", folder / name)
        if index is not None:
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
        if not single:
            (folder / "model.safetensors").unlink()

    return change


ONE, TWO = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
# (case, what changes in the tiny model's folder, what the one-line message must contain)
WEIGHT_FILE_CASES = [
    ("a shard beside model.safetensors", weight_files(ONE),
     f"holds model.safetensors and {ONE}, and no model.safetensors.index.json says which to "
     "load: which are the model's weights? (remove the files that are not)"),
    ("an index beside model.safetensors", weight_files(ONE, index={"w": ONE}),
     "model.safetensors.index.json does not name model.safetensors: which are"),
    ("a shard the index does not name", weight_files(ONE, TWO, index={"w": ONE}, single=False),
     f"model.safetensors.index.json does not name {TWO}: which are"),
    ("shards without an index", weight_files(ONE, TWO, single=False),
     f"holds {ONE}, {TWO} but no model.safetensors.index.json to list them"),
]  # fmt: skip


def assert_refused_on_load(folder, expected: str) -> None:
    """Loading the folder, by the library and by `chat`, is a one-line error holding `expected`."""
    with pytest.raises(UserError) as raised:
        mm1_mlx.load(folder)
    message = str(raised.value)
    assert message.startswith(f"{folder}: ") and expected in message and "\n" not in message
    code, _, err = run_cli("chat", "--model", str(folder), "hi")
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1 and expected in err


@pytest.mark.parametrize(
    "change, expected",
    [case[1:] for case in WEIGHT_FILE_CASES],
    ids=[case[0] for case in WEIGHT_FILE_CASES],
)
def test_ambiguous_weight_files(tiny_model_dir, tmp_path, change, expected):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    change(folder)
    assert_refused_on_load(folder, expected)


def test_init_checks_its_config(tiny_model_dir, tmp_path):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["vision_config"]["patch_size"] = 0
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = run_cli("init", str(path), "--tokenizer", str(tiny_model_dir), "--out", str(out))
    assert code != 0 and "Traceback" not in err, err
    assert err.strip() == f"error: {path}: vision_config.patch_size must be an integer >= 1, not 0"
    assert not out.exists()


# (a tokenizer file, what it is replaced with, what the one-line message must contain)
TOKENIZER_CASES = [
    ("chat_template.jinja", "{% for %}", "the chat template is not valid Jinja (line 1: "),
    ("chat_template.jinja", "{{ messages[0] ", "the chat template is not valid Jinja"),
    ("tokenizer_config.json", {"chat_template": 5}, "the chat template must be Jinja text, not 5"),
]


@pytest.mark.parametrize("name, content, expected", TOKENIZER_CASES)
def test_bad_tokenizer_file(tiny_model_dir, tmp_path, name, content, expected):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    if isinstance(content, dict):  # keys changed in the JSON file; the template file goes
        (folder / "chat_template.jinja").unlink()
        content = json.dumps({**json.loads((folder / name).read_text()), **content})
    (folder / name).write_text(content)
    assert_refused_on_load(folder, expected)

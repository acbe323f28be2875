"""Every flag of `mm1-mlx` is checked before any work: a bad value is one `error:` line naming
the flag, a non-zero exit, no traceback, and nothing written. One table row per bad input."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

from mm1_mlx import loading
from mm1_mlx.errors import UserError

CONVERT = ["convert", "--vision", "{vision}", "--llm", "{llm}", "--num-image-tokens", "4"]
CHAT = ["chat", "--model", "{model}"]
EVAL = ["eval", "--model", "{model}", "--data", "{eval}"]
SYNTH = ["data", "synth", "--eval-per-task", "1"]

# (case, a change to the tiny model's config.json for `init`, a substring of the error line)
INIT_CONFIGS = [
    ("hidden size 10**7", {"text_config": {"hidden_size": 10**7}},
     "GB of weights, more than this machine's"),
    ("100 million decoder layers", {"text_config": {"num_hidden_layers": 10**8}},
     "text_config.num_hidden_layers must be an integer from 1 to 1000, not 100000000"),
    ("a thousand layers of a million parameters", {"text_config": {"num_hidden_layers": 1000,
                                                                   "intermediate_size": 10**6}},
     "GB of weights, more than this machine's"),
    ("encoder 3 million wide", {"vision_config": {"width": 3 * 10**6}},
     "GB of weights, more than this machine's"),
    ("images of 100000 pixels", {"preprocess_config": {"image_size": 100_000}}, "GB of weights"),
    ("vocabulary past 32 bits", {"text_config": {"vocab_size": 3 * 10**9}}, "GB of weights"),
    ("connector width past 32 bits", {"connector_config": {"hidden_dim": 3 * 10**9}},
     "GB of weights, more than this machine's"),
    ("3 billion attention heads", {"text_config": {"num_attention_heads": 3 * 10**9}},
     "cannot build a model of this config (Integer value 48000000000 is outside"),
    ("100 million attention heads", {"text_config": {"num_attention_heads": 10**8}},
     "GB of weights, more than this machine's"),
    ("heads that do not split the hidden size", {"text_config": {"head_dim": None,
                                                                 "num_attention_heads": 3}},
     "text_config.num_attention_heads must be a divisor of hidden_size (64), not 3"),
    ("key/value heads that do not divide the heads", {"text_config": {"num_key_value_heads": 3}},
     "text_config.num_key_value_heads must be a divisor of num_attention_heads"),
    ("a million RegNet blocks", {"connector_config": {"depth": 10**6}},
     "connector_config.depth must be an integer from 0 to 1000"),
    ("a million readout layers", {"connector_config": {"mlp_depth": 10**6}},
     "connector_config.mlp_depth must be an integer from 1 to 1000"),
    ("a million encoder layers", {"vision_config": {"layers": 10**6}},
     "vision_config.layers must be an integer from 1 to 1000"),
    ("more image tokens than patches", {"num_image_tokens": 10**8},
     "num_image_tokens must be at most the encoder's"),
    ("an image over the context", {"text_config": {"max_position_embeddings": 4}},
     "num_image_tokens must be fewer than text_config.max_position_embeddings (4), not 4"),
]  # fmt: skip

# (case, argv with {placeholders}, a substring of the error line)
CASES = [
    ("convert: connector width 0", [*CONVERT, "--out", "{out}", "--connector-hidden-dim", "0"],
     "--connector-hidden-dim"),
    ("convert: connector depth 0", [*CONVERT, "--out", "{out}", "--connector-depth", "0"],
     "--connector-depth"),
    ("convert: connector width past 32 bits", [*CONVERT, "--out", "{out}",
                                               "--connector-hidden-dim", "3000000000"],
     "--connector-hidden-dim"),
    ("convert: a million connector blocks", [*CONVERT, "--out", "{out}", "--connector-depth",
                                             "1000000"], "--connector-depth"),
    ("convert: connector type", [*CONVERT, "--out", "{out}", "--connector-type", "mlp"],
     "--connector-type"),
    ("convert: 0 image tokens", ["convert", "--vision", "{vision}", "--llm", "{llm}", "--out",
                                 "{out}", "--num-image-tokens", "0"], "--num-image-tokens"),
    ("convert: image tokens not a square", ["convert", "--vision", "{vision}", "--llm", "{llm}",
                                            "--out", "{out}", "--num-image-tokens", "5"], "square"),
    ("convert: more image tokens than patches", ["convert", "--vision", "{vision}", "--llm",
                                                 "{llm}", "--out", "{out}", "--num-image-tokens",
                                                 "400"], "more than the encoder's"),
    ("convert: vision config patch size as text", ["convert", "--vision", "{bad_vision}",
                                                   "--llm", "{llm}", "--out", "{out}"],
     "patch_size must be an integer >= 1, not '8'"),
    ("convert: LLM config negative layers", ["convert", "--vision", "{vision}", "--llm",
                                             "{bad_llm}", "--out", "{out}"],
     "num_hidden_layers must be an integer from 1 to 1000, not -1"),
    ("convert: image size 0", [*CONVERT, "--out", "{out}", "--image-size", "0"], "--image-size"),
    ("convert: image size 800000", [*CONVERT, "--out", "{out}", "--image-size", "800000"],
     "--image-size"),
    ("convert: image size off the patch grid", [*CONVERT, "--out", "{out}", "--image-size", "50"],
     "multiple of the encoder's patch size 8"),
    ("convert: image size below a patch", [*CONVERT, "--out", "{out}", "--image-size", "4"],
     "--image-size"),
    ("convert: dtype", [*CONVERT, "--out", "{out}", "--dtype", "float8"], "--dtype"),
    ("convert: vision heads 0", [*CONVERT, "--out", "{out}", "--vision-heads", "0"],
     "--vision-heads"),
    ("convert: vision act", [*CONVERT, "--out", "{out}", "--vision-act", "relu"], "--vision-act"),
    ("convert: feature layer past the encoder", [*CONVERT, "--out", "{out}", "--feature-layer",
                                                 "100"], "feature_layer 100 is outside"),
    ("convert: out under a file", [*CONVERT, "--out", "{file}/model"], "is a file, not a folder"),
    ("convert: out exists", [*CONVERT, "--out", "{full}"], "already exists"),
    ("init: negative seed", ["init", "{model}/config.json", "--tokenizer", "{model}", "--out",
                             "{out}", "--seed", "-1"], "--seed"),
    ("init: config nested 100k deep", ["init", "{deep_json}", "--tokenizer", "{model}", "--out",
                                       "{out}"], "nested too deeply"),
    *[(f"init: {name}", ["init", f"{{config_{index}}}", "--tokenizer", "{model}", "--out",
                          "{out}"], message)
      for index, (name, _, message) in enumerate(INIT_CONFIGS)],
    ("init: out under a file", ["init", "{model}/config.json", "--tokenizer", "{model}", "--out",
                                "{file}/model"], "is a file, not a folder"),
    ("quantize: bits", ["quantize", "{model}", "--out", "{out}", "--bits", "7"], "bits"),
    ("quantize: group size", ["quantize", "{model}", "--out", "{out}", "--group-size", "48"],
     "group size"),
    ("quantize: out under a file", ["quantize", "{model}", "--out", "{file}/q"], "is a file"),
    ("chat: max tokens -1", [*CHAT, "--max-tokens", "-1", "hi"], "--max-tokens"),
    ("chat: max tokens 0", [*CHAT, "--max-tokens", "0", "hi"], "--max-tokens"),
    ("chat: max tokens not a number", [*CHAT, "--max-tokens", "many", "hi"], "--max-tokens"),
    ("chat: negative temperature", [*CHAT, "--temp", "-0.5", "hi"], "--temp"),
    ("chat: nan temperature", [*CHAT, "--temp", "nan", "hi"], "--temp"),
    ("chat: infinite temperature", [*CHAT, "--temp", "inf", "hi"], "--temp"),
    ("chat: temperature under the floor", [*CHAT, "--temp", "1e-320", "hi"],
     "temperature must be 0 (greedy) or at least 0.0001, not 1e-320"),
    ("chat: temperature past the app's 2", [*CHAT, "--temp", "2.5", "hi"],
     "temperature must be at most 2, not 2.5"),
    ("chat: temperature 1e308", [*CHAT, "--temp", "1e308", "hi"],
     "temperature must be at most 2, not 1e+308"),
    ("chat: top-p 0", [*CHAT, "--top-p", "0", "hi"], "--top-p"),
    ("chat: top-p above 1", [*CHAT, "--top-p", "1.5", "hi"], "--top-p"),
    ("chat: negative top-k", [*CHAT, "--top-k", "-1", "hi"], "--top-k"),
    ("chat: repetition penalty 0", [*CHAT, "--repetition-penalty", "0", "hi"],
     "--repetition-penalty"),
    ("chat: nan repetition penalty", [*CHAT, "--repetition-penalty", "nan", "hi"],
     "--repetition-penalty"),
    ("chat: repetition penalty 1e300", [*CHAT, "--repetition-penalty", "1e300", "hi"],
     "repetition_penalty must be from 0.01 to 100 (1: off), not 1e+300"),
    ("chat: repetition penalty 1e-300", [*CHAT, "--repetition-penalty", "1e-300", "hi"],
     "repetition_penalty must be from 0.01 to 100 (1: off), not 1e-300"),
    ("chat: empty stop string", [*CHAT, "--stop", "", "hi"], "--stop"),
    ("chat: negative seed", [*CHAT, "--seed", "-1", "hi"], "--seed"),
    ("chat: seed past 64 bits", [*CHAT, "--seed", str(2**64), "hi"], "--seed"),
    ("chat: model without a tokenizer", ["chat", "--model", "{no_tokenizer}", "hi"],
     "no tokenizer files"),
    ("chat: model an empty name", ["chat", "--model", "", "hi"], "the model's name is empty"),
    ("eval: model an empty name", [*EVAL[:1], "--model", " ", *EVAL[3:]],
     "the model's name is empty"),
    ("chat: missing image", [*CHAT, "--image", "{tmp}/nope.png", "hi"], "no such image file"),
    ("chat: image that is text", [*CHAT, "--image", "{file}", "hi"], "not an image"),
    ("app: port past 65535", ["app", "--model", "{model}", "--port", "70000"], "--port"),
    ("app: port 0", ["app", "--model", "{model}", "--port", "0"], "--port"),
    ("app: host not an address", ["app", "--model", "{model}", "--host", "300.1.1.1"], "--host"),
    ("app: host of another machine", ["app", "--model", "{model}", "--host", "192.0.2.1"],
     "cannot listen on 192.0.2.1:8080"),
    ("eval: max tokens -1", [*EVAL, "--max-tokens", "-1"], "--max-tokens"),
    ("eval: limit 0", [*EVAL, "--limit", "0"], "--limit"),
    ("eval: json into a missing folder", [*EVAL, "--json", "{tmp}/nowhere/r.json"],
     "no such folder"),
    ("eval: json onto a folder", [*EVAL, "--json", "{tmp}"], "is a folder"),
    ("eval: json under a file", [*EVAL, "--json", "{file}/r.json"], "no such folder"),
    ("eval: image that is text", ["eval", "--model", "{model}", "--data", "{text_image_eval}"],
     "not an image"),
    ("synth: n 0", [*SYNTH, "--out", "{out}", "--n", "0"], "--n"),
    ("synth: negative n", [*SYNTH, "--out", "{out}", "--n", "-3"], "--n"),
    ("synth: negative eval per task", ["data", "synth", "--out", "{out}", "--n", "2",
                                       "--eval-per-task", "-1"], "--eval-per-task"),
    ("synth: negative seed", [*SYNTH, "--out", "{out}", "--n", "2", "--seed", "-1"], "--seed"),
    ("synth: out under a file", [*SYNTH, "--out", "{file}/data", "--n", "2"], "is a file"),
    ("synth: out in a folder that cannot hold files", [*SYNTH, "--out", "/proc/1/data", "--n",
                                                       "2"], "/proc/1 is not writable"),
    ("chat: annotate where no file can be made", [*CHAT, "--image", "{image}", "--annotate",
                                                  "/proc/1/answer.png", "hi"],
     "/proc/1 is not writable"),
    ("inspect: missing file without --format", ["data", "inspect", "{tmp}/none.jsonl"],
     "none.jsonl: no such data file"),
    ("chat: stop string not UTF-8", [*CHAT, "--stop", "\udcff", "hi"], "--stop"),
    ("synth: n past the cap", [*SYNTH, "--out", "{out}", "--n", "100000000000000"],
     "--n must be from 1 to 200,000 training images, not 100,000,000,000,000"),
    ("synth: n in exponent notation", [*SYNTH, "--out", "{out}", "--n", "1e14"], "--n"),
    ("synth: eval per task past the cap", ["data", "synth", "--out", "{out}", "--n", "2",
                                           "--eval-per-task", "10000000"],
     "--eval-per-task must be from 0 to 10,000"),
    ("tokenizer: out is a file", ["data", "tokenizer", "{jsonl}", "--out", "{file}"],
     "already exists"),
    ("tokenizer: vocabulary too small", ["data", "tokenizer", "{jsonl}", "--out", "{out}",
                                         "--vocab-size", "10"], "--vocab-size"),
    ("tokenizer: a line that is not JSON", ["data", "tokenizer", "{bad_jsonl}", "--out", "{out}"],
     "not JSON"),
    ("quantize: out holds the model", ["quantize", "{model}", "--out", "{parts}", "--force"],
     "holds the input"),
    ("quantize: out is the model", ["quantize", "{model}", "--out", "{model}", "--force"],
     "holds the input"),
    ("convert: out is an input", [*CONVERT, "--out", "{vision}", "--force"], "holds the input"),
    ("convert: out holds the inputs", [*CONVERT, "--out", "{parts}", "--force"],
     "holds the input"),
    ("init: out holds the config", ["init", "{model}/config.json", "--tokenizer", "{model}",
                                    "--out", "{parts}", "--force"], "holds the input"),
    ("unknown option", [*CHAT, "--temperature", "1", "hi"], "--temperature"),
    ("chat: annotate without an image", [*CHAT, "--annotate", "{tmp}/answer.png", "hi"],
     "--annotate"),
    ("chat: prompt over the context", [*CHAT, "one two three four " * 200],
     "this model's context holds"),
    ("init: tokenizer a file", ["init", "{model}/config.json", "--tokenizer", "{file}", "--out",
                                "{out}"], "not a folder"),
    ("chat: prompt not UTF-8", [*CHAT, "caf\udce9"], "the prompt is not valid text"),
    ("chat: system prompt not UTF-8", [*CHAT, "--system", "\udcff", "hi"], "system prompt"),
    ("chat: top-k past the vocabulary", [*CHAT, "--top-k", "1000000", "--temp", "1", "hi"],
     "--top-k"),
    ("eval: lone surrogate", ["eval", "--model", "{model}", "--data", "{surrogate}"],
     "surrogate.jsonl:1: a string is not valid text"),
    ("eval: byte not UTF-8", ["eval", "--model", "{model}", "--data", "{not_utf8}"],
     "not_utf8.jsonl:1: not UTF-8 text"),
    ("eval: nested 100k deep", ["eval", "--model", "{model}", "--data", "{deep_jsonl}"],
     "nested too deeply"),
    ("eval: image name too long", ["eval", "--model", "{model}", "--data", "{long_name}"],
     "File name too long"),
    ("tokenizer: lone surrogate", ["data", "tokenizer", "{surrogate}", "--out", "{out}"],
     "not valid text"),
    ("tokenizer: byte not UTF-8", ["data", "tokenizer", "{not_utf8}", "--out", "{out}"],
     "not UTF-8 text"),
    ("tokenizer: an image", ["data", "tokenizer", "{image}", "--out", "{out}"], "not UTF-8 text"),
    ("tokenizer: nested 100k deep", ["data", "tokenizer", "{deep_jsonl}", "--out", "{out}"],
     "nested too deeply"),
    ("tokenizer: empty file", ["data", "tokenizer", "{empty}", "--out", "{out}"],
     "no text to learn from"),
    ("tokenizer: vocabulary too large", ["data", "tokenizer", "{jsonl}", "--out", "{out}",
                                         "--vocab-size", "100000000000"], "at most 1,000,000"),
    ("train: recipe nested 50k deep", ["train", "{deep_toml}"], "nested too deeply"),
    ("train: a million ranks", ["train", "{recipe}", "--set", "data.batch_size=1000000",
                                "--ranks", "1000000", "--out", "{out}"], "--ranks"),
    ("train: more ranks than the batch", ["train", "{recipe}", "--ranks", "8", "--out", "{out}"],
     "a batch of 4 does not split evenly over 8 ranks"),
    ("eval: a later line's markers do not match its images", [*EVAL, "--data", "{markers}"],
     "markers.jsonl:2: the prompt has 2 <image> markers but 1 images"),
    ("eval: a later line over the context", ["eval", "--model", "{model}", "--data",
                                              "{long_prompt}"],
     "long_prompt.jsonl:2: the prompt is"),
]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    """Placeholders of CASES that stay the same for the module (the tiny model and its parts,
    data files); {out} and {tmp} are per test."""
    root = tmp_path_factory.mktemp("inputs")
    text = root / "notes.png"
    text.write_text("not an image")
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(root / "image.png")
    example = {"task": "t", "messages": [{"role": "user", "content": "Hi?"}], "answer": "a"}
    one_marker = [{"role": "user", "content": "<image>\nHi?"}]
    eval_line = {**example, "images": ["image.png"], "messages": one_marker}
    (root / "eval.jsonl").write_text(json.dumps(eval_line) + "\n")
    two_markers = [{"role": "user", "content": "<image>\n<image>\nHi?"}]
    write_lines(root / "markers.jsonl", [eval_line, {**eval_line, "messages": two_markers}])
    long_question = [{"role": "user", "content": "<image>\n" + "one two three four " * 200}]
    write_lines(root / "long_prompt.jsonl", [eval_line, {**eval_line, "messages": long_question}])
    (root / "text_image.jsonl").write_text(json.dumps({**example, "images": ["notes.png"]}) + "\n")
    (root / "data.jsonl").write_text(json.dumps({"text": "a red circle"}) + "\n")
    (root / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{oops\n")
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    for part, key, value in (("vision", "patch_size", "8"), ("llm", "num_hidden_layers", -1)):
        shutil.copytree(tiny_model_dir.parent / part, root / f"bad_{part}")
        config = json.loads((root / f"bad_{part}" / "config.json").read_text())
        (root / f"bad_{part}" / "config.json").write_text(json.dumps({**config, key: value}))
    (root / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (root / "deep.toml").write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")
    recipe = f'model = "{tiny_model_dir}"\nout = "run"\n[data]\nbatch_size = 4\n'
    (root / "recipe.toml").write_text(
        recipe + '[[data.sources]]\npath = "data.jsonl"\nformat = "text"\n'
    )
    (root / "empty.jsonl").write_text("")
    (root / "surrogate.jsonl").write_text(json.dumps({**example, "answer": "\ud800"}) + "\n")
    (root / "not_utf8.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    long_name = {**example, "images": ["a" * 5000 + ".png"]}
    (root / "long_name.jsonl").write_text(json.dumps(long_name) + "\n")
    config = json.loads((tiny_model_dir / "config.json").read_text())
    for index, (_, change, _) in enumerate(INIT_CONFIGS):
        (root / f"config_{index}.json").write_text(json.dumps(merged(config, change)))
    no_tokenizer = root / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, no_tokenizer / name)
    return {
        "model": tiny_model_dir,
        "full": tiny_model_dir,
        "vision": tiny_model_dir.parent / "vision",
        "parts": tiny_model_dir.parent,  # the folder of the model, vision and llm
        "llm": tiny_model_dir.parent / "llm",
        "file": text,
        "eval": root / "eval.jsonl",
        "text_image_eval": root / "text_image.jsonl",
        "jsonl": root / "data.jsonl",
        "bad_jsonl": root / "bad.jsonl",
        "no_tokenizer": no_tokenizer,
        "deep_json": root / "deep.json",
        "bad_vision": root / "bad_vision",  # patch_size "8"
        "bad_llm": root / "bad_llm",  # num_hidden_layers -1
        "deep_jsonl": root / "deep.jsonl",
        "deep_toml": root / "deep.toml",
        "recipe": root / "recipe.toml",  # a batch of 4 on the tiny model
        "empty": root / "empty.jsonl",
        "surrogate": root / "surrogate.jsonl",
        "not_utf8": root / "not_utf8.jsonl",
        "long_name": root / "long_name.jsonl",
        "image": root / "image.png",
        "markers": root / "markers.jsonl",
        "long_prompt": root / "long_prompt.jsonl",
        **{f"config_{index}": root / f"config_{index}.json" for index in range(len(INIT_CONFIGS))},
    }


def merged(values: dict, change: dict) -> dict:
    """`values` with `change`'s keys replaced, nested objects merged."""
    out = dict(values)
    for key, value in change.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def write_lines(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def snapshot(*folders) -> dict:
    """Every path under the folders with its size and modification time."""
    return {
        path: (path.stat().st_size, path.stat().st_mtime_ns)
        for folder in folders
        for path in [folder, *folder.rglob("*")]
    }


@pytest.mark.parametrize("case, argv, message", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_writes_nothing(inputs, tmp_path, case, argv, message):
    values = {**inputs, "out": tmp_path / "out", "tmp": tmp_path}
    args = [arg.format(**values) for arg in argv]
    watched = [tmp_path, inputs["file"].parent, inputs["model"].parent]
    before = snapshot(*watched)
    code, out, err = run_cli(*args)
    assert code != 0, (case, out, err)
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert snapshot(*watched) == before


def test_eval_checks_every_line_before_answering_any(inputs, monkeypatch):
    from mm1_mlx import evaluate

    answered = []
    monkeypatch.setattr(evaluate, "generate", lambda *args, **kwargs: answered.append(args))
    code, _, err = run_cli(*[a.format(**inputs) for a in EVAL], "--data", str(inputs["markers"]))
    assert code != 0 and "markers.jsonl:2" in err, err
    assert answered == []


def test_synth_without_room_on_disk_is_refused_first(tmp_path, monkeypatch):
    from mm1_mlx.train import synth

    monkeypatch.setattr(synth.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(0, 0, 0))
    code, _, err = run_cli(*SYNTH, "--out", str(tmp_path / "data"), "--n", "10")
    assert code != 0 and err.startswith("error: ") and "MB free" in err, err
    assert list(tmp_path.iterdir()) == []


def test_synth_failing_to_write_leaves_nothing_behind(tmp_path, monkeypatch):
    from mm1_mlx.train import synth

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synth, "write_jsonl", disk_full)
    code, _, err = run_cli(*SYNTH, "--out", str(tmp_path / "data"), "--n", "2")
    assert code != 0 and err.endswith("cannot be written (No space left on device)\n"), err
    assert list(tmp_path.iterdir()) == []


def test_init_without_room_for_the_weights_on_disk_is_refused_first(inputs, tmp_path, monkeypatch):
    from mm1_mlx import config_checks

    no_room = shutil._ntuple_diskusage(0, 0, 0)
    monkeypatch.setattr(config_checks.shutil, "disk_usage", lambda path: no_room)
    config, model = inputs["model"] / "config.json", inputs["model"]
    code, _, err = run_cli("init", str(config), "--tokenizer", str(model), "--out", f"{tmp_path}/m")
    assert code != 0 and err.startswith("error: ") and "GB free" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_write_failing_late_is_one_line(inputs, tmp_path, monkeypatch):
    """What no check can foresee (the disk fills as the report is written) is still one line."""
    from mm1_mlx import evaluate

    def disk_full(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(evaluate, "generate", lambda *args, **kwargs: "a")
    monkeypatch.setattr(loading, "write_text_atomic", disk_full)
    args = [a.format(**inputs) for a in EVAL]
    code, _, err = run_cli(*args, "--json", str(tmp_path / "r.json"))
    assert code == 1 and err == f"error: {tmp_path / 'r.json'}: No space left on device\n", err


def test_app_on_a_port_in_use_is_one_line_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli("app", "--model", str(tmp_path / "none"), "--port", str(port))
    assert code != 0
    assert err == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n", err


def test_sigterm_stops_a_command_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "synth"
    command = [sys.executable, "-m", "mm1_mlx", "data", "synth", "--n", "100000", "--out", str(out)]
    writing = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".synth.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.1)  # until it writes
    writing.send_signal(signal.SIGTERM)  # a scheduler's, or timeout's, stop
    _, err = writing.communicate(timeout=60)
    assert writing.returncode != 0 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_folder_leaves_nothing_behind(tmp_path):
    out = tmp_path / "made" / "for" / "model"
    with pytest.raises(RuntimeError), loading.atomic_folder(out) as tmp:
        (tmp / "half.safetensors").write_bytes(b"half")
        raise RuntimeError("failed while writing")
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    # Permissions do not stop root, who runs these tests in containers: os.access decides.
    monkeypatch.setattr(loading.os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="not writable"):
        loading.check_writable(tmp_path / "model")
    with pytest.raises(UserError, match="not writable"):
        loading.check_file_writable(tmp_path / "report.json")


def test_help_still_shows(tmp_path):
    code, out, _ = run_cli("chat", "--help")
    assert code == 0 and "--max-tokens" in out

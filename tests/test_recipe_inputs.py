# ruff: noqa: E501  (the table of cases: one line each)
"""Every recipe value is checked as the recipe is read: one line naming the key and what is
allowed, before any model is loaded or folder made; paths are relative to the recipe."""

import dataclasses
from pathlib import Path

import pytest
from helpers import run_cli

from mm1_mlx.errors import UserError
from mm1_mlx.train.recipe import _LISTS, _NESTED, RULES, Recipe, load_recipe

# The recipe each case changes: top-level keys, then the case's TOML, then one data source.
RECIPE = """model = "model"
out = "run"
{given}
[[data.sources]]
path = "data/a.jsonl"
format = "text"
"""


def toml(text: str) -> tuple[str, list[str]]:
    return text, []


def set_(*overrides: str) -> tuple[str, list[str]]:
    return "", list(overrides)


SOURCE = '[[data.sources]]\npath = "data/a.jsonl"\nformat = "text"\n'

CASES = [
    # (case, (TOML text, --set overrides), what the error says)
    ("lr a word", set_("optimizer.lr=fast"), "optimizer.lr must be a finite number in (0, 10] or 'mm1', not 'fast'"),
    ("lr nan", set_("optimizer.lr=nan"), "optimizer.lr must be a finite number in (0, 10] or 'mm1', not nan"),
    ("lr inf", toml("[optimizer]\nlr = inf"), "optimizer.lr must be a finite number in (0, 10]"),
    ("lr 0", set_("optimizer.lr=0"), "optimizer.lr must be a finite number in (0, 10]"),
    ("lr negative", set_("optimizer.lr=-1e-4"), "optimizer.lr must be"),
    ("lr huge", set_("optimizer.lr=1e300"), "optimizer.lr must be a finite number in (0, 10] or 'mm1', not 1e+300"),
    ("lr past 10", set_("optimizer.lr=10.5"), "optimizer.lr must be a finite number in (0, 10] or 'mm1', not 10.5"),
    ("lr a bool", set_("optimizer.lr=true"), "optimizer.lr must be a finite number in (0, 10] or 'mm1', not True"),
    ("weight decay negative", set_("optimizer.weight_decay=-0.1"), "optimizer.weight_decay must be a finite number >= 0 or 'mm1'"),
    ("weight decay nan", set_("optimizer.weight_decay=nan"), "optimizer.weight_decay must be"),
    ("weight decay huge", set_("optimizer.lr=1e-3", "optimizer.weight_decay=1e300"), "optimizer.weight_decay times the peak learning rate (0.001) must be below 1"),
    ("weight decay past a module's lr", set_("optimizer.lr=0.1", "optimizer.weight_decay=5", "modules.decoder.lr_multiplier=3"), "must be below 1 (each step multiplies decayed weights by 1 - lr x weight_decay), not 1.5"),
    ("betas one number", set_("optimizer.betas=[0.9]"), "optimizer.betas must be a list of 2 numbers, each a finite number in [0, 1)"),
    ("betas of 1", set_("optimizer.betas=[0.9, 1.0]"), "optimizer.betas must be a list of 2 numbers"),
    ("betas a word", set_("optimizer.betas=fast"), "optimizer.betas must be a list of 2 numbers"),
    ("warm-up past the steps", set_("train.steps=10", "optimizer.warmup_steps=20"), "optimizer.warmup_steps must be within 0..10 (train.steps), not 20"),
    ("warm-up negative", set_("optimizer.warmup_steps=-1"), "optimizer.warmup_steps must be an integer >= 0"),
    ("min_lr_ratio over 1", set_("optimizer.min_lr_ratio=1.5"), "optimizer.min_lr_ratio must be a finite number in [0, 1], not 1.5"),
    ("decay unknown", set_("optimizer.decay=step"), "optimizer.decay must be one of cosine, linear, constant, not 'step'"),
    ("optimizer unknown", set_("optimizer.name=sgd"), "optimizer.name must be one of adamw, adafactor"),
    ("steps 0", set_("train.steps=0"), "train.steps must be an integer from 1 to 9999999, not 0"),
    ("steps a word", set_("train.steps=ten"), "train.steps must be an integer from 1 to 9999999, not 'ten'"),
    ("steps a fraction", set_("train.steps=2.5"), "train.steps must be an integer from 1 to 9999999, not 2.5"),
    ("steps a bool", toml("[train]\nsteps = true"), "train.steps must be an integer from 1 to 9999999, not True"),
    ("steps past the checkpoints' 7 digits", set_("train.steps=10000000"), "train.steps must be an integer from 1 to 9999999, not 10000000"),
    ("steps past 64 bits", set_("train.steps=1" + "0" * 30), "train.steps must be an integer from 1 to 9999999"),
    ("grad accumulation 0", set_("train.grad_accumulation=0"), "train.grad_accumulation must be an integer >= 1"),
    ("grad clip negative", set_("train.grad_clip=-1"), "train.grad_clip must be a finite number in [0, 1000]"),
    ("grad clip inf", set_("train.grad_clip=inf"), "train.grad_clip must be a finite number in [0, 1000]"),
    ("grad clip huge", set_("train.grad_clip=1e300"), "train.grad_clip must be a finite number in [0, 1000], not 1e+300"),
    ("z-loss negative", set_("train.z_loss=-0.1"), "train.z_loss must be a finite number in [0, 1]"),
    ("z-loss nan", set_("train.z_loss=nan"), "train.z_loss must be a finite number in [0, 1]"),
    ("z-loss huge", set_("train.z_loss=1e300"), "train.z_loss must be a finite number in [0, 1], not 1e+300"),
    ("box smoothing negative", set_("train.box_smoothing=-1"), "train.box_smoothing must be a finite number in [0, 1000]"),
    ("box smoothing past the grid", set_("train.box_smoothing=1e300"), "train.box_smoothing must be a finite number in [0, 1000], not 1e+300"),
    ("image token shuffle past 1", set_("train.image_token_shuffle=1.5"), "train.image_token_shuffle must be a finite number in [0, 1], not 1.5"),
    ("image token shuffle not a number", set_("train.image_token_shuffle=nan"), "train.image_token_shuffle must be a finite number in [0, 1]"),
    ("box attention negative", set_("train.box_attention=-1"), "train.box_attention must be a finite number in [0, 100], not -1"),
    ("box attention nan", set_("train.box_attention=nan"), "train.box_attention must be a finite number in [0, 100]"),
    ("box attention head one number", set_("train.box_attention_head=[3]"), "train.box_attention_head must be a list of 2 integers >= 0, [layer, head], not [3]"),
    ("box attention head negative", set_("train.box_attention_head=[-1, 0]"), "train.box_attention_head must be a list of 2 integers >= 0"),
    ("box attention head fractions", set_("train.box_attention_head=[1.5, 0]"), "train.box_attention_head must be a list of 2 integers >= 0"),
    ("box attention head a word", set_("train.box_attention_head=first"), "train.box_attention_head must be a list of 2 integers >= 0, [layer, head], not 'first'"),
    ("checkpointing a word", set_("train.gradient_checkpointing=no"), "train.gradient_checkpointing must be true or false, not 'no'"),
    ("batch 0", set_("data.batch_size=0"), "data.batch_size must be an integer >= 1"),
    ("seq_len 1", set_("data.seq_len=1"), "data.seq_len must be an integer from 2 to 1048576, not 1"),
    ("seq_len past any context", set_("data.seq_len=1048577"), "data.seq_len must be an integer from 2 to 1048576, not 1048577"),
    ("images negative", set_("data.max_images_per_sequence=-1"), "data.max_images_per_sequence must be an integer >= 0"),
    ("images past the sequence", set_("data.seq_len=64", "data.max_images_per_sequence=1000000000"), "data.max_images_per_sequence must be within 0..64 (data.seq_len: each image takes at least one position), not 1,000,000,000"),
    ("loss weighting unknown", set_("data.loss_weighting=sample"), "data.loss_weighting must be one of token, example, turn"),
    ("split images a word", set_("data.split_images=yes"), "data.split_images must be true or false, not 'yes'"),
    ("strict a number", set_("data.strict=1"), "data.strict must be true or false, not 1"),
    ("checkpoint every 0", set_("checkpoint.every=0"), "checkpoint.every must be an integer >= 1"),
    ("keep -1", set_("checkpoint.keep=-1"), "checkpoint.keep must be an integer >= 1, not -1"),
    ("keep 0", set_("checkpoint.keep=0"), "checkpoint.keep must be an integer >= 1, not 0"),
    ("log every 0", set_("log.every=0"), "log.every must be an integer >= 1"),
    ("eval every negative", set_("log.eval_every=-1"), "log.eval_every must be an integer >= 0"),
    ("eval batches 0", set_("log.eval_batches=0"), "log.eval_batches must be an integer >= 1"),
    ("lora rank 0", set_("lora.rank=0"), "lora.rank must be an integer >= 1"),
    ("lora scale nan", set_("lora.scale=nan"), "lora.scale must be a finite number in (0, 1000], not nan"),
    ("lora scale huge negative", set_("lora.scale=-1e300"), "lora.scale must be a finite number in (0, 1000], not -1e+300"),
    ("lora scale 0", set_("lora.scale=0"), "lora.scale must be a finite number in (0, 1000], not 0"),
    ("lora dropout 1", set_("lora.dropout=1.0"), "lora.dropout must be a finite number in [0, 1), not 1.0"),
    ("lora layers 0", set_("lora.num_layers=0"), "lora.num_layers must be an integer >= 1 (leave it out for all layers)"),
    ("lora bits 7", set_("lora.quantize_bits=7"), "lora.quantize_bits must be one of 2, 3, 4, 5, 6, 8, not 7"),
    ("lora bits a string", set_("lora.quantize_bits='4'"), "lora.quantize_bits must be one of 2, 3, 4, 5, 6, 8, not '4'"),
    ("lora group size", set_("lora.group_size=48"), "lora.group_size must be one of 32, 64, 128"),
    ("trainable 'no'", set_("modules.vision.trainable=no"), "modules.vision.trainable must be true or false, not 'no'"),
    ("trainable 1", toml("[modules.vision]\ntrainable = 1"), "modules.vision.trainable must be true or false, not 1"),
    ("lr multiplier negative", set_("modules.connector.lr_multiplier=-2"), "modules.connector.lr_multiplier must be a finite number in [0, 1000]"),
    ("lr multiplier inf", set_("modules.connector.lr_multiplier=inf"), "modules.connector.lr_multiplier must be a finite number in [0, 1000]"),
    ("lr multiplier huge", set_("modules.connector.lr_multiplier=1e300"), "modules.connector.lr_multiplier must be a finite number in [0, 1000], not 1e+300"),
    ("module unknown", set_("modules.eyes.trainable=false"), "modules.eyes: unknown module (modules are vision, connector, decoder)"),
    ("modules not a table", set_("modules=3"), "modules must be a table"),
    ("module not a table", set_("modules.vision=3"), "modules.vision must be a table"),
    ("data not a table", set_("data=3"), "data must be a table ([data]), not 3"),
    ("sources not a list", set_("data.sources=3"), "data.sources must be a list of tables ([[data.sources]])"),
    ("no sources", set_("data.sources=[]"), "data.sources: the recipe has no data sources"),
    ("validation without data", set_("log.eval_every=10"), "log.eval_every is 10 but the recipe has no validation data"),
    ("source weight 0", toml(SOURCE + "weight = 0"), "data.sources[0].weight must be a finite number > 0, not 0"),
    ("source weight nan", toml(SOURCE + "weight = nan"), "data.sources[0].weight must be a finite number > 0, not nan"),
    ("source weight a word", toml(SOURCE + "weight = 'heavy'"), "data.sources[0].weight must be a finite number > 0"),
    ("source weights past float", toml(SOURCE + "weight = 1e308\n" + SOURCE + "weight = 1e308"), "data.sources: the weights add up to inf"),
    ("source format unknown", toml('[[data.sources]]\npath = "data/a.jsonl"\nformat = "video"'), "data.sources[0].format must be one of caption, interleaved, text, chat, not 'video'"),
    ("source without format", toml('[[data.sources]]\npath = "data/a.jsonl"'), "data.sources[0].format: missing"),
    ("source missing file", toml('[[data.sources]]\npath = "data/none.jsonl"\nformat = "text"'), "data/none.jsonl: no such data file"),
    ("validation missing file", toml('[[data.validation]]\npath = "none.jsonl"\nformat = "chat"'), "data.validation[0].path: "),
    ("seed negative", set_("seed=-1"), "seed must be an integer from 0 to 18446744073709551615, not -1"),
    ("seed a fraction", toml("seed = 1.5"), "seed must be an integer from 0 to 18446744073709551615"),
    ("seed over 64 bits", set_("seed=18446744073709551616"), "seed must be an integer from 0 to"),
    ("model a number", set_("model=3"), "model must be a non-empty string, not 3"),
    ("model missing folder", set_("model=nowhere"), "/nowhere: no such model folder"),
    ("out a file", set_("out=data/a.jsonl"), "is a file, not a folder"),
    ("unknown key", set_("train.stepz=3"), "train: unknown key 'stepz' (known: steps, "),
    ("unknown top-level key", set_("seeds=1"), "recipe.toml: unknown key 'seeds' (known: model, out, seed, "),
    ("set below a string", set_("model.x=3"), "--set 'model.x=3': model is not a table"),
    ("set without a key", set_("=3"), "expected KEY=VALUE"),
    ("set an entry past the list", set_("data.sources[1].weight=2"), "--set 'data.sources[1].weight=2': data.sources has no entry [1] (1 in the recipe; entries are added in the recipe file)"),
    ("set an entry of a missing list", set_("data.validation[0].format=text"), "data.validation has no entry [0] (0 in the recipe"),
    ("set an entry of a table", set_("train[0].steps=3"), "train has no entry [0]"),
    ("set an entry of a value", set_("seed[0]=3"), "seed has no entry [0]"),
    ("set an entry by name", set_("data.sources[a].weight=2"), "'sources[a]': a list's entry is named as name[index], e.g. data.sources[0].weight=2"),
    ("set an entry from the end", set_("data.sources[-1].weight=2"), "a list's entry is named as name[index]"),
    ("set an entry's bad value", set_("data.sources[0].weight=0"), "data.sources[0].weight must be a finite number > 0, not 0"),
    ("set an entry's unknown key", set_("data.sources[0].wieght=2"), "data.sources[0]: unknown key 'wieght'"),
    ("set below an entry's string", set_("data.sources[0].format.x=2"), "data.sources[0].format is not a table"),
]  # fmt: skip


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A recipe's folder: a model folder and data files beside it (nothing needs to load)."""
    folder = tmp_path / "project"
    (folder / "model").mkdir(parents=True)
    (folder / "data").mkdir()
    (folder / "data" / "a.jsonl").write_text("")
    return folder


def write_recipe(folder: Path, given: str = "") -> Path:
    path = folder / "recipe.toml"
    path.write_text(RECIPE.format(given=given))
    return path


@pytest.mark.parametrize("case, given, message", CASES, ids=[case[0] for case in CASES])
def test_bad_values_are_one_line_errors_naming_the_key(project, case, given, message):
    text, overrides = given
    with pytest.raises(UserError) as error:
        load_recipe(write_recipe(project, text), overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_good_values_load_as_their_types(project):
    recipe = load_recipe(
        write_recipe(project, "[optimizer]\nlr = 1\nbetas = [0, 0.5]\nweight_decay = 'mm1'"),
        ["modules.vision.trainable=false", "lora.quantize_bits=4", "train.grad_clip=0"],
    )
    assert recipe.optimizer.lr == 1.0 and isinstance(recipe.optimizer.lr, float)
    assert recipe.optimizer.betas == (0.0, 0.5) and recipe.optimizer.weight_decay == "mm1"
    assert recipe.modules["vision"].trainable is False and recipe.lora.quantize_bits == 4


def test_set_reaches_an_entry_of_a_list(project):
    (project / "data" / "b.jsonl").write_text("")
    text = SOURCE.replace("a.jsonl", "b.jsonl")
    recipe = load_recipe(write_recipe(project, text), ["data.sources[1].weight=2.5"])
    assert [source.weight for source in recipe.data.sources] == [1.0, 2.5]


def test_every_value_has_a_rule():
    """A new recipe field must say what it allows."""
    classes, unruled = [Recipe], []
    while classes:
        cls = classes.pop()
        for f in dataclasses.fields(cls):
            nested = _NESTED.get((cls, f.name)) or _LISTS.get((cls, f.name))
            if nested:
                classes.append(nested)
            elif (cls, f.name) not in RULES and (cls, f.name) != (Recipe, "modules"):
                unruled.append(f"{cls.__name__}.{f.name}")
    assert not unruled


@pytest.mark.parametrize(
    "given, overrides, message",
    [
        ("[checkpoint]\nkeep = -1", [], "checkpoint.keep must be an integer >= 1"),
        ("", ["--set", "modules.vision.trainable=no"], "modules.vision.trainable must be true"),
    ],
)
def test_cli_refuses_before_making_the_output_folder(project, given, overrides, message):
    code, out, err = run_cli("train", str(write_recipe(project, given)), *overrides)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and not out
    assert not (project / "run").exists()


def test_paths_are_relative_to_the_recipe_not_the_working_directory(project, monkeypatch):
    (project / "data" / "b.jsonl").write_text("")
    write_recipe(project, '[[data.validation]]\npath = "data/b.jsonl"\nformat = "text"')
    elsewhere = project.parent / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "data" / "a.jsonl").write_text("")  # a decoy beside the working directory
    monkeypatch.chdir(elsewhere)
    by_relative_path = load_recipe(Path("../project/recipe.toml"))
    by_absolute_path = load_recipe(project / "recipe.toml")
    assert by_relative_path == by_absolute_path  # the same data, model and run to resume
    assert by_relative_path.model == str(project.resolve() / "model")
    assert by_relative_path.out == str(project.resolve() / "run")
    sources = [*by_relative_path.data.sources, *by_relative_path.data.validation]
    assert [s.path for s in sources] == [
        str(project.resolve() / "data" / f"{n}.jsonl") for n in "ab"
    ]
    assert load_recipe(Path("../project/recipe.toml"), out=Path("r")).out == str(
        elsewhere.resolve() / "r"
    )  # --out is a command-line path: relative to the working directory
    hub = load_recipe(Path("../project/recipe.toml"), ["model='owner/name'"])
    assert hub.model == "owner/name"  # no such folder, but a hub repo id

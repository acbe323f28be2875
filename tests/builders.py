"""Tiny, randomly initialised HF checkpoints on disk, built offline for the tests."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CORPUS = [
    "a red circle on the left and a blue square on the right",
    "what color is the triangle? green. how many objects are there? three",
    "the Send button is at [120, 300, 480, 360] on the Settings screen",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


TOKENIZER_SIZE = 320


def make_tokenizer(folder: Path, vocab_size: int = TOKENIZER_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences, saved with a chat template."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return tokenizer


LLM_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def make_llm(
    folder: Path, arch: str = "llama", vocab_size: int = 320, **overrides
) -> torch.nn.Module:
    """A tiny HF causal LM (llama or qwen2) with its tokenizer, saved as safetensors.

    `vocab_size` is the embedding table's; the tokenizer always has TOKENIZER_SIZE tokens.
    """
    torch.manual_seed(0)
    sizes = {**LLM_SIZES, "vocab_size": vocab_size, "rope_theta": 5000.0, **overrides}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**sizes))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**sizes))
    else:
        raise ValueError(arch)
    _randomize_norms(model)
    model.eval()
    model.save_pretrained(str(folder))
    make_tokenizer(folder)
    return model


def make_clip_vision(folder: Path, **overrides) -> CLIPVisionModel:
    """A tiny HF CLIPVisionModel (transformers 5 saves it without the vision_model. prefix)."""
    torch.manual_seed(1)
    sizes = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=48,
        patch_size=8,
        hidden_act="quick_gelu",
    )
    model = CLIPVisionModel(CLIPVisionConfig(**{**sizes, **overrides}))
    _randomize_norms(model)
    model.eval()
    model.save_pretrained(str(folder))
    return model


def _randomize_norms(model: torch.nn.Module) -> None:
    """Random norm weights and biases, so a mapping mistake in them cannot hide."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                param.copy_(
                    1.0 + 0.2 * torch.randn_like(param)
                    if name.endswith("weight")
                    else 0.1 * torch.randn_like(param)
                )


COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}


def make_dataset(folder: Path, n: int = 12) -> None:
    """Caption, interleaved, text and chat JSONL files with small coloured-square PNGs."""
    import json

    from PIL import Image, ImageDraw

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = {"captions": [], "interleaved": [], "text": [], "chat": []}
    names = list(COLORS)
    for i in range(n):
        color = names[i % len(names)]
        image = Image.new("RGB", (48, 48), "white")
        ImageDraw.Draw(image).rectangle([8 + i % 5, 10, 30 + i % 5, 32], fill=COLORS[color])
        path = f"images/{i}.png"
        image.save(folder / path)
        rows["captions"].append({"image": path, "text": f"a {color} square"})
        rows["interleaved"].append(
            {"content": [{"text": "look:"}, {"image": path}, {"text": f"it is {color}."}]}
        )
        rows["text"].append({"text": f"the {color} square is on the left"})
        rows["chat"].append(
            {
                "images": [path],
                "messages": [
                    {"role": "user", "content": "<image>\nWhat color is the square?"},
                    {"role": "assistant", "content": color},
                ],
            }
        )
    for name, records in rows.items():
        lines = "".join(json.dumps(r) + "\n" for r in records)
        (folder / f"{name}.jsonl").write_text(lines)


def retokenized_copy(
    model_dir: Path, out: Path, chat_template: str | None, adds_bos: bool = False
) -> Path:
    """A copy of a model folder whose tokenizer has `chat_template` (None: no template, the
    processor's fallback format) and, with `adds_bos`, prepends <s> as Llama's does."""
    import json
    import shutil

    from tokenizers.processors import TemplateProcessing

    shutil.copytree(model_dir, out)
    for name in ("chat_template.jinja", "chat_template.json"):
        (out / name).unlink(missing_ok=True)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    if chat_template is not None:
        config["chat_template"] = chat_template
    config_path.write_text(json.dumps(config))
    if adds_bos:
        tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bos)]
        )
        tokenizer.save(str(out / "tokenizer.json"))
    return out

"""Train a small byte-level BPE tokenizer on JSONL data, for models trained from scratch.

Every integer 0..1000 (with and without a leading space) is one token, so a box
`[x1, y1, x2, y2]` in MM1.5's 0-1000 coordinates is one token per coordinate: the model learns 1001
coordinate values instead of digit sequences. Byte-level fallback keeps any text encodable.
"""

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mm1_mlx.errors import UserError
from mm1_mlx.jsonl import BadLine, parse_object
from mm1_mlx.loading import atomic_folder, check_writable

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
# How the chat template starts each turn: trained on, so a turn's prefix costs two or three tokens.
TURN_PREFIXES = {"user": "User: ", "assistant": "Assistant: "}
# User/Assistant turns; each assistant turn ends with </s>, which generation stops at.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + TURN_PREFIXES["user"] + "{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}" + TURN_PREFIXES["assistant"] + "{{ m['content'] }}</s>\n"
    "{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + TURN_PREFIXES["assistant"].rstrip() + "{% endif %}"
)
NUMBERS = [str(n) for n in range(1001)]
# Every byte, the special tokens, and each number alone and after a space as one token (the
# ten digits are bytes already): no smaller vocabulary can hold them all.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 2 * len(NUMBERS) - 10
MAX_VOCAB_SIZE = 1_000_000  # far past any real BPE vocabulary (the trainer aborts on huge ones)


def number_token_ids(tokenizer) -> tuple[list[int], list[int]] | None:
    """The token ids of 0..1000 alone and after a space (a box's first coordinate follows "[",
    the others a space), or None unless each of them is one token."""
    plain = [tokenizer.encode(text, add_special_tokens=False) for text in NUMBERS]
    spaced = [tokenizer.encode(" " + text, add_special_tokens=False) for text in NUMBERS]
    if any(len(ids) != 1 for ids in plain + spaced):
        return None
    return [ids[0] for ids in plain], [ids[0] for ids in spaced]


def texts_of(record: dict) -> Iterator[str]:
    """Every text in a JSONL record of any of the four data formats (not image paths); chat
    messages as the chat template writes them."""
    if isinstance(record.get("role"), str) and isinstance(record.get("content"), str):
        yield TURN_PREFIXES.get(record["role"], "") + record["content"]
        return
    for key, value in record.items():
        if key in ("image", "images"):
            continue
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    yield from texts_of(item)


def corpus(files: list[Path]) -> Iterator[str]:
    texts = 0
    for file in files:
        with open(file, "rb") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    for text in texts_of(read_record(line, f"{file}:{number}")):
                        texts += 1
                        yield text
    if texts == 0:
        raise UserError(f"no text to learn from in {', '.join(map(str, files))}")
    # Numbers alone and after a space (how they follow "[" and ", " in boxes).
    for _ in range(2):
        yield " ".join(NUMBERS) + " " + ",".join(NUMBERS)


def read_record(line: bytes | str, origin: str) -> dict:
    try:
        return parse_object(line)
    except BadLine as error:
        raise UserError(f"{origin}: {error}") from None


def check_inputs(files: list[Path], out: Path, vocab_size: int, overwrite: bool) -> None:
    """Everything that can be refused before training."""
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise UserError(f"{missing[0]}: no such file")
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"--vocab-size {vocab_size} is too small: at least {MIN_VOCAB_SIZE} "
            "(every byte, the special tokens, and 0..1000 as single tokens)"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(f"--vocab-size {vocab_size} is too large: at most {MAX_VOCAB_SIZE:,}")
    check_writable(out, overwrite)


def train_tokenizer(
    files: list[Path], out: Path, vocab_size: int = 4096, overwrite: bool = False
) -> PreTrainedTokenizerFast:
    """Train, check that every number is one token, and save to `out` with a chat template
    (a new folder, or an empty one; with `overwrite`, replacing what is there)."""
    check_inputs(files, out, vocab_size, overwrite)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus([Path(f) for f in files]), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    split = [
        n for n in NUMBERS if len(tokenizer.encode(" " + n)) != 1 or len(tokenizer.encode(n)) != 1
    ]
    if split:
        raise UserError(f"--vocab-size {vocab_size} is too small: '{split[0]}' is not one token")
    tokenizer.chat_template = CHAT_TEMPLATE
    with atomic_folder(Path(out), overwrite) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return tokenizer

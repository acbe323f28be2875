"""One line of a JSONL file -> a JSON object, or BadLine saying in one line why not.

Every reader of JSONL (training data, eval sets, tokenizer corpora, scenes) decodes its lines
here, so bytes that are not UTF-8, lone surrogates ("\\ud800"), nesting too deep for the parser
and lines that are not objects are refused the same way everywhere.
"""

import json
from typing import Any


class BadLine(ValueError):
    """Why a line is not a usable JSON object (one line, without the file and line number)."""


def check_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode text; a lone surrogate (from "\\udc80" in JSON, or a byte
    that is not UTF-8 in a command-line argument) raises BadLine naming `what`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start : error.start + 1]
        raise BadLine(
            f"{what} is not valid text ({ascii(bad)} at character {error.start}: "
            "a byte that is not UTF-8 or a lone surrogate)"
        ) from None
    return text


def parse_object(line: bytes | str) -> dict[str, Any]:
    """The JSON object of one JSONL line (bytes are decoded as UTF-8)."""
    if isinstance(line, (bytes, bytearray)):
        try:
            line = bytes(line).decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadLine(f"not UTF-8 text (byte {error.start}: {error.reason})") from None
    try:
        record = json.loads(line)
    except RecursionError:
        raise BadLine("not JSON (nested too deeply)") from None
    except ValueError as error:
        raise BadLine(f"not JSON ({error})") from None
    if not isinstance(record, dict):
        raise BadLine("not a JSON object")
    check_strings(record)
    return record


def check_strings(value: Any) -> None:
    """Every key and string inside `value` is valid text (walked without recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            check_text(item, "a string")
        elif isinstance(item, dict):
            stack += item.keys()
            stack += item.values()
        elif isinstance(item, list):
            stack += item

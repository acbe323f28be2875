"""What a value read from a file may be (a training recipe, a model's config.json): a Rule
tests it and says what is allowed, for a one-line error naming the key."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """What a value must be; `allowed` says it in the error message."""

    allowed: str
    test: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda value: value


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # true is no 1


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int, high: int | None = None) -> Rule:
    if high is None:
        return Rule(f"an integer >= {low}", lambda value: is_integer(value) and value >= low)
    return Rule(
        f"an integer from {low} to {high}", lambda value: is_integer(value) and low <= value <= high
    )


def number(
    low: float = -math.inf, high: float = math.inf, open_low: bool = False, open_high: bool = False
) -> Rule:
    """A finite number between `low` and `high` (excluded where open), as a float."""

    def test(value: Any) -> bool:
        if not is_number(value):
            return False
        above = low < value if open_low else low <= value
        return above and (value < high if open_high else value <= high)

    if high < math.inf:
        bounds = f" in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    elif low > -math.inf:
        bounds = f" {'>' if open_low else '>='} {low:g}"
    else:
        bounds = ""
    return Rule(f"a finite number{bounds}", test, float)


def choice(options: tuple) -> Rule:
    # The type must match too: true is not 1, and "4" is not 4.
    return Rule(
        f"one of {', '.join(map(str, options))}",
        lambda value: type(value) is type(options[0]) and value in options,
    )


def optional(rule: Rule) -> Rule:
    """The rule's values, or null (JSON's null, Python's None)."""
    return Rule(f"{rule.allowed} or null", lambda value: value is None or rule.test(value))


def list_of(length: int, rule: Rule) -> Rule:
    """A list of `length` values, each following `rule`."""
    return Rule(
        f"a list of {length} values, each {rule.allowed}",
        lambda value: (
            isinstance(value, list | tuple) and len(value) == length and all(map(rule.test, value))
        ),
    )


FLAG = Rule("true or false", lambda value: isinstance(value, bool))
TEXT = Rule("a non-empty string", lambda value: isinstance(value, str) and bool(value))

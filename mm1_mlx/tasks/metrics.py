"""The benchmarks' metrics, each a per-example score from 0 to 1 as its reference implementation
computes it (sources named in each section). Where a reference has a quirk that changes scores,
the quirk is kept and said: a score is only comparable with published numbers if it is computed
the same way.
"""

import math
import random
import re
from collections.abc import Callable, Sequence

from mm1_mlx.boxes import ParsedBox, Size, parse_boxes, parse_points
from mm1_mlx.evaluate import iou

# -- VQA accuracy (VQAv2, TextVQA) ----------------------------------------------------------
# The answer normalisation of the official VQA evaluation (GT-Vision-Lab/VQA,
# vqaEvaluation/vqaEval.py), which EvalAI runs and lmms-eval's
# _task_utils/vqa_eval_metric.py (EvalAIAnswerProcessor) follows.

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<"]
_PUNCTUATION += ["@", "`", ",", "?", "!"]
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")  # "1,000": then punctuation goes, not spaced
# The original reads "(?!<=\d)(\.)(?!\d)": its first group is a no-op lookahead (a typo for a
# lookbehind), so a period goes unless a digit follows ("2.5" stays, "a.m." loses both).
_PERIOD = re.compile(r"\.(?!\d)")
# ...and it passes re.UNICODE (32) where `count` goes: at most 32 periods are removed.
_PERIOD_COUNT = re.UNICODE.value
_NUMBERS = {"none": "0", "zero": "0"}
_NUMBERS |= {
    w: str(i) for i, w in enumerate("one two three four five six seven eight nine ten".split(), 1)
}
_ARTICLES = {"a", "an", "the"}
# The contractions the official table restores, each written once: its keys are the form with
# one apostrophe left out (both or all three ways for "couldn't've" and the like). Its
# capitalised entries ("Im", "Id've") are left out: words are lower-cased before the lookup.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock 'ow's'at shan't she'd've
should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've
someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's
who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've
you'd you'd've you'll you're you've
""".split()
_CONTRACTIONS = {
    word[:i] + word[i + 1 :]: word for word in _CONTRACTED for i, c in enumerate(word) if c == "'"
}
_CONTRACTIONS["somebody'd"] = "somebodyd"  # the table's one entry the wrong way round


def _punctuation(text: str) -> str:
    """A mark next to a space (or any mark in text with a digit-comma-digit) is removed,
    otherwise it becomes a space; then periods not before a digit go."""
    remove_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        spaced = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if spaced or remove_all else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _digits_articles(text: str) -> str:
    """Lower-cased words, number words as digits, articles dropped, contractions restored."""
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_normalize(answer: str) -> str:
    """VQAv2's normalisation of answers and predictions (lmms-eval vqav2/utils.py: newlines and
    tabs to spaces, trimmed, then punctuation, digits and articles)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def evalai_normalize(answer: str) -> str:
    """TextVQA's: EvalAI's whole answer processor (lmms-eval textvqa/utils.py), which first
    lower-cases, drops commas and question marks and splits "'s" off its word."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return vqa_normalize(text)


def vqa_accuracy(prediction: str, answers: Sequence[str], normalize: Callable[[str], str]) -> float:
    """VQA accuracy: min(1, matches / 3) against each leave-one-out subset of the human
    answers (nine of ten), averaged over the subsets."""
    predicted = normalize(prediction)
    truths = [normalize(answer) for answer in answers]
    matches = sum(truth == predicted for truth in truths)
    # Leaving out answer i removes one match exactly when answer i matches.
    return sum(min(1.0, (matches - (t == predicted)) / 3) for t in truths) / len(truths)


# -- ANLS (DocVQA) --------------------------------------------------------------------------
# Average Normalized Levenshtein Similarity (Biten et al., "Scene Text Visual Question
# Answering", ICCV 2019, ST-VQA; DocVQA, Mathew et al., WACV 2021), as the DocVQA challenge's
# evaluation script computes it and lmms-eval's api/metrics.py `anls` copies it.


def levenshtein(a: str, b: str) -> int:
    """The edit distance: insertions, deletions and substitutions of one character."""
    if len(a) > len(b):
        a, b = b, a
    row = list(range(len(a) + 1))
    for j, char_b in enumerate(b, 1):
        diagonal, row[0] = row[0], j
        for i, char_a in enumerate(a, 1):
            substitute = diagonal + (char_a != char_b)
            diagonal, row[i] = row[i], min(row[i] + 1, row[i - 1] + 1, substitute)
    return row[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """1 - the smallest normalised distance to an answer, or 0 below `threshold`. Both sides
    are trimmed, lower-cased and their spaces collapsed for the distance, but the script
    normalises by the longer of the raw strings. A similarity of exactly 0.5 counts (the paper
    writes the cut as distance < 0.5; the script keeps 1 - distance >= 0.5)."""
    predicted = " ".join(prediction.strip().lower().split())
    best = 0.0
    for answer in answers:
        truth = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        distance = levenshtein(truth, predicted) / length if length else 0.0
        best = max(best, 1 - distance)
    return best if best >= threshold else 0.0


# -- multiple choice (MMMU, ScienceQA) ------------------------------------------------------


def letters(count: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(count)]


def mmmu_choice(response: str, options: Sequence[str], seed: str) -> str:
    """The option letter a free-form answer picks, by MMMU's parse_multi_choice_response
    (MMMU-Benchmark/MMMU eval/eval_utils.py; lmms-eval _task_utils/mmmu_mcq_utils.py): "(B)",
    then "B " or "B.", then (in answers of more than five words) an option's text; of several
    candidates the one mentioned last. With none it guesses at random, as the reference does;
    the guess is seeded with `seed` (the question id) so a score can be reproduced."""
    choices = letters(len(options))
    for char in ",.!?;:'":  # one after the other, as the reference strips them
        response = response.strip(char)
    text = f" {response} "
    found = [c for c in choices if f"({c})" in text]
    where = [text.rfind(f"({c})") for c in found]
    if not found:
        found = [c for c in choices if f"{c} " in text] or [c for c in choices if f"{c}." in text]
        where = [text.rfind(f" {c} ") for c in found]
    if not found and len(text.split()) > 5:
        lowered = text.lower()
        at = [lowered.rfind(option.lower()) for option in options]
        found = [c for c, position in zip(choices, at, strict=True) if position >= 0]
        where = [position for position in at if position >= 0]
    if not found:
        return random.Random(seed).choice(choices)
    return found[where.index(max(where))]  # the first of equals, as numpy's argmax


# MMMU's open questions (MMMU eval_utils.py: parse_open_response, normalize_str, eval_open).
_KEY_PHRASES = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}
_NUMBER_PATTERNS = [
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # with thousands commas
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # scientific
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),  # plain
]

Normalized = str | float


def mmmu_normalize(text: str) -> list[Normalized]:
    """A number (what float() reads, commas dropped) rounded to 2 places, else the lower-cased
    text; one character becomes " x" and "x " so it does not match inside every word."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _key_parts(response: str) -> list[str]:
    """Per line, the shortest tail after a key phrase ("is ", "so ", ...; "=" on the last
    line); the whole response when no line has one."""
    response = response.strip().strip(".").lower()
    # The reference also splits at ". " before a capital, after lower-casing: never.
    lines = response.split("\n")
    parts = []
    for number, line in enumerate(lines):
        phrases = _KEY_PHRASES + (["="] if number == len(lines) - 1 else [])
        shortest = ""
        for phrase in phrases:
            if phrase in line:
                tail = line.split(phrase)[-1].strip()
                if not shortest or len(tail) < len(shortest):  # an empty tail is replaced
                    shortest = tail
        if shortest and shortest not in _TRIVIAL:
            parts.append(shortest)
    return parts or [response]


def mmmu_open_predictions(response: str) -> list[Normalized]:
    """MMMU's candidates from an open answer: the key parts and every number in them."""
    parts = _key_parts(response)
    candidates = parts + [n for part in parts for p in _NUMBER_PATTERNS for n in p.findall(part)]
    return list({value: None for text in candidates for value in mmmu_normalize(text)})


def mmmu_open_correct(response: str, answers: Sequence[str]) -> bool:
    """A text candidate is right when it contains a text answer; a number, when it equals one.
    The whole candidate list counts, as in MMMU's evaluation (lmms-eval's current utils.py keeps
    only its first element, then compares characters, which marks nearly all open answers
    wrong)."""
    truths = [value for answer in answers for value in mmmu_normalize(answer)]
    for candidate in mmmu_open_predictions(response):
        if isinstance(candidate, str):
            if any(isinstance(t, str) and t in candidate for t in truths):
                return True
        elif candidate in truths:
            return True
    return False


def scienceqa_correct(prediction: str, letter: str) -> bool:
    """lmms-eval scienceqa/utils.py (after LLaVA): the answer is the letter, any case, or
    starts with "X." where X is the capital letter."""
    answer = prediction.strip()
    if answer.lower() == letter.lower():
        return True
    if len(answer) >= 2 and answer[0].isupper() and answer[1] == ".":
        return answer[0].lower() == letter.lower()
    return False


# -- boxes and points (RefCOCO, ScreenSpot) -------------------------------------------------
# Answers are in this project's convention (MM1.5's): [x1, y1, x2, y2] or [x, y], integers from
# 0 to 1000 across the image's width and height (mm1_mlx/boxes.py). lmms-eval's tasks ask for
# 0..1 floats instead; the metrics are theirs (utils_rec.py of refcoco and screenspot).


def box_hit(prediction: str, truth: ParsedBox, image_size: Size, threshold: float = 0.5) -> bool:
    """RefCOCO's accuracy: the first box in the answer overlaps the true box (pixels) with an
    IoU of at least `threshold` (lmms-eval's ACC@0.5, the first four bracketed numbers)."""
    boxes = parse_boxes(prediction, image_size)
    return bool(boxes) and iou(boxes[0], truth) >= threshold


def xywh_box(box: Sequence[float]) -> ParsedBox:
    """COCO's [x, y, width, height] in pixels as a box with corners."""
    x, y, width, height = box
    return ParsedBox(x, y, x + width, y + height, (0, 0))


def click_point(prediction: str) -> tuple[float, float] | None:
    """Where an answer points, in 0..1 of the image: the centre of its first box or its first
    point, whichever comes first; None without either."""
    unit = (1, 1)  # coordinates / 1000: fractions of the width and height
    found: list[tuple[int, float, float]] = [
        (b.span[0], (b.x1 + b.x2) / 2, (b.y1 + b.y2) / 2) for b in parse_boxes(prediction, unit)
    ]
    found += [(p.span[0], p.x, p.y) for p in parse_points(prediction, unit)]
    return min(found)[1:] if found else None


def point_in_box(prediction: str, truth: Sequence[float]) -> bool:
    """ScreenSpot's click accuracy (lmms-eval's Center_ACC, SeeClick's metric): the point lies
    in the true box [x1, y1, x2, y2], edges included, all in 0..1 of the image."""
    point = click_point(prediction)
    if point is None or not all(map(math.isfinite, truth)):
        return False
    x, y = point
    return truth[0] <= x <= truth[2] and truth[1] <= y <= truth[3]

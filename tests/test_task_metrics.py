"""The benchmark metrics against their reference definitions, on tables of tricky cases.

The expected values are worked out by hand from the published definitions, or computed by a
second, plain implementation written here from them:
- VQA accuracy: the official VQA evaluation (GT-Vision-Lab/VQA, vqaEvaluation/vqaEval.py, as
  EvalAI runs it; lmms-eval's _task_utils/vqa_eval_metric.py and vqav2/textvqa utils.py).
- ANLS: Biten et al. 2019 (ST-VQA) and the DocVQA challenge's script, as lmms-eval's
  api/metrics.py `anls` has it.
- MMMU: MMMU-Benchmark/MMMU eval/eval_utils.py (parse_multi_choice_response,
  parse_open_response, eval_open), as lmms-eval's mmmu/utils.py cites it.
- ScienceQA, RefCOCO, ScreenSpot: lmms-eval's scienceqa/utils.py, refcoco/utils_rec.py and
  screenspot/utils_rec.py (ACC@0.5 and Center_ACC).
"""

import random
from functools import cache
from statistics import mean

import pytest

from mm1_mlx.tasks import metrics

# -- VQA ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Two", "2"),
        ("none", "0"),
        ("\tTen\n", "10"),
        ("The cat", "cat"),
        ("a dog.", "dog"),
        ("an apple and a pear", "apple and pear"),
        ("yes!", "yes"),  # a mark away from spaces becomes a space
        ("red,white", "red white"),
        ("red, white", "red white"),  # next to a space: removed (every mark, in this text)
        ("x - y", "x y"),
        ("(left)", "left"),
        ("left-hand", "left hand"),
        ("1,000", "1000"),  # digit,digit: every mark is removed, none spaced
        ("1,000-2", "10002"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("a.m.", "am"),
        ("a" + "." * 40, "a" + "." * 8),  # the script removes at most 32 periods
        ("dont", "don't"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("yall'd've", "y'all'd've"),
        ("y'alld've", "y'all'd've"),
        ("'ows'at", "'ow's'at"),
        ("twas", "'twas"),
        ("somebody'd", "somebodyd"),  # the table's entry the wrong way round
        ("Im", "im"),  # capitalised keys never match lower-cased words
        ("its", "its"),
        ("shes", "shes"),
        ("What's up", "what's up"),
        ("Dog's", "dog's"),
    ],
)
def test_vqa_normalization(answer, expected):
    assert metrics.vqa_normalize(answer) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("The dog's, ball?", "dog 's ball"),  # EvalAI's word_tokenize splits "'s" off
        ("Hello,World", "helloworld"),  # commas dropped before punctuation, not spaced
        ("TWO apples", "2 apples"),
        ("Why?", "why"),
    ],
)
def test_evalai_normalization(answer, expected):
    assert metrics.evalai_normalize(answer) == expected


def reference_vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """vqaEval.py's loop: per left-out answer, min(1, matches among the others / 3)."""
    accuracies = []
    for left_out in range(len(answers)):
        others = answers[:left_out] + answers[left_out + 1 :]
        accuracies.append(min(1, sum(other == prediction for other in others) / 3))
    return mean(accuracies)


@pytest.mark.parametrize(
    "matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_accuracy_by_number_of_matching_answers(matching, expected):
    answers = ["two"] * matching + [f"other {i}" for i in range(10 - matching)]
    got = metrics.vqa_accuracy("2", answers, metrics.vqa_normalize)
    assert got == pytest.approx(expected)
    normalized = [metrics.vqa_normalize(answer) for answer in answers]
    assert got == pytest.approx(reference_vqa_accuracy("2", normalized))


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("Yes.", ["yes"] * 10, 1.0),
        ("the red one", ["red one"] * 2 + ["red"] * 8, 0.6),
        ("red", ["red one"] * 2 + ["red"] * 8, 1.0),
        ("1,000", ["1000"] * 3 + ["one thousand"] * 7, 0.9),
        ("dont know", ["don't know"], 0.0),  # one answer: nothing left to match
        ("", ["", "", "", "b"], 0.75),  # three blank answers: each left-out set has 2 or 3
        ("", ["", "", "", "a"], 1.0),  # "a" is an article: it normalises to blank too
    ],
)
def test_vqa_accuracy_cases(prediction, answers, expected):
    assert metrics.vqa_accuracy(prediction, answers, metrics.vqa_normalize) == pytest.approx(
        expected
    )


# -- ANLS -----------------------------------------------------------------------------------


@cache
def reference_levenshtein(a: str, b: str) -> int:
    """The recursive definition."""
    if not a or not b:
        return len(a) + len(b)
    return min(
        reference_levenshtein(a[1:], b) + 1,
        reference_levenshtein(a, b[1:]) + 1,
        reference_levenshtein(a[1:], b[1:]) + (a[0] != b[0]),
    )


def reference_anls(prediction: str, answers: list[str]) -> float:
    """Per answer 1 - NL (distance over the longer raw string), the best kept if >= 0.5."""
    clean = " ".join(prediction.strip().lower().split())
    similarities = []
    for answer in answers:
        longer = max(len(answer), len(prediction))
        distance = reference_levenshtein(" ".join(answer.strip().lower().split()), clean)
        similarities.append(1 - (distance / longer if longer else 0))
    best = max(similarities)
    return best if best >= 0.5 else 0.0


@pytest.mark.parametrize(
    "a, b, distance",
    [("kitten", "sitting", 3), ("", "abc", 3), ("flaw", "lawn", 2), ("ab", "ba", 2)],
)
def test_levenshtein(a, b, distance):
    assert metrics.levenshtein(a, b) == distance == reference_levenshtein(a, b)


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("1987", ["1987"], 1.0),
        ("  The  DATE ", ["the date"], 1 - 0 / 12),  # spaces and case do not count...
        ("  abc  ", ["abd"], 1 - 1 / 7),  # ...but the raw length divides
        ("ab", ["ax"], 0.5),  # exactly 0.5 is kept (the script's >=)
        ("abc", ["axy"], 0.0),  # 1/3 is below the threshold
        ("hello", ["hallo", "help", "hello world"], 0.8),  # the best answer
        ("", [""], 1.0),
        ("", ["abc"], 0.0),
        ("Dr. Smith", ["dr smith", "smith"], 1 - 1 / 9),
    ],
)
def test_anls(prediction, answers, expected):
    assert metrics.anls(prediction, answers) == pytest.approx(expected)
    assert metrics.anls(prediction, answers) == pytest.approx(reference_anls(prediction, answers))


# -- MMMU -----------------------------------------------------------------------------------

OPTIONS = ["respiration", "photosynthesis", "digestion", "excretion"]


@pytest.mark.parametrize(
    "response, expected",
    [
        ("(B)", "B"),
        ("The answer is (C).", "C"),
        ("B", "B"),
        ("b", None),  # lower case is no letter: a guess
        ("The answer is B.", "B"),
        ("A and B are wrong, C is right", "C"),  # several: the last mentioned
        ("A is wrong, (B)", "B"),  # brackets first
        ("D.", "D"),
        ("I think the right one is the one about photosynthesis", "B"),  # the option's text
        ("not respiration but photosynthesis drives this process here", "B"),
        ("photosynthesis", None),  # option text counts only past five words
        ("no idea", None),
    ],
)
def test_mmmu_multiple_choice_parsing(response, expected):
    chosen = metrics.mmmu_choice(response, OPTIONS, seed="validation_Biology_7")
    if expected is None:  # no candidate: a random letter, the same every time for one id
        assert chosen in "ABCD"
        assert chosen == metrics.mmmu_choice(response, OPTIONS, seed="validation_Biology_7")
        assert chosen == random.Random("validation_Biology_7").choice("ABCD")
    else:
        assert chosen == expected


@pytest.mark.parametrize(
    "response, answer, correct",
    [
        ("The answer is 42", "42", True),
        ("It is 3.14159", "3.14", True),  # numbers are rounded to 2 places
        ("It is 3.146", "3.14", False),
        ("1,000 apples", "1000", True),
        ("a", "a", True),
        ("banana", "a", False),  # one character matches only as a word
        ("The organelle is the Mitochondria.", "mitochondria", True),
        ("Step 1: x = 5\nSo the speed is 10 m/s", "10", True),  # the key part of each line
        ("Step 1: x = 5\nSo the speed is 10 m/s", "5", False),  # "=" counts on the last line
        ("x = 5", "5", True),
        ("2.5e3", "2500", True),
        ("seven", "7", False),
    ],
)
def test_mmmu_open_answers(response, answer, correct):
    assert metrics.mmmu_open_correct(response, [answer]) is correct


def test_mmmu_open_answer_with_several_truths():
    assert metrics.mmmu_open_correct("so it is 1.50", ["1.2", "1.5"])
    assert not metrics.mmmu_open_correct("so it is 1.6", ["1.2", "1.5"])


# -- ScienceQA ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, correct",
    [
        ("B", True),
        ("b", True),
        (" B \n", True),
        ("B. a cat", True),
        ("b. a cat", False),  # "X." must be a capital
        ("C. a cat", False),
        ("The answer is B", False),
        ("B) a cat", False),
        ("", False),
    ],
)
def test_scienceqa(prediction, correct):
    assert metrics.scienceqa_correct(prediction, "B") is correct


# -- RefCOCO and ScreenSpot -----------------------------------------------------------------

IMAGE = (200, 100)  # width, height in pixels
TRUTH_XYWH = [50, 25, 100, 50]  # COCO: x, y, width, height -> corners (50, 25, 150, 75)


def reference_iou(a, b) -> float:
    """Boxes as (x1, y1, x2, y2)."""
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - width * height
    return width * height / union


@pytest.mark.parametrize(
    "prediction, pixels, correct",
    [
        ("[250, 250, 750, 750]", (50, 25, 150, 75), True),  # the true box in 0..1000
        ("[750, 750, 250, 250]", (50, 25, 150, 75), True),  # corners in any order
        ("[250, 250, 750, 500]", (50, 25, 150, 50), True),  # IoU exactly 0.5
        ("[250, 250, 745, 500]", (50, 25, 149, 50), False),
        ("[500, 250, 1000, 750]", (100, 25, 200, 75), False),  # IoU 1/3
        ("[250, 125, 500, 250]", (50, 12.5, 100, 25), False),  # the box misread as corners
        ("It is at [250, 250, 750, 750].", (50, 25, 150, 75), True),
        ("[0, 0, 10, 10] or [250, 250, 750, 750]", (0, 0, 2, 1), False),  # the first box
    ],
)
def test_refcoco_box_hits(prediction, pixels, correct):
    truth = metrics.xywh_box(TRUTH_XYWH)
    assert metrics.box_hit(prediction, truth, IMAGE) is correct
    assert (reference_iou(pixels, (50, 25, 150, 75)) >= 0.5) is correct


@pytest.mark.parametrize("prediction", ["", "the dog on the left", "[250, 250]", "[1, 2, 3]"])
def test_refcoco_answers_without_a_box_miss(prediction):
    assert not metrics.box_hit(prediction, metrics.xywh_box(TRUTH_XYWH), IMAGE)


@pytest.mark.parametrize(
    "prediction, inside",
    [
        ("[300, 400]", True),  # a point
        ("[200, 300, 400, 500]", True),  # the box's centre (300, 400)
        ("[0, 0, 600, 800]", True),  # a loose box whose centre is inside
        ("[200, 300]", True),  # the corner: edges count
        ("[199, 300]", False),
        ("[400, 500]", True),
        ("[401, 500]", False),
        ("[0, 0, 10, 10] then [300, 400]", False),  # the first of boxes and points
        ("[300, 400] then [0, 0, 10, 10]", True),
        ("click the button", False),
    ],
)
def test_screenspot_point_in_box(prediction, inside):
    assert metrics.point_in_box(prediction, [0.2, 0.3, 0.4, 0.5]) is inside

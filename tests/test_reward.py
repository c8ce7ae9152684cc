"""Tests for reward.py: extraction, a 60-case judgement table (through the judge pool and by a direct call), the
353-case table of tests/fixtures/judge_table.jsonl (no false positive), Math-Verify's own public cases
(tests/fixtures/mathverify_table.jsonl: no false positive, at least math-verify's agreement), the answer classes of
issue 25, bad inputs (verdict and reason) within the time limit, timeouts from a non-main thread, workers that spin,
hang in C code or die, penalties/format, custom reward functions, pool lifecycle and the CLI.
~60-75 s on the 2-core box, most of it judge start-up (every replaced worker pays it again) and math-verify's own
judgement of its 219 cases (~10 s)."""
import json
import re
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import reward
from reward import RewardConfig, extract_boxed, numbers_match, score_batch

ROOT = Path(__file__).resolve().parents[1]
POOL = RewardConfig(num_workers=2, timeout_s=5.0)


def score_response(response: str, answer: str, finished: bool = True, cfg: RewardConfig = RewardConfig()) -> dict:
    return score_batch([response], [answer], [finished], cfg)[0]


# (response, gold, expected accuracy). The response is a full model output; the answer is in its last box.
B = "Let me solve it step by step. The final answer is \\boxed{%s}."
CASES = [
    # integers, toy-dataset style, gold plain or boxed
    (B % "11", "11", 1), (B % "11", "\\boxed{11}", 1), (B % "12", "11", 0), (B % "-3", "-3", 1), (B % "3", "-3", 0),
    (B % "101", "100", 0),  # integers must match exactly, a 1% band would accept this near miss
    (B % "1,000", "1000", 1), (B % "5.0", "5", 1),
    (B % "3.03", "3", 0), (B % "\\sqrt{9}", "3", 1),  # an integer gold: exact (3.03 is within 1% but wrong)
    # tricky negatives from the issue
    (B % "12", "1.2", 0), (B % "", "5", 0),
    ("First \\boxed{3}, wait, recheck: \\boxed{4}", "4", 1),  # two boxes: the last one counts
    ("First \\boxed{4}, wait, recheck: \\boxed{3}", "4", 0),
    ("\\fbox{7}", "7", 1), ("no box here, the answer is 7", "7", 0),  # fallback is off by default
    # fractions vs decimals, nested braces
    (B % "\\frac{1}{2}", "0.5", 1), (B % "\\dfrac{1}{2}", "\\frac12", 1), (B % "0.5", "\\frac{1}{2}", 1),
    (B % "\\frac{9}{2}", "4.5", 1),
    (B % "\\frac{1}{3}", "0.333", 1),  # |1/3 - 0.333| = 0.00033 <= 0.01 * 0.333 = 0.00333
    (B % "0.3", "\\frac{1}{3}", 0),  # |0.3-1/3| = 0.0333 > 0.01*0.3333 = 0.00333 -> wrong
    (B % "-\\frac{3}{4}", "-0.75", 1), (B % "\\frac{3}{4}", "-0.75", 0),
    (B % "1.57", "1.6", 0),  # |1.57 - 1.6| = 0.03 > 0.01 * 1.6 = 0.016: MAYE's rule, no rounding to gold's decimals
    (B % "4.81", "4.8", 1),  # 0.01 <= 0.048
    # numeric tolerance on irrational values (rel 1e-2): |3.46 - 2*sqrt(3)| = 0.0041 <= 0.0346
    (B % "3.46", "2\\sqrt{3}", 1), (B % "2\\sqrt{3}", "3.46", 1), (B % "3.6", "2\\sqrt{3}", 0),
    (B % "0.866", "\\frac{\\sqrt{3}}{2}", 1), (B % "8.66", "5\\sqrt{3}", 1), (B % "1.5708", "\\frac{\\pi}{2}", 1),
    # sqrt forms
    (B % "2\\sqrt{3}", "\\sqrt{12}", 1), (B % "\\sqrt{18}", "3\\sqrt{2}", 1), (B % "\\sqrt{3}", "\\sqrt{2}", 0),
    # degrees
    (B % "30^\\circ", "30", 1), (B % "30^{\\circ}", "30", 1), (B % "30°", "30", 1), (B % "30", "30^\\circ", 1),
    (B % "60^\\circ", "30", 0), (B % "45 degrees", "45", 1),
    # percentages (50% may be written 50 or 0.5)
    (B % "50\\%", "50", 1), (B % "50\\%", "0.5", 1), (B % "0.5", "50\\%", 1), (B % "40\\%", "50", 0),
    # x = 5, \angle ABC = 30, units, \text{} wrappers
    (B % "x=5", "5", 1), (B % "x = 5", "x=5", 1), (B % "\\angle ABC = 30^\\circ", "30", 1), (B % "x=4", "5", 0),
    (B % "x^2+y^2=1", "1", 0),  # an equation is not the value 1
    (B % "5\\text{ cm}", "5", 1), (B % "\\text{5 cm}", "5", 1), (B % "12 \\text{cm}^2", "12", 1),
    (B % "\\text{yes}", "yes", 1), (B % "\\mathrm{6}", "6", 1),
    # multiple choice letters
    (B % "A", "A", 1), (B % "(A)", "A", 1), (B % "A.", "A", 1), (B % "B", "(B)", 1), (B % "(C) 30", "C", 1),
    (B % "\\text{B}", "B", 1), (B % "C", "B", 0), (B % "Area", "A", 0),
    # intervals and sets
    (B % "[1,2)", "[1,2)", 1), (B % "(1,2)", "[1,2)", 0), (B % "\\{2,1\\}", "\\{1,2\\}", 1),
    (B % "\\{1,3\\}", "\\{1,2\\}", 0), (B % "(-\\infty, 3]", "x \\le 3", 1),
    # symbolic
    (B % "\\frac{3\\pi}{2}", "\\frac{3}{2}\\pi", 1), (B % "\\pi r^2", "\\pi r^{2}", 1), (B % "2x+1", "y=2x+1", 1),
    (B % "y = 3 - x", "y=-x+3", 1), (B % "x \\geq 2", "[2,+\\infty)", 1), (B % "(2, 3)", "(2,3)", 1),
    # dataset spellings (geometry3k / mm_math)
    (B % "2\\sqrt{221}", "2 \\sqrt { 221 }", 1), (B % "\\frac{40}{3}", "13.33", 1),
    (B % "25\\pi \\text{ cm}^2", "25\\pi", 1), (B % "-\\frac{\\sqrt{3}}{3}", "\\frac{\\sqrt{3}}{3}", 0),
    (B % "\\$12", "12", 1), (B % "\\frac{\\pi}{2}", "\\frac{1}{2}π", 1),
]


# issue 14's table: answer forms of geometry3k, MM-Math and MathVerse and cases from public answer-checker test suites
# (math-verify, Qwen2.5-Math, NeMo-Skills, Hendrycks MATH), each with a human verdict; bench/bench_judge.py compares.
TABLE = [json.loads(x) for x in (ROOT / "tests" / "fixtures" / "judge_table.jsonl").read_text().splitlines() if x]
KNOWN_MISSES = {("12 cm", "120 mm"),  # (gold, boxed answer) judged wrong though right: no unit conversion,
                ("\\begin{pmatrix} 3 \\\\ 0 \\\\ -2 \\end{pmatrix}", "(3, 0, -2)")}  # nor vectors as tuples


# Math-Verify's public test suite (Apache-2.0): its curated final-answer cases as rows, by
# tests/fixtures/make_mathverify_table.py (tests/fixtures/README.md says which cases and how).
MV_TABLE = [json.loads(x) for x in (ROOT / "tests" / "fixtures" / "mathverify_table.jsonl").read_text().splitlines()
            if x]
JUDGE_CATEGORIES = {"number", "fraction_percent", "units_degrees", "choice", "equation_lhs", "multi_part",
                    "tuple_interval_set", "matrix", "relation", "symbolic", "text"}


def test_fixture_tables_hold_what_the_judge_tests_rely_on():
    """Read from the files: the row counts bench/README.md reports, every category of the judge table with both
    verdicts (a category without a wrong answer could hide a false positive), no repeated row, and public rows that
    each name the Math-Verify test they come from."""
    for rows, n in ((TABLE, 353), (MV_TABLE, 219)):
        assert len(rows) == n and len({(r["gold"], r["response"]) for r in rows}) == n
        assert all(type(r["expected"]) is bool and r["gold"] and isinstance(r["response"], str) for r in rows)
    assert {(r["category"], r["expected"]) for r in TABLE} == {(c, e) for c in JUDGE_CATEGORIES for e in (True, False)}
    source = re.compile(r"Math-Verify@[0-9a-f]{7} tests/test_\w+\.py::test_(\w+)\[\d+\]")
    assert all((m := source.fullmatch(r["source"])) and m.group(1) == r["category"] for r in MV_TABLE)
    assert sum(not r["expected"] for r in MV_TABLE) == 32


def _raw_math_verify(gold: str, response: str) -> bool:
    """math-verify alone, as bench/bench_judge.py runs it: its default configs and its own timeouts."""
    import logging

    from math_verify import parse, verify
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # parse failures on odd text are expected
    return bool(verify(parse("$" + gold + "$"), parse(response)))


def test_public_suite_no_false_positive_and_at_least_math_verify():
    """On Math-Verify's own cases ours never calls a wrong answer right, and agrees with the labels at least as often
    as math-verify alone (computed here, on 2 forked processes; 213 of 219 on 2026-12-06, ours 217)."""
    res = score_batch([r["response"] for r in MV_TABLE], [r["gold"] for r in MV_TABLE], cfg=POOL)
    ours = [x["accuracy"] > 0 for x in res]
    assert [(r["source"], r["gold"]) for r, o in zip(MV_TABLE, ours) if o and not r["expected"]] == []
    pool = reward.judges(2)   # forked after the warm-up: math-verify imported once
    mv = [f.result() for f in [pool.schedule(_raw_math_verify, (r["gold"], r["response"])) for r in MV_TABLE]]
    agree_ours, agree_mv = (sum(v == r["expected"] for v, r in zip(vs, MV_TABLE)) for vs in (ours, mv))
    assert agree_ours >= agree_mv, (agree_ours, agree_mv)


# Issue 25: classes of answers the judge got wrong (each class: a wrong answer accepted, or a right one refused),
# with the near cases that must keep their verdict. (gold, response, expected accuracy)
R = "So the answer is $\\boxed{%s}$."
F = "F_n = \\sum_{k=0}^{n-1} F_k F_{n-k-1}"
T7 = "(1,2),(3,4),(5,6),(7,8),(9,10),(11,12),(13,14)"
ISSUE_25 = {
    "spaced_thousands_is_two_numbers": [
        ("32349", "is $\\boxed{32, 349}$", 0), ("32349", "is $\\boxed{32,\\! 349}$", 1), ("1000", R % "1, 000", 0),
        ("7425000", R % "7,425,000", 1)],
    "sums_with_other_bounds_differ": [
        (F, R % "F_n = \\sum_{k=0}^{n-2} F_k F_{n-k-2}", 0), (F, R % "F_n = \\sum_{k=0}^{n-1} F_{n-k-1} F_k", 1),
        ("\\sum_{i=1}^{n} i", R % "\\sum_{i=0}^{n} i^2", 0)],
    "hedged_choice_is_wrong": [
        ("A", R % "\\text{A and B}", 0), ("A", R % "\\text{A or B}", 0), ("(B)", R % "\\text{B, C}", 0),
        ("A", R % "\\text{(A)}", 1), ("C", R % "(C) 30", 1)],
    "tuples_in_another_order": [
        ("(37,3,3,13),(17,3,3,7),(3,37,3,13),(3,17,3,7),(3,3,2,3)",  # Math-Verify test_numina_cases[0]: one repeated
         R % "(3, 37, 3, 13), (3, 17, 3, 7), (3, 3, 2, 3), (3,17,3,7), (17,3,3,7), (37,3,3,13)", 1),
        (T7, R % "(13,14),(11,12),(9,10),(7,8),(5,6),(3,4),(1,2)", 1),
        (T7, R % "(13,14),(11,12),(9,10),(7,8),(5,6),(3,4),(2,1)", 0), ("(1,2),(3,4)", R % "(3,4),(1,2),(5,6)", 0)],
    "semicolon_separators": [
        ("(0;0;0),(0;-2;0),(4;0;6)", R % "(4, 0, 6), (0, 0, 0), (0, -2, 0)", 1),
        ("-12;-11;-10;-8", R % "\\{-8, -10, -11, -12\\}", 1), ("-12;-11;-10;-8", R % "\\{-8, -10, -11\\}", 0),
        ("p=5,q=2;p=7,q=2", R % "(5,2),(7,2)", 1), ("p=5,q=2;p=7,q=2", R % "(2,5),(2,7)", 0)],
    "decimal_comma": [
        ("1000.99", R % "1000,99", 1), ("1,22", R % "1.22", 1), ("0,111", R % "0.111", 1), ("1,22", R % "1.5", 0),
        ("1, 2", R % "1.2", 0), ("1000", R % "1,000", 1)],
    "answer_split_over_boxes": [
        ("\\{1,2,3\\}", "\\boxed{1}, \\boxed{2}, \\boxed{3}", 1),
        ("{1,2,3}", "\\boxed{1} and \\boxed{2} and \\boxed{3}", 1),
        ("(2, 2), (6, 2)", "$$\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}$$", 1),
        ("\\{1,2,3\\}", "\\boxed{1}, \\boxed{2}, \\boxed{4}", 0), ("\\{1,2,3\\}", "\\boxed{1}, \\boxed{2}", 0)],
}


@pytest.mark.parametrize("name", ISSUE_25)
def test_issue_25_answer_class(name):
    cases = ISSUE_25[name]
    res = score_batch([c[1] for c in cases], [c[0] for c in cases], cfg=POOL)
    assert [(g, extract_boxed(r), x["accuracy"]) for (g, r, _), x in zip(cases, res)] == \
        [(g, extract_boxed(r), float(e)) for g, r, e in cases]


def test_judge_table_never_calls_a_wrong_answer_right():
    res = score_batch([r["response"] for r in TABLE], [r["gold"] for r in TABLE], cfg=POOL)
    false_pos = [(r["category"], r["gold"], r["response"]) for r, x in zip(TABLE, res) if x["accuracy"] and
                 not r["expected"]]
    assert false_pos == []
    assert {(r["gold"], extract_boxed(r["response"])) for r, x in zip(TABLE, res) if not x["accuracy"] and
            r["expected"]} == KNOWN_MISSES


@pytest.fixture(scope="module")
def pool_results():
    res = score_batch([c[0] for c in CASES], [c[1] for c in CASES], cfg=POOL)
    yield res


def _case_id(i):
    r, g, e = CASES[i]
    return f"{i}-{extract_boxed(r)}-vs-{g}"


@pytest.mark.parametrize("i", range(len(CASES)), ids=_case_id)
def test_table_pool(pool_results, i):
    response, gold, expected = CASES[i]
    got = pool_results[i]
    assert got["accuracy"] == expected, (response, gold, got)
    assert got["score"] == expected  # format_weight 0, finished, no CJK: score == accuracy


def test_table_direct_call_agrees(pool_results):
    """The same verdicts without the pool (judged in this process, unbounded): the transport changes nothing."""
    got = [reward._score_unbounded(r, g, True, POOL) for r, g, _ in CASES]
    assert got == pool_results


# ---------------------------------------------------------------------------------------------------- extraction
def test_extract_boxed():
    assert extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("a \\boxed{1} b \\fbox{2} c") == "2"
    assert extract_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"  # escaped braces do not close the box
    assert extract_boxed("\\boxed{3} then truncated \\boxed{4") == "3"  # unclosed last box: previous one
    assert extract_boxed("\\boxed{}") == ""
    assert extract_boxed("\\boxed {5}") == "5"
    assert extract_boxed("nothing") is None and extract_boxed("\\boxed{") is None
    deep = "\\boxed{" + "{" * 1000 + "7" + "}" * 1000 + "}"
    assert extract_boxed(deep) == "{" * 1000 + "7" + "}" * 1000


def test_answer_fallback():
    cfg = RewardConfig(answer_fallback=True)
    assert reward.extract_answer("So the answer is 42.", fallback=True) == "42"
    assert reward.extract_answer("Answer: $\\frac{1}{2}$", fallback=True) == "\\frac{1}{2}"
    assert reward.extract_answer("the answer is 3 \\boxed{4}", fallback=True) == "4"  # a box wins
    assert score_response("Thus the answer is 7.", "7", cfg=cfg)["accuracy"] == 1.0
    assert score_response("Thus the answer is 7.", "7")["reason"] == "no_answer"


def test_numbers_match_hand_worked():
    assert numbers_match(3.46, 3.4641016, 1e-2)  # |diff| = 0.0041 <= 0.0346
    assert not numbers_match(3.46, 3.4641016, 1e-3)  # 0.0041 > 0.00346
    assert not numbers_match(101.0, 100.0, 1e-2, gold_int=True) and not numbers_match(3.03, 3.0, 1e-2, gold_int=True)
    assert numbers_match(100.5, 100.0, 1e-2)  # 0.5 <= 1.0
    assert not numbers_match(0.001, 0.0, 1e-2)  # gold 0: exact


def test_rel_tol_is_configurable():
    r = B % "3.46"
    assert score_response(r, "2\\sqrt{3}", cfg=RewardConfig(rel_tol=1e-2))["accuracy"] == 1.0
    assert score_response(r, "2\\sqrt{3}", cfg=RewardConfig(rel_tol=1e-3))["accuracy"] == 0.0


# ---------------------------------------------------------------------------------------------- score assembly
def test_penalty_format_language_hand_worked():
    cfg = RewardConfig(format_weight=0.5, language_penalty=-0.2, penalty=-0.1)
    ok = score_response(B % "5", "5", cfg=cfg)
    assert (ok["score"], ok["accuracy"], ok["format"], ok["reason"], ok["pred"]) == (1.5, 1.0, 1.0, "", "5")
    zh = score_response("答案是 \\boxed{5}", "5", cfg=cfg)  # 1 + 0.5*1 - 0.2 = 1.3
    assert zh["score"] == pytest.approx(1.3) and zh["mixed_language"]
    wrong = score_response(B % "6", "5", cfg=cfg)  # 0 + 0.5*1 = 0.5
    assert wrong["score"] == 0.5
    nobox = score_response("it is 5", "5", cfg=cfg)  # 0 + 0.5*0
    assert (nobox["score"], nobox["format"], nobox["reason"]) == (0.0, 0.0, "no_answer")
    cut = score_response(B % "5", "5", finished=False, cfg=cfg)  # no stop token: the penalty replaces all
    assert (cut["score"], cut["accuracy"], cut["reason"]) == (-0.1, 1.0, "truncated")
    empty = score_response(B % "", "5", cfg=cfg)
    assert (empty["format"], empty["reason"]) == (0.0, "empty_answer")


def test_truncation_penalty_switch():
    off = RewardConfig(truncation_penalty=False, num_workers=2)
    assert score_response(B % "5", "5", finished=False, cfg=off)["score"] == 1.0  # judged like a finished one
    assert [r["score"] for r in score_batch([B % "5", B % "4"], ["5", "5"], [False, False], cfg=off)] == [1.0, 0.0]


def test_require_think():
    cfg = RewardConfig(require_think=True, format_weight=1.0)
    assert score_response("<think>2+3=5</think> \\boxed{5}", "5", cfg=cfg)["score"] == 2.0
    assert score_response("\\boxed{5}", "5", cfg=cfg)["format"] == 0.0
    assert score_response("<think> </think> \\boxed{5}", "5", cfg=cfg)["format"] == 0.0  # empty thought
    assert score_response("<think>\\boxed{5}</think> so", "5", cfg=cfg)["format"] == 0.0  # box inside think


def test_batch_finished_and_lengths():
    res = score_batch([B % "1", B % "1"], ["1", "1"], [True, False], cfg=POOL)
    assert [r["score"] for r in res] == [1.0, -0.1]
    with pytest.raises(ValueError, match="lengths differ"):
        score_batch(["a"], ["1", "2"], cfg=POOL)


# ------------------------------------------------------------------------------------------------- bad inputs
# (response, gold, accuracy, reason): malformed or hostile input gets a verdict and a reason, never an exception
BAD = [
    (None, "1", 0.0, "bad_input: response is NoneType, expected str"),
    (b"\\boxed{1}", "1", 0.0, "bad_input: response is bytes, expected str"),
    (B % "1", None, 0.0, "bad_input: answer is NoneType, expected str"),
    ("x" * 100_000 + "\\boxed{1}", "1", 1.0, ""),  # a long response is still judged
    ("\\boxed{" + "1" * 100_000 + "}", "1", 0.0, "too_long: pred has 100000 chars > 10 x 1000"),
    ("\\boxed{\\frac{" + "1" * 5000 + "}{2}}", "1", 0.0, "too_long: pred has 5010 chars > 1000"),
    ("\\boxed{" + "x+" * 50_000 + "1}", "1", 0.0, "too_long: pred has 100001 chars > 10 x 1000"),
    ("\\boxed{" + "{" * 1000 + "1" + "}" * 1000 + "}", "1", 1.0, ""),  # {{{...1...}}} is 1
    ("\\boxed{10^{10^{10^{10}}}}", "5", 0.0, "too_large: nested power in pred"),
    ("\\boxed{2^{10000000}}", "5", 0.0, "too_large: exponent product > 1e6 in pred"),
    ("\\boxed{(2^{9999})^{9999}}", "5", 0.0, "too_large: exponent product > 1e6 in pred"),
    ("\\boxed{99999!}", "5", 0.0, "too_large: factorial of a 5+ digit number in pred"),
    ("\\boxed{\\frac{1}{2}", "1", 0.0, "no_answer"),  # unclosed box
    # malformed LaTeX and an unknown command: judged wrong, not an error (the parser's failure is no verdict of 1)
    ("\\boxed{\\frac{1}{}}", "1", 0.0, ""), ("\\boxed{\\sqrt[}{x}}", "1", 0.0, ""), ("\\boxed{)(}", "1", 0.0, ""),
    ("\\boxed{\\unknowncommand{3}}", "3", 0.0, ""),
    ("\\boxed{一}", "1", 0.0, ""),  # a CJK numeral is not read as a number (the language penalty's business)
    ("\\boxed{١٢}", "12", 1.0, ""),  # Arabic-Indic digits are digits: twelve
    ("\\boxed{\ud800}", "1", 0.0, ""),  # a lone surrogate
    ("\\boxed{5\u200b}", "5", 1.0, ""),  # a zero-width space is nothing
]


@pytest.mark.parametrize("workers", [2, 0], ids=["2-workers", "0-taken-as-1"])
def test_bad_inputs_return_a_score_with_reason_in_time(workers):
    cfg = RewardConfig(num_workers=workers, timeout_s=10.0)  # generous: the 2-core box is shared
    t0 = time.perf_counter()
    res = score_batch([b[0] for b in BAD], [b[1] for b in BAD], cfg=cfg)
    elapsed = time.perf_counter() - t0
    assert [(str(b[0])[:40], r["accuracy"], r["score"], r["reason"]) for b, r in zip(BAD, res)] == \
        [(str(b[0])[:40], b[2], b[2], b[3]) for b in BAD]  # score == accuracy: finished, no format weight
    # a hang guard, not a speed target: no item may take its whole 10 s limit (the batch normally takes seconds)
    assert elapsed < 10.0 * len(BAD) / max(workers, 1)


def _spin_file(tmp_path):
    f = tmp_path / "fns.py"
    f.write_text(f"def spin(response, answer):\n    import os\n    open({str(tmp_path / 'spinning')!r}, 'a')"
                 f".write(f'{{os.getpid()}}\\n')\n    while True:\n        pass\n\n"
                 "def length(response, answer):\n    return len(response) / 10\n\n"
                 "def broken(response, answer):\n    return 1 / 0\n\n"
                 "def text(response, answer):\n    return 'yes'\n\n"
                 "def die(response, answer):\n    import os\n    os._exit(3)\n\n"
                 "def pid(response, answer):\n    import os\n    return float(os.getpid())\n\n"
                 "def c_hang(response, answer):  # catastrophic backtracking: one C call that holds the GIL\n"
                 "    import re\n    return float(bool(re.match(r'(a+)+$', 'a' * 60 + 'b')))\n")
    return f


@pytest.mark.parametrize("workers", [2, 0], ids=["2-workers", "0-taken-as-1"])
def test_timeout_inside_worker_thread(tmp_path, workers):
    """A judgement that never ends, called from a non-main thread (where signal.alarm cannot work)."""
    cfg = RewardConfig(num_workers=workers, timeout_s=0.5, fn=f"{_spin_file(tmp_path)}:spin")
    box = []
    th = threading.Thread(target=lambda: box.append(score_batch([B % "1", B % "2"], ["1", "2"], [True, False],
                                                                cfg=cfg)))
    t0 = time.perf_counter()
    th.start()
    th.join(60)
    assert not th.is_alive()  # without a working timeout the spin never ends
    res = box[0]
    assert [r["reason"][:8] for r in res] == ["timeout:", "timeout:"]
    assert [r["score"] for r in res] == [0.0, -0.1]  # unfinished keeps the truncation penalty
    for pid in map(int, (tmp_path / "spinning").read_text().split()):   # the spinning judges were killed
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # a guard that the 0.5 s limit is what ended the spins (2 x 0.5 s + a new forked pool per timeout, a few seconds
    # normally), not the 60 s join above; generous for a loaded 2-core box
    assert time.perf_counter() - t0 < 30
    # and the judge still works, sympy path included: the stopped workers were replaced by fresh ones
    ok = score_batch([B % "1", B % "3.46"], ["1", "2\\sqrt{3}"], cfg=RewardConfig(num_workers=workers))
    assert [r["accuracy"] for r in ok] == [1.0, 1.0]


def _pids(n, f):
    """The judge processes' pids, as seen from inside them (a custom fn returning os.getpid())."""
    return {int(r["accuracy"]) for r in score_batch(["x"] * n, ["1"] * n, cfg=RewardConfig(fn=f"{f}:pid"))}


def test_worker_hung_in_c_or_dead_is_killed_replaced_and_reported(tmp_path):
    """A judge stuck in one C call (no Python-level stop can reach it) or dying mid-item: its item gets a reason, the
    processes are gone, and new ones judge the items after it."""
    f = _spin_file(tmp_path)
    before = _pids(8, f)
    hung = score_batch([B % "1"] * 2, ["1"] * 2, [True, False], cfg=RewardConfig(timeout_s=2.0, fn=f"{f}:c_hang"))
    assert [(r["reason"][:8], r["score"]) for r in hung] == [("timeout:", 0.0), ("timeout:", -0.1)]
    dead = score_batch([B % "1"], ["1"], cfg=RewardConfig(timeout_s=2.0, fn=f"{f}:die"))[0]
    assert dead["reason"] == "worker_died: process exited with code 3" and dead["accuracy"] == 0.0
    for pid in before:                         # the first pool's processes were killed, not leaked
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    ok = score_batch([B % "1", B % "3.46"], ["1", "2\\sqrt{3}"], cfg=POOL)
    assert [r["accuracy"] for r in ok] == [1.0, 1.0]
    assert not _pids(8, f) & before


def test_num_workers_must_not_be_negative():
    with pytest.raises(ValueError, match="--reward.num-workers must be >= 0"):
        score_batch(["x"], ["1"], cfg=RewardConfig(num_workers=-1))


# --------------------------------------------------------------------------------------------- custom rewards
def test_custom_fn(tmp_path):
    f = _spin_file(tmp_path)
    res = score_batch(["abcd\\boxed{1}", "x"], ["1", "1"], cfg=RewardConfig(num_workers=2, fn=f"{f}:length"))
    assert [r["accuracy"] for r in res] == [1.3, 0.1]  # len("abcd\boxed{1}") = 13 -> 1.3; len("x") = 1 -> 0.1
    bad = score_response("x", "1", cfg=RewardConfig(fn=f"{f}:broken"))
    assert bad["reason"].startswith("fn_error: ZeroDivisionError") and bad["accuracy"] == 0.0
    assert score_response("x", "1", cfg=RewardConfig(fn=f"{f}:text"))["reason"].startswith("fn_error: returned")
    with pytest.raises(ValueError, match="no function 'nope'"):
        score_batch(["x"], ["1"], cfg=RewardConfig(fn=f"{f}:nope"))
    with pytest.raises(FileNotFoundError):
        score_batch(["x"], ["1"], cfg=RewardConfig(fn="/no/such/file.py:f"))
    with pytest.raises(ValueError, match="path/file.py:func"):
        score_batch(["x"], ["1"], cfg=RewardConfig(fn="justaname"))


# ----------------------------------------------------------------------------------------------- pool lifecycle
def test_pool_reused_restarted_and_closed(tmp_path):
    f = _spin_file(tmp_path)
    first = _pids(8, f) | _pids(8, f) | _pids(8, f)
    assert len(first) <= 2                # reused, not re-spawned (which judge takes an item is the pool's choice)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)       # a judge that dies while idle is replaced without losing an item
    time.sleep(0.5)
    res = score_batch([B % "1"] * 4, ["1"] * 4, cfg=POOL)
    assert [r["accuracy"] for r in res] == [1.0] * 4
    assert victim not in _pids(8, f)
    last = _pids(8, f)
    pool = reward.judges(2)
    pool.stop()
    pool.join()
    time.sleep(0.5)
    for pid in last:                      # no judge left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_workers_are_killed_at_exit(tmp_path):
    """A process that scores and exits without stopping its pool leaves no judge process behind."""
    code = (f"import reward; r = reward.score_batch(['x'] * 8, ['1'] * 8, cfg=reward.RewardConfig(num_workers=2, "
            f"fn={str(_spin_file(tmp_path)) + ':pid'!r})); print(*{{int(x['accuracy']) for x in r}})")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    pids = [int(x) for x in p.stdout.split()]
    assert 1 <= len(pids) <= 2
    time.sleep(0.5)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_spawned_process_that_scored_exits(tmp_path):
    """A training rank is a spawned process: when it ends, multiprocessing joins its children before any atexit
    handler runs, so judges still running then would keep it waiting for ever."""
    script = tmp_path / "rank.py"
    script.write_text("import multiprocessing as mp\nimport reward\n\n\ndef rank():\n"
                      "    reward.score_batch(['\\\\boxed{1}'] * 4, ['1'] * 4)\n\n\n"
                      "if __name__ == '__main__':\n    p = mp.get_context('spawn').Process(target=rank)\n"
                      "    p.start()\n    p.join(90)\n    print(p.exitcode)\n    p.kill()\n")
    p = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.stdout.split() == ["0"], p.stdout + p.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------- CLI
def test_cli(tmp_path):
    rows = [{"response": B % "11", "answer": 11, "id": 0}, {"response": "Wait. \\boxed{3}", "answer": "4"},
            {"response": B % "2", "answer": "2", "finished": False}]
    inp, out = tmp_path / "r.jsonl", tmp_path / "s.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = subprocess.run([sys.executable, "reward.py", "--responses", str(inp), "--out", str(out),
                        "--reward.num-workers", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["score"] for s in scored] == [1.0, 0.0, -0.1] and scored[0]["id"] == 0
    assert "accuracy" in p.stdout and "mean score" in p.stdout
    inp.write_text(json.dumps({"response": "x"}) + "\n")
    p = subprocess.run([sys.executable, "reward.py", "--responses", str(inp)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and "missing field 'answer'" in p.stderr
    inp.write_text(json.dumps({"response": "x", "answer": "1"}) + "\n{not json\n")
    p = subprocess.run([sys.executable, "reward.py", "--responses", str(inp)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and "r.jsonl:2: invalid JSON" in p.stderr


def test_import_has_no_side_effects():
    code = "import reward, threading; assert reward._JUDGES == {} and threading.active_count() == 1"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)

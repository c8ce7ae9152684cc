"""Rule-based rewards (stage 2 of the RL loop): answer extraction, judging, the score of each response.

Score of one response (MAYE, arXiv 2504.02587: accuracy + format + language penalty; truncated -> penalty instead):
    score = accuracy + format_weight * format + language_penalty * [response mixes in CJK script]
    score = penalty                       if the response has no stop token (finished=False)
accuracy is 1/0 from `judge`: the last \\boxed{...} vs the gold answer, part by part after MAYE-style normalisation,
numbers within rel_tol, the rest by math-verify, in a judge process killed past timeout_s (accuracy 0, a reason).

Run alone:  python reward.py --responses R.jsonl [--out scored.jsonl] [--reward.num-workers 2]
"""
import functools
import json
import logging
import math
import multiprocessing.util
import numbers
import os
import re
import runpy
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pebble

from common import die_with_parent, read_jsonl


@dataclass(frozen=True)
class RewardConfig:
    format_weight: float = 0.0  # Weight of the format reward (boxed answer [+ <think> if required]); MAYE logs it.
    penalty: float = -0.1  # Score of a truncated response (no stop token), replacing the whole score (MAYE: -0.1).
    truncation_penalty: bool = True  # Give truncated responses the penalty (MAYE); off = judge them as finished.
    language_penalty: float = 0.0  # Added to the score when a response contains CJK characters; 0 disables.
    timeout_s: float = 5.0  # Wall-clock limit per judgement; past it the judge process is killed (reason 'timeout').
    num_workers: int = 2  # Judge processes, started once per process and reused (0 is taken as 1).
    rel_tol: float = 1e-2  # Numbers match if |pred-gold| <= rel_tol*|gold| (MAYE); an integer gold must be equal.
    answer_fallback: bool = False  # Without a \boxed{}, take the answer from 'the answer is X' / 'answer: X'.
    require_think: bool = False  # The format reward also requires <think>...</think> before the boxed answer.
    fn: str = ""  # Custom accuracy 'path/file.py:func', func(response, answer) -> float; empty = built-in judge.
    max_answer_chars: int = 1000  # Longer answers (10x that before normalising) are not judged: reason too_long.


# ---- extraction and normalisation (pure, linear time) ----------------------------------------------------------------
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_RE = re.compile(r"\\.|[{}]", re.S)  # an escape (\{, \}, \\) is one token, so it never counts
_FALLBACK_RE = re.compile(r"answer\s*(?:is|:)\s*:?\s*\$*\s*([^\n$]+?)\s*\$*\s*(?:\.\s|\.?$|\n)", re.I | re.M)
_WRAP_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DEG_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree|\\circ|\s*degrees?$")
_UNITS = (r"(?:square\s+|sq\.?\s*)?(?:units?|cm|mm|km|m|in|inches|inch|ft|feet|foot|yd|yards?|meters?|"
          r"centimeters?|millimeters?|kilometers?|miles?)(?:\s*\^\s*\{?[23]\}?|²|³)?")
_UNIT_RE = re.compile(r"(?<=[\d}])\s*" + _UNITS + "$")  # `12 cm`, `5 units`: a unit word after a number
_TEXT_UNIT_RE = re.compile(r"\\(?:text|mathrm|mbox)\s*\{\s*" + _UNITS + r"\s*\}(?:\s*\^\s*\{?[23]\}?)?")
_TAG_RE = re.compile(r"(?<![A-Za-z\\])" + _UNITS + r"(?![A-Za-z]|\\angle)|°|\\circ|degree|%|percent|pct")
_TAGS = {"centimeter": "cm", "millimeter": "mm", "kilometer": "km", "meter": "m", "inche": "in", "inch": "in",
         "feet": "ft", "foot": "ft", "yard": "yd", "°": "deg", "\\circ": "deg", "degree": "deg", "percent": "%",
         "pct": "%"}
_RELATIONS = [(re.compile(p), r) for p, r in ((r"(=[^=,;]*?)\\approx[^,;]*", r"\1"),  # `x=1/3\approx0.33`: exact
              (r">=|≥|\\geqslant|\\ge(?![a-zA-Z])", r"\\geq "), (r"\\approx", "="),
              (r"<=|≤|\\leqslant|\\le(?![a-zA-Z])", r"\\leq "), (r"!=|≠|\\ne(?![a-zA-Z])", r"\\neq "),
              (r"^\s*=", ""))]
_SEP_RE = re.compile(r"\\(?:text|mbox|mathrm)\s*\{\s*(?:and|or)\s*\}|\s(?:and|or)\s|;|\\quad"
                     r"|(?<=[)\]])\s*(?:and|or)\s*(?=[(\[])")  # `(11,7)or(7,11)`
_SPLIT_RE = re.compile(r"\\begin|\\end|\\[{}]|[([{]|[)\]}]|,")
_THOUSANDS_RE = re.compile(r"[\s$]*(?:\\\$)?\s*-?[1-9]\d{0,2}(?:,(?:\\[!,]\s*)*\d{3})+(?:\.\d*)?[\s$%]*")
_NAME_SUB_RE = re.compile(r"_\{[^{}]*\}|_\w|\\angle\s*\d+")  # subscripts and `\angle 1` may hold digits in a name
_MATRIX_RE = re.compile(r"^\\begin\{(\w+)\}(.*)\\end\{\1\}$", re.S)
_CHOICE_GOLD_RE = re.compile(r"^\(?([A-H])\)?\.?$")
_CHOICE_PRED_RE = re.compile(r"^\(?([A-H])(?:\)|\.|:|,|\s|$)")
_NUM_RE = re.compile(r"^(-?)([1-9]\d{0,2}(?:,\d{3})+|\d+)?(\.\d+)?(%?)$")
_FRAC_RE = re.compile(r"^(-?)(?:\\frac\{(-?\d+)\}\{(\d+)\}|\\frac(\d)(\d)|(-?\d+)/(\d+))(%?)$")
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_THINK_RE = re.compile(r"^\s*<think>(.+?)</think>", re.S)


def extract_boxes(text: str) -> list[str]:
    """Contents of every *closed* \\boxed{...} or \\fbox{...}, in order (an unclosed one, truncated, is left out)."""
    starts, stack, close = [m.end() for m in _BOX_RE.finditer(text)], [], {}  # starts: index after each box's "{"
    for tok in _BRACE_RE.finditer(text, starts[0] - 1) if starts else ():
        if tok.group() == "{":
            stack.append(tok.end())
        elif tok.group() == "}" and stack:
            close[stack.pop()] = tok.start()
    return [text[s:close[s]].strip() for s in starts if s in close]


def extract_boxed(text: str) -> str | None:
    """The last closed box's content (MAYE's rule), else None."""
    return (extract_boxes(text) or [None])[-1]


def extract_answer(response: str, fallback: bool = False) -> str | None:
    """Last boxed answer; with `fallback`, else the last 'the answer is X' / 'answer: X'."""
    hits = _FALLBACK_RE.findall(response) if (boxed := extract_boxed(response)) is None and fallback else []
    return hits[-1].strip() if hits else boxed


def normalize(s: str) -> str:
    """MAYE-style answer normalisation: strip $, \\left/\\right, spacing macros (not the `\\\\` row break), \\text{}
    wrappers, degrees, units and `percent` after a number, a trailing '.', enclosing braces; \\dfrac -> \\frac,
    \\% -> %, >= / \\ge -> \\geq (also <=, !=); whitespace removed except after a command name before a letter."""
    s = re.sub(r"(?<!\\)\\[,;:! ]|\\left|\\right|\\displaystyle", " ", s.strip().strip("$").strip())
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%").replace("\\$", "")
    s = _TEXT_UNIT_RE.sub("", s)  # `25\pi \text{ cm}^2`: a \text{} unit goes wherever it stands
    for _ in range(3):  # nested wrappers, e.g. \text{\textbf{A}}
        s = _WRAP_RE.sub(r"\1", s)
    for pattern, repl in _RELATIONS:
        s = pattern.sub(repl, s)
    s = re.sub(r"(?<=\d)\s*(?:per\s*cent(?:age)?|pct)\.?$", "%", _UNIT_RE.sub("", _DEG_RE.sub("", s).strip()).strip())
    s = s[:-1] if len(s) > 1 and s.endswith(".") else s
    # `{{1}}` -> `1`: strip k enclosing pairs, fewer if the depth dips inside (`{1}+{2}`: the first { closes early)
    k, depth, low = min(len(s) - len(s.lstrip("{")), len(s) - len(s.rstrip("}"))), 0, 0
    for c in s[k:len(s) - k]:
        depth += (c == "{") - (c == "}")
        low = min(low, depth)
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\0", s[k + low:len(s) - k - low] if k + low > 0 else s)
    return re.sub(r"\s+", "", s).replace("\0", " ")  # `\pi r` keeps its space


def units(s: str) -> set[str]:
    """The units an answer names ('cm', 'deg', '%', ...): answers naming different ones differ (`12 m` vs `12 cm`)."""
    return {_TAGS.get(t := re.sub(r"\s|s$", "", u.lower()), t) for u in _TAG_RE.findall(s)}


def split_parts(s: str) -> list[str]:
    """The top-level parts of an answer: split at commas and semicolons outside brackets (not in `1,000`), `\\quad`,
    `and`/`or`; `a \\pm b` is two parts. `x=1, y=2` -> [`x=1`, ` y=2`]; `(1,2)` and `\\{1,2\\}` stay one part."""
    if _THOUSANDS_RE.fullmatch(s):
        return [s]
    s = re.sub(r"(?<!\\)\\[,;:! ]", " ", s)  # spacing macros: `a=4,\,-8` is two parts, not four
    if len(gs := [g.split(",") for g in s.split(";")]) > 1 and all(len(g) > 1 and all("=" in x for x in g) for g in gs):
        s = ",".join("(" + ",".join(x.partition("=")[2] for x in g) + ")" for g in gs)  # `p=5,q=2;p=7,q=2`: (5,2),(7,2)
    s, parts, depth, start = _SEP_RE.sub(",", s), [], 0, 0
    for m in _SPLIT_RE.finditer(s):
        if m.group() == "," and depth == 0:
            parts.append(s[start:m.start()])
            start = m.end()
        elif m.group() != ",":
            depth += 1 if m.group() in ("\\begin", "\\{", "(", "[", "{") else -1
    return [q for p in parts + [s[start:]] if p.strip() for q in
            ((p.replace("\\pm", "+"), p.replace("\\pm", "-")) if p.count("\\pm") == 1 else (p,))]


def named_part(part: str) -> tuple[str, str, str]:
    """(name, value, part) of a normalised part: `x=5` -> `x`, `5`; `\\angle ABC = 2+3 = 5` -> `\\angle ABC`, `5`;
    `f(x)=3`, `|AB|=5`, `\\frac{NO}{BO}=\\frac{1}{2}` alike, and `1=y=x=0` -> `x`, `0` (the last left side). A left
    side with digits (outside subscripts and `\\angle 1`) or operators is no name (`2x=6`, `x^2+y^2=1`): the part is
    an equation, ('', part, part). Only `=` outside braces counts (`F_n=\\sum_{k=0}^{n}F_k`)."""
    cut = [i for i, c in enumerate(re.sub(r"\{(?:[^{}]|\{[^{}]*\})*\}", lambda m: "_" * len(m[0]), part)) if c == "="]
    for lhs in [part[:cut[0]], part[cut[-2] + 1:cut[-1]] if len(cut) > 1 else ""] if cut else []:
        name = _NAME_SUB_RE.sub("", lhs)
        if re.search(r"[A-Za-z]", name) and not re.search(r"[\d+\-*/^]|\\cdot|\\times", name):
            return re.sub(r"\\overline|m(?=\\angle)|[{}]", "", lhs), part[cut[-1] + 1:], part
    return "", part, part


def answer_parts(text: str) -> list[tuple[str, str, str]]:
    """`named_part` of each part of a raw answer (`split_parts`); a set, or braces that `normalize` drops (`{1,2,3}`),
    stands for the list of its elements, so `\\{1,2\\}`, `{1,2}` and `1, 2` compare alike."""
    normalised, ps = normalize(text), split_parts(text)
    if ps == [text] and len(inner := split_parts(re.sub(r"^\\\{(.*)\\\}$", r"\1", normalised))) > 1:
        ps = inner
    return [named_part(normalised)] if ps == [text] else [named_part(normalize(x)) for x in ps]


def elements(s: str) -> tuple[str, list[str]] | None:
    """A normalised tuple, interval or matrix as (kind, elements), else None. kind: the brackets and the length (`(]2`)
    or the matrix environment with its row lengths, so that only like compares with like."""
    if m := _MATRIX_RE.match(s):
        rows = [r.split("&") for r in m.group(2).split("\\\\") if r]
        return f"{m.group(1)}{[len(r) for r in rows]}", [c for r in rows for c in r]
    if s[:1] in "([" and s[-1:] in ")]" and len(items := split_parts(s[1:-1])) > 1:
        return f"{s[0]}{s[-1]}{len(items)}", items
    return None


def to_number(s: str) -> tuple[float, bool, bool] | None:
    """Plain numeric answer -> (value, is_integer_literal, had_percent), else None. Accepts 12, -3.5, .5, 1,000
    (thousands groups), \\frac{a}{b}, \\frac12, a/b, with an optional %."""
    if (m := _NUM_RE.match(s)) and (m.group(2) or m.group(3)):
        text = (m.group(2) or "0").replace(",", "") + (m.group(3) or "")
        return (-1 if m.group(1) else 1) * float(text), m.group(3) is None, bool(m.group(4))
    if (m := _FRAC_RE.match(s)) and int((ab := [x for x in m.group(2, 3, 4, 5, 6, 7) if x is not None])[1]) != 0:
        return (-1 if m.group(1) else 1) * int(ab[0]) / int(ab[1]), False, bool(m.group(8))
    return None


def numbers_match(p: float, g: float, rel_tol: float, gold_int: bool = False) -> bool:
    """MAYE's relative tolerance (for golds rounded to a few decimals); exact for an integer gold, so that `101` or
    `3.03` for `100` or `3` stay wrong (a 1% band around it would reward near misses), and for a gold of 0."""
    return p == g if gold_int or g == 0 else abs(p - g) <= rel_tol * abs(g)


def _too_big(s: str) -> str:
    """Reason if evaluating `s` could blow up time or memory, else '' (exponents' product <= 1e6 bounds the digits)."""
    if re.search(r"\d{5,}\s*!", s):
        return "too_large: factorial of a 5+ digit number"
    if re.search(r"(?:\^|\*\*)\s*(?:\{[^{}]*|\([^()]*)(?:\^|\*\*)", s):
        return "too_large: nested power"
    exponents = re.findall(r"(?:\^|\*\*)\s*[{(]?\s*-?(\d+)", s)  # no int() of a 100k-digit string
    big = math.prod(max(int(e), 1) if len(e) < 8 else 10**8 for e in exponents) > 10**6
    return "too_large: exponent product > 1e6" if big else ""


# ---- judging ---------------------------------------------------------------------------------------------------------
def match_all(preds: list, golds: list, same, ordered: bool) -> tuple[float, str]:
    """1.0 if the items are equal by `same(p, g) -> (accuracy, reason)`: pairwise if `ordered` (lists of one length),
    else as sets (each item of each list equals one of the other's, repeats aside); with the first reason seen."""
    if ordered:
        return next((r for p, g in zip(preds, golds) if not (r := same(p, g))[0]), (1.0, ""))
    res = [[same(p, g) for g in golds] for p in preds]
    ok = all(any(r[0] for r in row) for row in res) and all(any(row[j][0] for row in res) for j in range(len(golds)))
    return float(ok), next((r for row in res for _, r in row if r), "")


def same_part(p: str, g: str, cfg: RewardConfig) -> tuple[float, str]:
    """One normalised part or element: equal strings (an equation never equals a value); plain numbers (50% may mean
    50 or 0.5); tuples, intervals and matrices element by element; else math-verify, numbers by `numbers_match`."""
    if p == g or ("=" in p) != ("=" in g):  # `x^2+y^2=1` vs `1`: math-verify would compare the right side alone
        return float(p == g), ""
    if (pn := to_number(p)) is not None and (gn := to_number(g)) is not None:
        pv, gv = ([x[0], x[0] / 100] if x[2] else [x[0]] for x in (pn, gn))
        return float(any(numbers_match(a, b, cfg.rel_tol, gn[1]) for a in pv for b in gv)), ""
    if (pe := elements(p)) and (ge := elements(g)) and pe[0] == ge[0]:
        return match_all([normalize(x) for x in pe[1]], [normalize(x) for x in ge[1]],
                         lambda a, b: same_part(a, b, cfg), ordered=True)
    if why := next((f"{w} in {side}" for side, text in (("answer", g), ("pred", p)) if (w := _too_big(text))), ""):
        return 0.0, why
    import math_verify as mv  # lazy imports keep `import reward` and --help fast
    import sympy
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # parse failures on odd text are expected
    try:  # math-verify's timeouts off: the judge process is killed from outside instead
        G = mv.parse(f"${g}$", parsing_timeout=None, raise_on_error=True)  # [sympy expr, matched string]
        P = mv.parse(f"${p}$", parsing_timeout=None, raise_on_error=True)
        gv, pv = (complex(sympy.N(x[0], 15)) if x and isinstance(x[0], sympy.Expr) and x[0].is_number else None
                  for x in (G, P))  # two finite numbers: our tolerance decides (and verify's slow simplify is skipped)
        if gv is not None and pv is not None and all(abs(v.imag) < 1e-12 and math.isfinite(v.real) for v in (gv, pv)):
            return float(numbers_match(pv.real, gv.real, cfg.rel_tol, bool(G[0].is_Integer))), ""
        # allow_set_relation_comp: `x \geq 2` vs `[2, \infty)` in either order
        return float(mv.verify(G, P, timeout_seconds=None, raise_on_error=True, allow_set_relation_comp=True)), ""
    except Exception as e:  # third-party parser/sympy failure on odd text: per-item, reported in `reason`
        return 0.0, f"judge_error: {type(e).__name__}: {str(e)[:120]}"


def judge(pred: str, gold: str, cfg: RewardConfig = RewardConfig()) -> tuple[float, str]:
    """accuracy (1.0/0.0) and reason ('' when judged normally). After the checks below, part by part (`answer_parts`):
    the parts, as sets, equal by `same_part`, with the same name where both have one (`x=1, y=2` is neither `2` nor
    `x=2, y=1`), or in order against a tuple gold. Unbounded in time: called inside a judge process (score_batch)."""
    gold = (extract_boxed(gold) or gold) if "\\boxed" in gold or "\\fbox" in gold else gold
    for side, text in (("answer", gold), ("pred", pred)):  # 10x before normalising: it is cheap but O(n)
        if len(text) > 10 * cfg.max_answer_chars:
            return 0.0, f"too_long: {side} has {len(text)} chars > 10 x {cfg.max_answer_chars}"
    p, g = normalize(pred), normalize(gold)
    if not p or not g:
        return 0.0, "bad_input: answer is empty" if p else "empty_answer"
    for side, text in (("answer", g), ("pred", p)):  # before int()/sympy: on 100k digits they are slow or raise
        if len(text) > cfg.max_answer_chars:
            return 0.0, f"too_long: {side} has {len(text)} chars > {cfg.max_answer_chars}"
    if (up := units(pred)) and (ug := units(gold)) and up != ug:  # `12` may still equal `12 cm`
        return 0.0, ""
    if p == g:
        return 1.0, ""
    if gm := _CHOICE_GOLD_RE.match(g):  # multiple choice: one letter ("(B) 30", "B.", "B"), not "\text{A and C}"
        pm = _CHOICE_PRED_RE.match(bare := _WRAP_RE.sub(r"\1", pred).strip().strip("$").strip())
        return float(bool(pm) and pm.group(1) == gm.group(1) and len(split_parts(bare)) == 1), ""
    if (to_number(p) is None) != (to_number(g) is None):  # `1,22` against 1.22: read as a decimal comma
        pred, gold = (x.replace(",", ".") if re.fullmatch(r"-?\d+,\d+", x.strip(" $")) else x for x in (pred, gold))

    def same(a, b):  # a, b: named parts; a named value vs an equation: compare the whole parts
        if a[0] and b[0] and a[0] != b[0]:
            return 0.0, ""
        return same_part(*((a[1], b[1]) if ("=" in a[1]) == ("=" in b[1]) else (a[2], b[2])), cfg)
    preds, golds = answer_parts(pred), answer_parts(gold)
    if len(golds) == 1 and (e := elements(golds[0][1])) and e[0] == f"(){len(preds)}":  # `1, 3` or `{1,3}` for the
        preds = [named_part(f"({','.join(p[2] for p in preds)})")]  # point (1,3): its coordinates in order
    return match_all(preds, golds, same, ordered=False)


@functools.cache  # a failed load raises and is not cached
def load_fn(spec: str):
    """'path/file.py:func' -> the function. Raises ValueError/FileNotFoundError naming the problem."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise ValueError(f"--reward.fn must be 'path/file.py:func', got {spec!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--reward.fn: no file {path!r}")
    fn = runpy.run_path(path).get(name)
    if not callable(fn):
        raise ValueError(f"--reward.fn: {path!r} has no function {name!r}")
    return fn


def _result(score, accuracy, fmt, reason, pred=None, mixed=False) -> dict:
    return {"score": float(score), "accuracy": float(accuracy), "format": float(fmt), "reason": reason, "pred": pred,
            "mixed_language": mixed}


def _score_unbounded(response: str, answer: str, finished: bool, cfg: RewardConfig) -> dict:
    """The score formula at the top for one response, unbounded in time (it runs inside a judge process)."""
    pred, boxes = extract_answer(response, cfg.answer_fallback), extract_boxes(response)
    if len(boxes) > 1 and len(answer_parts(extract_boxed(answer) or answer)) > len(answer_parts(pred)):
        pred = ", ".join(boxes)  # a gold of several parts: the boxes together are the answer (as a set: repeats aside)
    fmt = float(bool(pred) and bool(boxes))
    if fmt and cfg.require_think:
        m = _THINK_RE.match(response)
        fmt = float(bool(m and m.group(1).strip()) and response.rfind("\\boxed") > response.find("</think>"))
    acc, reason = 0.0, "no_answer" if pred is None else ""
    if cfg.fn:
        try:
            acc = load_fn(cfg.fn)(response, answer)
        except Exception as e:  # user code: report per item (in `reason`) instead of killing the batch
            acc, reason = 0.0, f"fn_error: {type(e).__name__}: {str(e)[:120]}"
        if not isinstance(acc, numbers.Real) or not math.isfinite(acc):
            acc, reason = 0.0, f"fn_error: returned {acc!r}, expected a finite float"
    elif pred is not None:
        acc, reason = judge(pred, answer, cfg)
    mixed = bool(_CJK_RE.search(response))
    if not finished:
        return _result(cfg.penalty, acc, fmt, "truncated" + (f"; {reason}" if reason else ""), pred, mixed)
    return _result(acc + cfg.format_weight * fmt + cfg.language_penalty * mixed, acc, fmt, reason, pred, mixed)


# ---- scoring a batch in judge processes (pebble's ProcessPool) -------------------------------------------------------
_WARM_UP = (("2\\sqrt{3}", "\\sqrt{12}"), ("3.46", "2\\sqrt{3}"), ("[1,2)", "(1,2]"), ("x \\geq 2", "[2,\\infty)"),
            ("\\{2,1\\}", "\\{1,2\\}"), ("y=1+2x", "y=2x+1"), ("r^2\\pi", "\\pi r^2"))
_JUDGES: dict[tuple[int, int], pebble.ProcessPool] = {}  # (pid, workers) -> the pool this process made


def judges(workers: int) -> pebble.ProcessPool:
    """This process's pool of `workers` judges, made on first use and reused: forked (spawn would re-import a trainer's
    __main__), each dying with this process, and stopped before a spawned process (a rank) joins its children at exit,
    which precedes every atexit handler, pebble's own included (multiprocessing.Pool does the same)."""
    pool = _JUDGES.get((os.getpid(), workers))
    if pool is None or not pool.active:   # new, or stopped
        for p, g in _WARM_UP:  # one per math-verify path: its lazy imports (~1 s) are paid once, before the fork
            judge(p, g)
        pool = pebble.ProcessPool(workers, initializer=die_with_parent, context=multiprocessing.get_context("fork"))
        multiprocessing.util.Finalize(pool, pool.stop, exitpriority=11)
        multiprocessing.util.Finalize(pool, pool.join, exitpriority=10)
        _JUDGES[os.getpid(), workers] = pool
    return pool


def score_batch(responses: list[str], answers: list[str], finished: list[bool] | None = None,
                cfg: RewardConfig = RewardConfig()) -> list[dict]:
    """Score responses in order (the formula at the top): one {score, accuracy, format, reason, pred, mixed_language}
    each; a non-string response or answer scores 0 with reason bad_input (it is not sent: it may not pickle)."""
    finished = [True] * len(responses) if finished is None or not cfg.truncation_penalty else list(finished)
    if not len(responses) == len(answers) == len(finished):
        raise ValueError(f"score_batch: lengths differ: responses {len(responses)}, answers {len(answers)}, "
                         f"finished {len(finished)}")
    if cfg.num_workers < 0:
        raise ValueError(f"--reward.num-workers must be >= 0 (0 is taken as 1), got {cfg.num_workers}")
    if cfg.fn:
        load_fn(cfg.fn)  # fail fast, here, with a clear message, rather than once per item in the judges
    fail = [next((f"bad_input: {k} is {type(v).__name__}, expected str" for k, v in (("response", r), ("answer", a))
                  if not isinstance(v, str)), "") for r, a in zip(responses, answers)]
    pool = judges(max(cfg.num_workers, 1))
    futures = iter([pool.schedule(_score_unbounded, (r, a, bool(f), cfg), timeout=cfg.timeout_s)
                    for r, a, f, why in zip(responses, answers, finished, fail) if not why])
    out = []
    for f, why in zip(finished, fail):
        try:  # a result dict, or why there is none; any other error raises
            res = why or next(futures).result()
        except TimeoutError:
            res = f"timeout: exceeded {cfg.timeout_s} s"
        except pebble.ProcessExpired as e:
            res = f"worker_died: process exited with code {e.exitcode}"
        out.append(res if isinstance(res, dict) else _result(cfg.penalty if not f else 0.0, 0.0, 0.0, res))
    return out


@dataclass(frozen=True)
class Args:
    responses: str  # jsonl with `response` and `answer` fields (optional bool `finished`, default true).
    out: str = ""  # Where to write the scored jsonl (input fields + score/accuracy/format/reason/pred); empty = stdout.
    reward: RewardConfig = RewardConfig()


def main(args: Args) -> None:
    rows, t0 = read_jsonl(args.responses, ("response", "answer"), lambda r: "" if isinstance(
        r.get("finished", True), bool) else "field 'finished' must be true or false"), time.perf_counter()
    rows = [{**r, "answer": str(r["answer"]) if type(r["answer"]) in (int, float) else r["answer"]} for r in rows]
    res = score_batch([r["response"] for r in rows], [r["answer"] for r in rows],
                      [r.get("finished", True) for r in rows], args.reward)
    lines = "".join(json.dumps({**row, **s}, ensure_ascii=False) + "\n" for row, s in zip(rows, res))
    Path(args.out).write_text(lines, encoding="utf-8") if args.out else sys.stdout.write(lines)
    stats = {"responses": len(res), "seconds (with judge start-up)": round(time.perf_counter() - t0, 2)}
    for name, key in (("accuracy", "accuracy"), ("format rate", "format"), ("mean score", "score")):
        stats[name] = sum(s[key] for s in res) / max(len(res), 1)
    stats.update((f"reason/{k}", v) for k, v in Counter(s["reason"].split(":")[0] for s in res if s["reason"]).items())
    print("\n".join(f"{k:>40s}  {v:.4f}" if isinstance(v, float) else f"{k:>40s}  {v}" for k, v in stats.items()),
          file=sys.stderr if not args.out else sys.stdout)  # stdout stays pure jsonl when it carries the lines


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))

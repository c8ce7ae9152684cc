"""Rule-based rewards (stage 2 of the RL loop): answer extraction, accuracy/format/penalty scores, reflection stats.

Score of one response (MAYE, arXiv 2504.02587: accuracy + format + language penalty; truncated -> penalty instead):
    score = accuracy + format_weight * format + language_penalty * [response mixes in CJK script]
    score = penalty                       if the response has no stop token (finished=False)
accuracy is 1/0 from `judge`: the last \\boxed{...}/\\fbox{...} vs the gold answer, after MAYE-style normalisation
(degrees, %, units, \\text{}, `x=5`, choice letters); numbers (plain, or as math-verify parses them: 2\\sqrt{3}, \\pi/2)
are equal within rel_tol (exact for two integers); everything else (symbolic, sets, intervals, equations) goes to
math-verify's verify. Every judgement runs in a judge process forked from the caller and is bounded by timeout_s from
any calling thread: past it (a Python loop or one C call alike), or if it dies, the process is killed and replaced and
the item gets accuracy 0 with the reason (math-verify's own signal.alarm timeouts work on the main thread only).

Run alone:  python reward.py --responses R.jsonl [--out scored.jsonl] [--reward.num-workers 2]
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import numbers
import os
import queue
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REFLECTION_WORDS = ("re-check", "re-evaluate", "re-examine", "re-think", "recheck", "reevaluate", "reexamine",
                    "reevaluation", "rethink", "check again", "think again", "try again", "verify", "wait", "yet")


@dataclass(frozen=True)
class RewardConfig:
    format_weight: float = 0.0  # Weight of the format reward (boxed answer [+ <think> if required]); MAYE logs it.
    penalty: float = -0.1  # Score of a truncated response (no stop token), replacing the whole score (MAYE: -0.1).
    truncation_penalty: bool = True  # Give truncated responses the penalty (MAYE); off = judge them as finished.
    language_penalty: float = 0.0  # Added to the score when a response contains CJK characters; 0 disables.
    timeout_s: float = 5.0  # Wall-clock limit per judgement; past it the judge process is killed (reason 'timeout').
    num_workers: int = 2  # Judge processes, started once per process and reused (0 is taken as 1).
    rel_tol: float = 1e-2  # Numbers match if |pred-gold| <= rel_tol*|gold| (MAYE); two integers must be equal.
    answer_fallback: bool = False  # Without a \boxed{}, take the answer from 'the answer is X' / 'answer: X'.
    require_think: bool = False  # The format reward also requires <think>...</think> before the boxed answer.
    fn: str = ""  # Custom accuracy 'path/file.py:func', func(response, answer) -> float; empty = built-in judge.
    max_answer_chars: int = 1000  # Longer answers (10x that before normalising) are not judged: reason too_long.
    reflection_words: tuple[str, ...] = REFLECTION_WORDS  # A response containing one (lower-case) is reflective.


# ---- extraction and normalisation (pure, linear time, no recursion) --------------------------------------------------
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_RE = re.compile(r"\\.|[{}]", re.S)  # an escape (\{, \}, \\) is one token, so it never counts
_FALLBACK_RE = re.compile(r"answer\s*(?:is|:)\s*:?\s*\$*\s*([^\n$]+?)\s*\$*\s*(?:\.\s|\.?$|\n)", re.I | re.M)
_WRAP_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DEG_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree|\\circ|\s*degrees?$")
_UNITS = (r"(?:square\s+|sq\.?\s*)?(?:units?|cm|mm|km|m|in|inches|inch|ft|feet|foot|yd|yards?|meters?|"
          r"centimeters?|millimeters?|kilometers?|miles?)(?:\s*\^\s*\{?[23]\}?|²|³)?")
_UNIT_RE = re.compile(r"(?<=[\d}])\s*" + _UNITS + "$")  # `12 cm`, `5 units`: a unit word after a number
_TEXT_UNIT_RE = re.compile(r"\\(?:text|mathrm|mbox)\s*\{\s*" + _UNITS + r"\s*\}(?:\s*\^\s*\{?[23]\}?)?")
_LHS_RE = re.compile(r"^(?:m?\\angle ?[A-Za-z0-9]{1,4}|[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?|[A-Z]{2,3}|"
                     r"\\overline\{[A-Z]{2}\}|\\[a-zA-Z]+)$")
_CHOICE_GOLD_RE = re.compile(r"^\(?([A-H])\)?\.?$")
_CHOICE_PRED_RE = re.compile(r"^\(?([A-H])(?:\)|\.|:|,|\s|$)")
_NUM_RE = re.compile(r"^(-?)(\d{1,3}(?:,\d{3})+|\d+)?(\.\d+)?(%?)$")
_FRAC_RE = re.compile(r"^(-?)(?:\\frac\{(-?\d+)\}\{(\d+)\}|\\frac(\d)(\d)|(-?\d+)/(\d+))(%?)$")
_POW_RE = re.compile(r"(?:\^|\*\*)\s*(\{|\(|-?\d+)")
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_THINK_RE = re.compile(r"^\s*<think>(.+?)</think>", re.S)


def extract_boxed(text: str) -> str | None:
    """Content of the last *closed* \\boxed{...} or \\fbox{...} (nested braces; \\{ \\} do not count), else None. An
    unclosed last box (truncated response) falls back to the previous closed one. One pass with a brace stack: O(n)."""
    starts, stack, close = [m.end() for m in _BOX_RE.finditer(text)], [], {}  # starts: index after each box's "{"
    for tok in _BRACE_RE.finditer(text, starts[0] - 1) if starts else ():
        if tok.group() == "{":
            stack.append(tok.end())
        elif tok.group() == "}" and stack:
            close[stack.pop()] = tok.start()
    return next((text[s:close[s]].strip() for s in reversed(starts) if s in close), None)


def extract_answer(response: str, fallback: bool = False) -> str | None:
    """Last boxed answer; with `fallback`, else the last 'the answer is X' / 'answer: X'."""
    boxed = extract_boxed(response)
    hits = _FALLBACK_RE.findall(response) if boxed is None and fallback else []
    return hits[-1].strip() if hits else boxed


def normalize(s: str) -> str:
    """MAYE-style answer normalisation: strip $, \\left/\\right, spacing macros, \\text{} wrappers, degrees, units after
    a number, a trailing '.', enclosing braces; \\dfrac -> \\frac, \\% -> %; whitespace removed except after a command
    name followed by a letter (`\\pi r`)."""
    s = s.strip().strip("$").strip()
    for tok in ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ "):
        s = s.replace(tok, " " if tok == "\\ " else "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%").replace("\\$", "")
    s = _TEXT_UNIT_RE.sub("", s)  # `25\pi \text{ cm}^2`: a \text{} unit goes wherever it stands
    for _ in range(3):  # nested wrappers, e.g. \text{\textbf{A}}
        s = _WRAP_RE.sub(r"\1", s)
    s = _UNIT_RE.sub("", _DEG_RE.sub("", s).strip()).strip()
    s = s[:-1] if len(s) > 1 and s.endswith(".") else s
    # `{{1}}` -> `1`: strip k enclosing pairs, fewer if the depth dips inside (`{1}+{2}`: the first { closes early)
    k, depth, low = min(len(s) - len(s.lstrip("{")), len(s) - len(s.rstrip("}"))), 0, 0
    for c in s[k:len(s) - k]:
        depth += (c == "{") - (c == "}")
        low = min(low, depth)
    k += low
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\0", s[k:len(s) - k] if k > 0 else s)  # keep `\pi r`'s space
    return re.sub(r"\s+", "", s).replace("\0", " ")


def _strip_lhs(s: str) -> str:  # `x=5` -> `5`, `\angle ABC = 2+3 = 5` -> `5`: when the first side is a name
    parts = s.replace("\\approx", "=").split("=")
    return parts[-1] if len(parts) > 1 and parts[-1] and _LHS_RE.match(parts[0]) else s


def to_number(s: str) -> tuple[float, bool, bool] | None:
    """Plain numeric answer -> (value, is_integer_literal, had_percent), else None. Accepts 12, -3.5, .5, 1,000
    (thousands groups), \\frac{a}{b}, \\frac12, a/b, with an optional %."""
    if (m := _NUM_RE.match(s)) and (m.group(2) or m.group(3)):
        text = (m.group(2) or "0").replace(",", "") + (m.group(3) or "")
        return (-1 if m.group(1) else 1) * float(text), m.group(3) is None, bool(m.group(4))
    if m := _FRAC_RE.match(s):
        a, b = [x for x in m.group(2, 3, 4, 5, 6, 7) if x is not None]
        if int(b) != 0:
            return (-1 if m.group(1) else 1) * int(a) / int(b), False, bool(m.group(8))
    return None


def numbers_match(p: float, g: float, rel_tol: float, both_int: bool = False) -> bool:
    """|p - g| <= rel_tol * |g| (MAYE's relative tolerance); exact when both are integer literals, so that `101` vs
    `100` stays wrong (a 1% band around an integer answer would reward near misses), and when g is 0."""
    return p == g if both_int or g == 0 else abs(p - g) <= rel_tol * abs(g)


def _too_big(s: str) -> str:
    """Reason if evaluating `s` could blow up time or memory, else '': a factorial of a 5+ digit number, a nested
    power, or literal exponents whose product exceeds 1e6 (that bounds the digits)."""
    if re.search(r"\d{5,}\s*!", s):
        return "too_large: factorial of a 5+ digit number"
    product = 1
    for m in _POW_RE.finditer(s):
        if (tok := m.group(1)) in "{(":  # scan the bracketed exponent for a nested power
            close, depth, i = "}" if tok == "{" else ")", 1, m.end()
            while i < len(s) and depth:
                if s[i] == "^" or s.startswith("**", i):
                    return "too_large: nested power"
                depth, i = depth + (s[i] == tok) - (s[i] == close), i + 1
            inner = s[m.end():i - 1].strip()
            tok = inner if re.fullmatch(r"-?\d+", inner) else "1"
        product *= max(abs(int(tok)), 1) if len(tok) < 8 else 10**8  # no int() of a 100k-digit string
        if product > 10**6:
            return "too_large: exponent product > 1e6"
    return ""


# ---- judging ---------------------------------------------------------------------------------------------------------
def _sympy_number(x) -> float | None:
    """Float value of a sympy number (not a relation/set/symbolic expr), else None."""
    import sympy
    if not isinstance(x, sympy.Expr) or not x.is_number:
        return None
    v = complex(sympy.N(x, 15))
    return v.real if abs(v.imag) < 1e-12 and math.isfinite(v.real) else None


def judge(pred: str, gold: str, cfg: RewardConfig = RewardConfig()) -> tuple[float, str]:
    """accuracy (1.0/0.0) and reason ('' when judged normally). Order: length guard, string equality after `normalize`,
    choice letters, `x=` stripping, plain-number fast path, size guards, math-verify parse; two numbers are decided by
    `numbers_match`, anything else by math-verify's verify (gold first: it is asymmetric). Unbounded in time: called
    inside a judge worker (score_batch)."""
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
    if p == g:
        return 1.0, ""
    if gm := _CHOICE_GOLD_RE.match(g):  # multiple choice: compare letters only ("(B) 30", "B.", "B")
        pm = _CHOICE_PRED_RE.match(_WRAP_RE.sub(r"\1", pred).strip().strip("$").strip())
        return float(bool(pm) and pm.group(1) == gm.group(1)), ""
    p, g = (_strip_lhs(p), g) if "=" not in g else (p, g if "=" in p else _strip_lhs(g))
    if p == g or ("=" in p) != ("=" in g):  # `x^2+y^2=1` vs `1`: math-verify would compare the right side alone
        return float(p == g), ""
    if (pn := to_number(p)) is not None and (gn := to_number(g)) is not None:
        pv = [pn[0], pn[0] / 100] if pn[2] else [pn[0]]  # 50% may be meant as 50 or as 0.5
        gv = [gn[0], gn[0] / 100] if gn[2] else [gn[0]]
        return float(any(numbers_match(a, b, cfg.rel_tol, pn[1] and gn[1]) for a in pv for b in gv)), ""
    for side, text in (("answer", g), ("pred", p)):
        if why := _too_big(text):
            return 0.0, f"{why} in {side}"
    import logging  # lazy imports keep `import reward` and --help fast

    import math_verify as mv
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # parse failures on odd text are expected
    try:  # math-verify's timeouts off: the judge process is killed from outside instead
        G = mv.parse(f"${g}$", parsing_timeout=None, raise_on_error=True)  # [sympy expr, matched string]
        P = mv.parse(f"${p}$", parsing_timeout=None, raise_on_error=True)
        gv, pv = (_sympy_number(G[0]) if G else None), (_sympy_number(P[0]) if P else None)
        if gv is not None and pv is not None:  # two numbers: our tolerance decides, and we skip verify's slow simplify
            return float(numbers_match(pv, gv, cfg.rel_tol, bool(G[0].is_Integer and P[0].is_Integer))), ""
        # allow_set_relation_comp: `x \geq 2` vs `[2, \infty)` in either order
        return float(mv.verify(G, P, timeout_seconds=None, raise_on_error=True, allow_set_relation_comp=True)), ""
    except Exception as e:  # third-party parser/sympy failure on odd text: per-item, reported in `reason`
        return 0.0, f"judge_error: {type(e).__name__}: {str(e)[:120]}"


_FN_CACHE: dict[str, object] = {}


def load_fn(spec: str):
    """'path/file.py:func' -> the function (cached). Raises ValueError/FileNotFoundError naming the problem."""
    if spec not in _FN_CACHE:
        path, sep, name = spec.rpartition(":")
        if not sep or not path or not name:
            raise ValueError(f"reward.fn must be 'path/file.py:func', got {spec!r}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reward.fn: no file {path!r}")
        mod_spec = importlib.util.spec_from_file_location(f"_vlrl_reward_fn_{len(_FN_CACHE)}", path)
        mod_spec.loader.exec_module(module := importlib.util.module_from_spec(mod_spec))
        if not callable(getattr(module, name, None)):
            raise ValueError(f"reward.fn: {path!r} has no function {name!r}")
        _FN_CACHE[spec] = getattr(module, name)
    return _FN_CACHE[spec]


def _result(score, accuracy, fmt, reason, pred=None, mixed=False) -> dict:
    return {"score": float(score), "accuracy": float(accuracy), "format": float(fmt), "reason": reason, "pred": pred,
            "mixed_language": mixed}


def _score_unbounded(response: str, answer: str, finished: bool, cfg: RewardConfig) -> dict:
    """The score formula at the top for one response, unbounded in time (it runs inside a judge worker)."""
    pred = extract_answer(response, cfg.answer_fallback)
    fmt = float(bool(pred) and extract_boxed(response) is not None)
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


# ---- the judge pool: processes forked from this one, one item in flight each, killed and replaced past the limit ----
# One judgement per math-verify path (sympy numbers, intervals, relations, sets, equations, symbols), made here before
# the first fork, so that the lazy imports (~1 s) are paid once and outside every item's time limit.
_WARM_UP = (("2\\sqrt{3}", "\\sqrt{12}"), ("3.46", "2\\sqrt{3}"), ("[1,2)", "(1,2]"), ("x \\geq 2", "[2,\\infty)"),
            ("\\{2,1\\}", "\\{1,2\\}"), ("y=1+2x", "y=2x+1"), ("r^2\\pi", "\\pi r^2"))
_POOL: list = []  # per judge slot: None or [process, connection]; made by the process _POOL_PID
_POOL_PID, _POOL_LOCK = 0, threading.Lock()


def _worker_main(conn) -> None:
    """A judge process: answer each (response, answer, finished, cfg) with its result dict (or the exception of a bug
    here), until EOF. It dies with the thread that forked it (Linux PR_SET_PDEATHSIG); Ctrl-C is its parent's."""
    import ctypes
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        try:
            conn.send(_score_unbounded(*item))
        except Exception as e:
            conn.send(e)


def _judge_in(slot: int, item: tuple | None, cfg: RewardConfig) -> dict | str:
    """Item (response, answer, finished) judged in _POOL[slot], forked first if it is missing or dead (fork: spawn
    would re-import the caller's __main__, train.py with torch), or why not: then the process is killed."""
    import multiprocessing as mp
    if not _POOL[slot] or not _POOL[slot][0].is_alive():
        conn, child = mp.Pipe()
        _POOL[slot] = [mp.get_context("fork").Process(target=_worker_main, args=(child,), daemon=True), conn]
        _POOL[slot][0].start()
        child.close()  # only the judge holds that end now: its death is EOF here
    if item is None:
        return ""
    proc, conn = _POOL[slot]
    try:
        conn.send((*item, cfg))
        res = conn.recv() if conn.poll(cfg.timeout_s) else f"timeout: judgement exceeded {cfg.timeout_s} s"
    except (EOFError, OSError):
        res = f"worker_died: judge process exited with code {proc.join(1) or proc.exitcode}"
    if isinstance(res, BaseException):
        raise res
    if isinstance(res, str):
        proc.kill()
        proc.join()
    return res


def close_pool() -> None:
    """Kill the judge processes (registered with atexit); the next batch forks new ones."""
    for proc, _ in [w for w in _POOL if w] if _POOL_PID == os.getpid() else []:  # not a forked child's parent's
        proc.kill()
        proc.join()
    _POOL.clear()


def score_batch(responses: list[str], answers: list[str], finished: list[bool] | None = None,
                cfg: RewardConfig = RewardConfig()) -> list[dict]:
    """Score lists of responses (the formula at the top), in order, on max(cfg.num_workers, 1) judge processes reused
    across calls, each fed one item at a time by a thread of its own; every item within cfg.timeout_s whichever thread
    calls. Returns one {score, accuracy, format, reason, pred, mixed_language} per response."""
    global _POOL_PID
    finished = [True] * len(responses) if finished is None or not cfg.truncation_penalty else list(finished)
    if not len(responses) == len(answers) == len(finished):
        raise ValueError(f"score_batch: lengths differ: responses {len(responses)}, answers {len(answers)}, "
                         f"finished {len(finished)}")
    if cfg.num_workers < 0:
        raise ValueError(f"--reward.num-workers must be >= 0 (0 is taken as 1), got {cfg.num_workers}")
    if cfg.fn:
        load_fn(cfg.fn)  # fail fast, here, with a clear message, rather than once per item in the judges
    out, todo, n, stop = [None] * len(responses), queue.SimpleQueue(), max(cfg.num_workers, 1), False
    for i, (r, a, f) in enumerate(zip(responses, answers, finished)):
        if bad := [f"bad_input: {k} is {type(v).__name__}, expected str" for k, v in (("response", r), ("answer", a))
                   if not isinstance(v, str)]:  # not sent: a non-string may not even pickle
            out[i] = _result(cfg.penalty if not f else 0.0, 0.0, 0.0, bad[0])
        else:
            todo.put((i, r, a, bool(f)))

    def feed(slot: int) -> None:  # one thread per judge process, one item at a time
        while not stop:
            try:
                i, *item = todo.get_nowait()
            except queue.Empty:
                return
            res = _judge_in(slot, item, cfg)
            out[i] = res if isinstance(res, dict) else _result(cfg.penalty if not item[2] else 0.0, 0.0, 0.0, res)

    with _POOL_LOCK:
        if _POOL_PID != os.getpid() or len(_POOL) != n:
            close_pool()
            for pred, gold in _WARM_UP:
                judge(pred, gold)
            atexit.unregister(close_pool)  # registered once, however many pools a process makes
            atexit.register(close_pool)
            _POOL[:], _POOL_PID = [None] * n, os.getpid()
        for k in range(n):  # forked by this thread, they live as long as it does (replacements: one batch)
            _judge_in(k, None, cfg)
        try:
            with ThreadPoolExecutor(n, thread_name_prefix="reward-judge") as ex:
                futures = [ex.submit(feed, k) for k in range(n)]
                try:
                    for f in futures:
                        f.result()
                finally:
                    stop = True  # after an error or Ctrl-C the other threads stop after their current item
        except BaseException:  # in-flight items would leak into the next call: start afresh
            close_pool()
            raise
    return out


def score_response(response: str, answer: str, finished: bool = True, cfg: RewardConfig = RewardConfig()) -> dict:
    """score_batch for one response: {score, accuracy, format, reason, pred, mixed_language}."""
    return score_batch([response], [answer], [finished], cfg)[0]


def reflection_stats(responses: list[str], correct: list[bool], words=REFLECTION_WORDS) -> dict:
    """MAYE's reflection statistics: five ratios (0 when a denominator is 0) and per-word total occurrences `words/<w>`.
    N responses, R = contain any word (lower-case substring), C = correct, RC = both: reflection_ratio R/N,
    ..._in_correct_answers RC/C, ..._in_incorrect_answers (R-RC)/(N-C), correct_ratio_in_reflection_texts RC/R,
    correct_ratio_in_no_reflection_texts (C-RC)/(N-R)."""
    if len(responses) != len(correct):
        raise ValueError(f"reflection_stats: {len(responses)} responses but {len(correct)} correct flags")
    if bad := [k for k, text in enumerate(responses) if not isinstance(text, str)]:
        raise ValueError(f"reflection_stats: responses[{bad[0]}] is {type(responses[bad[0]]).__name__}, expected str")
    hits = [{w: low.count(w) for w in words} for low in map(str.lower, responses)]
    refl, ok = [any(h.values()) for h in hits], [bool(c) for c in correct]
    n, r, c, rc = len(ok), sum(refl), sum(ok), sum(x and y for x, y in zip(refl, ok))

    def div(a, b):
        return a / b if b else 0.0

    return {"reflection_ratio": div(r, n), "reflection_ratio_in_correct_answers": div(rc, c),
            "reflection_ratio_in_incorrect_answers": div(r - rc, n - c),
            "correct_ratio_in_reflection_texts": div(rc, r), "correct_ratio_in_no_reflection_texts": div(c - rc, n - r),
            **{f"words/{w}": sum(h[w] for h in hits) for w in words}}


# ---- CLI -------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Args:
    responses: str = ""  # jsonl with `response` and `answer` fields (optional bool `finished`, default true).
    out: str = ""  # Where to write the scored jsonl (input fields + score/accuracy/format/reason/pred); empty = stdout.
    reward: RewardConfig = RewardConfig()


def read_jsonl(path: str) -> list[dict]:
    """Rows with str `response` and `answer` (a JSON number is turned into a str), optional bool `finished`; a bad line
    raises ValueError naming path:line."""
    rows = []
    for k, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{k}: invalid JSON ({e})") from e
        if row is None:
            continue
        if missing := [f for f in ("response", "answer") if not isinstance(row, dict) or f not in row]:
            raise ValueError(f"{path}:{k}: missing field {missing[0]!r} (a JSON object with response, answer needed)")
        row["answer"] = str(row["answer"]) if type(row["answer"]) in (int, float) else row["answer"]  # not a bool
        for field, typ in (("response", str), ("answer", str), ("finished", bool)):
            if not isinstance(row.get(field, typ()), typ):
                raise ValueError(f"{path}:{k}: field {field!r} is {type(row[field]).__name__}, expected {typ.__name__}")
        rows.append(row)
    return rows


def main(args: Args) -> None:
    if not args.responses:
        raise SystemExit("--responses is required (a jsonl with `response` and `answer` fields)")
    rows, t0 = read_jsonl(args.responses), time.perf_counter()
    res = score_batch([r["response"] for r in rows], [r["answer"] for r in rows],
                      [r.get("finished", True) for r in rows], args.reward)
    lines = "".join(json.dumps({**row, **s}, ensure_ascii=False) + "\n" for row, s in zip(rows, res))
    Path(args.out).write_text(lines, encoding="utf-8") if args.out else sys.stdout.write(lines)
    n = max(len(res), 1)
    stats = {"responses": len(res), "seconds (with judge start-up)": round(time.perf_counter() - t0, 2),
             "accuracy": sum(s["accuracy"] for s in res) / n, "format rate": sum(s["format"] for s in res) / n,
             "mean score": sum(s["score"] for s in res) / n,
             **reflection_stats([r["response"] for r in rows], [s["accuracy"] > 0 for s in res],
                                args.reward.reflection_words),
             **{f"reason/{k}": v for k, v in Counter(s["reason"].split(":")[0] for s in res if s["reason"]).items()}}
    print("\n".join(f"{k:>40s}  {v:.4f}" if isinstance(v, float) else f"{k:>40s}  {v}" for k, v in stats.items()),
          file=sys.stderr if not args.out else sys.stdout)  # stdout stays pure jsonl when it carries the lines


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))

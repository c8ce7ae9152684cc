"""Rule-based rewards: answer extraction, accuracy/format/penalty scores, reflection statistics (stage 2).

Score of one response (MAYE: accuracy + format + language penalty; truncated -> penalty instead):
    score = accuracy + format_weight * format + language_penalty * [response mixes in CJK script]
    score = penalty                       if the response has no stop token (finished=False)
accuracy is 1/0 from `judge`: the last \\boxed{...}/\\fbox{...} vs the gold answer, after MAYE-style
normalisation (degrees, %, units, \\text{}, `x=5`, choice letters); numbers (plain, or as math-verify parses
them: 2\\sqrt{3}, \\pi/2) are equal within rel_tol (exact for two integers); everything else (symbolic, sets,
intervals, equations) goes to math-verify's verify.

Bounded time, always: math-verify's own timeout is signal.alarm, which does nothing off the main thread.
We disable it and bound every judgement ourselves:
  * num_workers >= 1: a persistent pool of plain subprocesses (fork+exec via subprocess, so nothing of the
    caller's torch state, threads or __main__ is inherited or re-imported; ~65 MB each). Start-up costs
    ~1.5 s of CPU per worker (sympy + math-verify import and warm-up), paid once per process; a judgement
    past timeout_s gets its worker SIGKILLed and restarted (that cost again: the price of a hang).
    IPC costs the caller ~0.15 ms of CPU per item; judging ~0.1 ms (fast paths) to ~35 ms (latex parse).
  * num_workers = 0 and score_response: a helper thread per call; on timeout we raise an exception inside it
    (PyThreadState_SetAsyncExc). That stops Python-level loops (sympy) but not one long C call, so big-number
    inputs are refused up front (`_too_big`). A stop can land anywhere (once: inside a lazy import, which
    broke every later judgement), so lazy imports are paid up front and canary judgements re-checked after
    each stop (`warm_up`). The pool is the safe choice for untrusted text.
Simplifications: one batch at a time per process (a lock serialises concurrent score_batch calls).

Run alone:
    python reward.py --responses R.jsonl [--out scored.jsonl] [--reward.num-workers 2]
    python reward.py --help
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import importlib.util
import json
import math
import numbers
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

REFLECTION_WORDS = ("re-check", "re-evaluate", "re-examine", "re-think", "recheck", "reevaluate", "reexamine",
                    "reevaluation", "rethink", "check again", "think again", "try again", "verify", "wait", "yet")


@dataclass(frozen=True)
class RewardConfig:
    format_weight: float = 0.0
    """Weight of the format reward (boxed answer present [+ <think> if required]) in the score; MAYE logs it."""
    penalty: float = -0.1
    """Score of a response without stop token (truncated), replacing the whole score (MAYE: -0.1)."""
    truncation_penalty: bool = True
    """Give truncated responses the penalty score (MAYE); off = judge them like finished ones."""
    language_penalty: float = 0.0
    """Added to the score when a response contains CJK characters (language mixing); 0 disables."""
    timeout_s: float = 5.0
    """Wall-clock limit per judgement; past it accuracy is 0 with reason 'timeout'."""
    num_workers: int = 2
    """Judge processes for score_batch (0 = in-process, thread-bounded, sequential)."""
    rel_tol: float = 1e-2
    """Relative tolerance |pred-gold| <= rel_tol*|gold| for numeric answers (MAYE); two integers must match."""
    answer_fallback: bool = False
    """Without a \\boxed{}, take the answer from 'the answer is X' / 'answer: X'."""
    require_think: bool = False
    """Format reward also requires <think>...</think> before the boxed answer."""
    fn: str = ""
    """Custom accuracy 'path/file.py:func', func(response: str, answer: str) -> float; empty = built-in judge."""
    max_answer_chars: int = 1000
    """Answers longer than this (10x that before normalising) are not judged: accuracy 0, reason too_long."""
    reflection_words: tuple[str, ...] = REFLECTION_WORDS
    """Words whose presence marks a reflective response (lower-case substring test, MAYE's 15 words)."""


# ------------------------------------------------------------------------------------------------------------
# extraction and normalisation (pure string functions, linear time, no recursion)
# ------------------------------------------------------------------------------------------------------------
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_RE = re.compile(r"\\.|[{}]", re.S)  # an escape (\{, \}, \\) is one token, so it never counts


def extract_boxed(text: str) -> str | None:
    """Content of the last *closed* \\boxed{...} or \\fbox{...} (nested braces; \\{ \\} do not count).

    An unclosed last box (truncated response) falls back to the previous closed one; None if there is none.
    One pass with a stack of open braces: O(len(text)) however many boxes or braces there are.
    """
    starts = [m.end() for m in _BOX_RE.finditer(text)]  # index just after each box's "{"
    if not starts:
        return None
    stack, close = [], {}
    for tok in _BRACE_RE.finditer(text, starts[0] - 1):
        if tok.group() == "{":
            stack.append(tok.end())
        elif tok.group() == "}" and stack:
            close[stack.pop()] = tok.start()
    for start in reversed(starts):
        if start in close:
            return text[start:close[start]].strip()
    return None


_FALLBACK_RE = re.compile(r"answer\s*(?:is|:)\s*:?\s*\$*\s*([^\n$]+?)\s*\$*\s*(?:\.\s|\.?$|\n)", re.I | re.M)


def extract_answer(response: str, fallback: bool = False) -> str | None:
    """Last boxed answer; with `fallback`, else the last 'the answer is X' / 'answer: X'."""
    boxed = extract_boxed(response)
    if boxed is not None or not fallback:
        return boxed
    hits = _FALLBACK_RE.findall(response)
    return hits[-1].strip() if hits else None


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


def normalize(s: str) -> str:
    """MAYE-style answer normalisation: strip $, \\left/\\right, spacing macros, \\text{} wrappers, degrees,
    units after a number, trailing '.', \\dfrac->\\frac, \\% -> %; whitespace removed except between a
    command and a letter (`\\pi r`)."""
    s = s.strip().strip("$").strip()
    for tok in ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ "):
        s = s.replace(tok, " " if tok == "\\ " else "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%").replace("\\$", "")
    s = _TEXT_UNIT_RE.sub("", s)  # `25\pi \text{ cm}^2`: a \text{} unit goes wherever it stands
    for _ in range(3):  # nested wrappers, e.g. \text{\textbf{A}}
        s = _WRAP_RE.sub(r"\1", s)
    s = _DEG_RE.sub("", s).strip()
    s = _UNIT_RE.sub("", s).strip()
    if len(s) > 1 and s.endswith("."):
        s = s[:-1]
    s = _strip_outer_braces(s)
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\0", s)  # keep the space that ends a command name
    return re.sub(r"\s+", "", s).replace("\0", " ")


def _strip_outer_braces(s: str) -> str:
    """`{{1}}` -> `1` in one pass: strip k enclosing pairs, k limited by how low the depth dips inside."""
    k = min(len(s) - len(s.lstrip("{")), len(s) - len(s.rstrip("}")))
    depth = low = 0
    for c in s[k:len(s) - k]:
        depth += (c == "{") - (c == "}")
        low = min(low, depth)
    k += low  # `{1}+{2}`: the inner dip to -1 shows the first { closes early, so strip nothing
    return s[k:len(s) - k] if k > 0 else s


def _strip_lhs(s: str) -> str:
    """`x=5` -> `5`, `\\angle ABC = 2+3 = 5` -> `5`: last side when the first side is a simple name."""
    parts = s.replace("\\approx", "=").split("=")
    return parts[-1] if len(parts) > 1 and parts[-1] and _LHS_RE.match(parts[0]) else s


_NUM_RE = re.compile(r"^(-?)(\d{1,3}(?:,\d{3})+|\d+)?(\.\d+)?(%?)$")
_FRAC_RE = re.compile(r"^(-?)(?:\\frac\{(-?\d+)\}\{(\d+)\}|\\frac(\d)(\d)|(-?\d+)/(\d+))(%?)$")


def to_number(s: str) -> tuple[float, bool, bool] | None:
    """Plain numeric answer -> (value, is_integer_literal, had_percent); None if not a plain number.

    Accepts 12, -3.5, .5, 1,000 (thousands groups), \\frac{a}{b}, \\frac12, a/b, with an optional %."""
    m = _NUM_RE.match(s)
    if m and (m.group(2) or m.group(3)):
        text = (m.group(2) or "0").replace(",", "") + (m.group(3) or "")
        return (-1 if m.group(1) else 1) * float(text), m.group(3) is None, bool(m.group(4))
    m = _FRAC_RE.match(s)
    if m:
        a, b = [x for x in m.group(2, 3, 4, 5, 6, 7) if x is not None]
        if int(b) != 0:
            return (-1 if m.group(1) else 1) * int(a) / int(b), False, bool(m.group(8))
    return None


def numbers_match(p: float, g: float, rel_tol: float, both_int: bool = False) -> bool:
    """|p - g| <= rel_tol * |g| (MAYE's relative tolerance); exact when both are integer literals, so that
    `101` vs `100` stays wrong (a 1% band around an integer answer would reward near misses)."""
    if both_int or g == 0:
        return p == g
    return abs(p - g) <= rel_tol * abs(g)


_POW_RE = re.compile(r"(?:\^|\*\*)\s*(\{|\(|-?\d+)")


def _too_big(s: str) -> str:
    """Reason string if evaluating `s` could blow up (power towers, huge exponents/factorials), else ''.

    Nested powers are refused; the product of literal exponents is capped at 1e6 (bounds the digits)."""
    if re.search(r"\d{5,}\s*!", s):
        return "too_large: factorial of a 5+ digit number"
    product = 1
    for m in _POW_RE.finditer(s):
        tok = m.group(1)
        if tok in "{(":  # scan the bracketed exponent for a nested power
            close, depth, i = "}" if tok == "{" else ")", 1, m.end()
            while i < len(s) and depth:
                if s[i] == "^" or s.startswith("**", i):
                    return "too_large: nested power"
                depth += (s[i] == tok) - (s[i] == close)
                i += 1
            inner = s[m.end():i - 1].strip()
            tok = inner if re.fullmatch(r"-?\d+", inner) else "1"
        product *= max(abs(int(tok)), 1) if len(tok) < 8 else 10**8  # no int() of a 100k-digit string
        if product > 10**6:
            return "too_large: exponent product > 1e6"
    return ""


# ------------------------------------------------------------------------------------------------------------
# judging
# ------------------------------------------------------------------------------------------------------------
def _math_verify():
    """Lazy import (keeps `import reward` and --help fast); silences math-verify's expected-parse warnings."""
    import logging

    import math_verify
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def _sympy_number(x) -> float | None:
    """Float value of a sympy number (not a relation/set/symbolic expr), else None."""
    import sympy
    if not isinstance(x, sympy.Expr) or not x.is_number:
        return None
    v = complex(sympy.N(x, 15))
    return v.real if abs(v.imag) < 1e-12 and math.isfinite(v.real) else None


def judge(pred: str, gold: str, cfg: RewardConfig = RewardConfig()) -> tuple[float, str]:
    """accuracy (1.0/0.0) and reason ('' when judged normally). Order: length guard, string equality after
    `normalize`, choice letters, `x=` stripping, plain-number fast path, size guards, math-verify parse;
    two numbers are decided by `numbers_match`, anything else by math-verify's verify (gold first: it is
    asymmetric). Unbounded in time: call it through score_response / score_batch."""
    if "\\boxed" in gold or "\\fbox" in gold:
        gold = extract_boxed(gold) or gold
    for side, text in (("answer", gold), ("pred", pred)):  # 10x before normalising: it is cheap but O(n)
        if len(text) > 10 * cfg.max_answer_chars:
            return 0.0, f"too_long: {side} has {len(text)} chars > 10 x {cfg.max_answer_chars}"
    p, g = normalize(pred), normalize(gold)
    if not p:
        return 0.0, "empty_answer"
    if not g:
        return 0.0, "bad_input: answer is empty"
    for side, text in (("answer", g), ("pred", p)):  # before int()/sympy: on 100k digits they are slow or raise
        if len(text) > cfg.max_answer_chars:
            return 0.0, f"too_long: {side} has {len(text)} chars > {cfg.max_answer_chars}"
    if p == g:
        return 1.0, ""
    if gm := _CHOICE_GOLD_RE.match(g):  # multiple choice: compare letters only ("(B) 30", "B.", "B")
        pm = _CHOICE_PRED_RE.match(_WRAP_RE.sub(r"\1", pred).strip().strip("$").strip())
        return float(bool(pm) and pm.group(1) == gm.group(1)), ""
    p, g = (_strip_lhs(p), g) if "=" not in g else (p, g if "=" in p else _strip_lhs(g))
    if p == g:
        return 1.0, ""
    if ("=" in p) != ("=" in g):  # `x^2+y^2=1` vs `1`: math-verify would compare the right side alone
        return 0.0, ""
    pn, gn = to_number(p), to_number(g)
    if pn is not None and gn is not None:
        pv = [pn[0], pn[0] / 100] if pn[2] else [pn[0]]  # 50% may be meant as 50 or as 0.5
        gv = [gn[0], gn[0] / 100] if gn[2] else [gn[0]]
        return float(any(numbers_match(a, b, cfg.rel_tol, pn[1] and gn[1]) for a in pv for b in gv)), ""
    for side, text in (("answer", g), ("pred", p)):
        if why := _too_big(text):
            return 0.0, f"{why} in {side}"
    mv = _math_verify()
    try:  # timeouts off: the signal-based ones are useless off the main thread; we bound time outside
        G = mv.parse(f"${g}$", parsing_timeout=None, raise_on_error=True)  # [sympy expr, matched string]
        P = mv.parse(f"${p}$", parsing_timeout=None, raise_on_error=True)
        gv, pv = (_sympy_number(G[0]) if G else None), (_sympy_number(P[0]) if P else None)
        if gv is not None and pv is not None:  # two numbers: our tolerance decides, and we skip verify's
            both_int = bool(G[0].is_Integer and P[0].is_Integer)  # slow simplify (70-800 ms when unequal)
            return float(numbers_match(pv, gv, cfg.rel_tol, both_int)), ""
        # allow_set_relation_comp: `x \geq 2` vs `[2, \infty)` in either order
        return float(mv.verify(G, P, timeout_seconds=None, raise_on_error=True, allow_set_relation_comp=True)), ""
    except Exception as e:  # third-party parser/sympy failure on odd text: per-item, reported in `reason`
        return 0.0, f"judge_error: {type(e).__name__}: {str(e)[:120]}"


_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_THINK_RE = re.compile(r"^\s*<think>(.+?)</think>", re.S)
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
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        if not callable(getattr(module, name, None)):
            raise ValueError(f"reward.fn: {path!r} has no function {name!r}")
        _FN_CACHE[spec] = getattr(module, name)
    return _FN_CACHE[spec]


def _result(score, accuracy, fmt, reason, pred, mixed=False) -> dict:
    return {"score": float(score), "accuracy": float(accuracy), "format": float(fmt), "reason": reason,
            "pred": pred, "mixed_language": mixed}


def _bad_input(response, answer) -> str:
    for field, v in (("response", response), ("answer", answer)):
        if not isinstance(v, str):
            return f"bad_input: {field} is {type(v).__name__}, expected str"
    return ""


def _score_unbounded(response: str, answer: str, finished: bool, cfg: RewardConfig) -> dict:
    """score_response without the time bound (runs inside a judge thread or judge worker)."""
    if why := _bad_input(response, answer):
        return _result(cfg.penalty if not finished else 0.0, 0.0, 0.0, why, None)
    pred = extract_answer(response, cfg.answer_fallback)
    fmt = float(bool(pred) and extract_boxed(response) is not None)
    if fmt and cfg.require_think:
        m = _THINK_RE.match(response)
        fmt = float(bool(m and m.group(1).strip()) and response.rfind("\\boxed") > response.find("</think>"))
    reason = "no_answer" if pred is None else ""
    if cfg.fn:
        try:
            value = load_fn(cfg.fn)(response, answer)
        except Exception as e:  # user code: report per item (in `reason`) instead of killing the batch
            value, reason = 0.0, f"fn_error: {type(e).__name__}: {str(e)[:120]}"
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            value, reason = 0.0, f"fn_error: returned {value!r}, expected a finite float"
        acc = float(value)
    elif pred is None:
        acc = 0.0
    else:
        acc, reason = judge(pred, answer, cfg)
    mixed = bool(_CJK_RE.search(response))
    if not finished:
        return _result(cfg.penalty, acc, fmt, "truncated" + (f"; {reason}" if reason else ""), pred, mixed)
    return _result(acc + cfg.format_weight * fmt + cfg.language_penalty * mixed, acc, fmt, reason, pred, mixed)


# (pred, gold, expected): one case per math-verify path (numbers via sympy, intervals, relations, sets,
# equations, symbols). Judged once per process outside any time limit, and again after a timeout stop.
_CANARIES = (("2\\sqrt{3}", "\\sqrt{12}", 1.0), ("3.46", "2\\sqrt{3}", 1.0), ("[1,2)", "(1,2]", 0.0),
             ("x \\geq 2", "[2,\\infty)", 1.0), ("\\{2,1\\}", "\\{1,2\\}", 1.0), ("y=1+2x", "y=2x+1", 1.0),
             ("r^2\\pi", "\\pi r^2", 1.0), ("\\sqrt{2}", "\\sqrt{3}", 0.0))
_WARM_LOCK = threading.Lock()
_WARM: list = []  # non-empty once warm_up() has run in this process


def warm_up(force: bool = False) -> None:
    """Judge the canaries (once per process unless `force`), raising RuntimeError if one is misjudged.

    Why: the first judgements trigger lazy imports inside sympy/math-verify (~1 s). Inside a time limit they
    could time out spuriously, and a timeout stop that lands inside an import leaves a half-imported module
    (seen: "module 'sympy' has no attribute 'assumptions'", then every later sqrt judged 0). Re-run after
    each stop, the canaries turn such silent corruption into a loud error."""
    with _WARM_LOCK:
        if _WARM and not force:
            return
        for pred, gold, want in _CANARIES:
            got, why = judge(pred, gold)
            if got != want:
                raise RuntimeError(f"reward judge misjudges canary {pred!r} vs {gold!r}: {got} ({why}); the "
                                   "in-process judge state is broken, use --reward.num-workers >= 1")
        _WARM.append(True)


class _JudgeTimeout(BaseException):
    """Raised inside a judge thread on timeout; BaseException so sympy's `except Exception` cannot eat it."""


def score_response(response: str, answer: str, finished: bool = True, cfg: RewardConfig = RewardConfig()) -> dict:
    """Score one response in-process within cfg.timeout_s (helper thread, stopped by an async exception).

    Returns {score, accuracy, format, reason, pred, mixed_language}. Safe from any thread."""
    finished = finished or not cfg.truncation_penalty
    warm_up()
    box: list = []

    def run():
        try:
            box.append(_score_unbounded(response, answer, finished, cfg))
        except _JudgeTimeout:
            pass  # we raised it ourselves below; the caller already has the timeout result
        except BaseException as e:  # a bug in this module: hand it to the caller, do not hide it
            box.append(e)

    t = threading.Thread(target=run, daemon=True, name="reward-judge")
    t.start()
    t.join(cfg.timeout_s)
    if t.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(_JudgeTimeout))
        t.join(0.5)
        if box and isinstance(box[0], dict):  # it finished in the instant between join and the raise
            return box[0]
        note = "" if not t.is_alive() else " (judge thread stuck in C code, left running)"
        warm_up(force=True)  # the stop may have hit shared state: re-check the judge before going on
        score = cfg.penalty if not finished else 0.0
        return _result(score, 0.0, 0.0, f"timeout: judgement exceeded {cfg.timeout_s} s{note}", None)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


# ------------------------------------------------------------------------------------------------------------
# the judge pool: persistent subprocesses, one item in flight per worker, SIGKILL on timeout
# ------------------------------------------------------------------------------------------------------------
def _worker_main(rfd: int, wfd: int) -> None:
    """Judge worker loop: recv (i, response, answer, finished, cfg dict) -> send (i, result | traceback)."""
    import signal
    import traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    parent = os.getppid()

    def watchdog():  # exit if the parent dies while we are busy (EOF on recv covers the idle case)
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    rx, tx = Connection(rfd, writable=False), Connection(wfd, readable=False)
    warm_up()  # first parses cost ~1 s of lazy imports: pay it before 'ready', not inside an item's limit
    tx.send("ready")
    while True:
        try:
            msg = rx.recv()
        except EOFError:
            return
        if msg is None:
            return
        i, response, answer, finished, cfg = msg
        try:
            tx.send((i, _score_unbounded(response, answer, finished, RewardConfig(**cfg))))
        except Exception:
            tx.send((i, "ERROR " + traceback.format_exc()))


class _Worker:
    def __init__(self):
        r_child, w_parent = os.pipe()
        r_parent, w_child = os.pipe()
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                f"import reward; reward._worker_main({r_child}, {w_child})")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(r_child, w_child), env=env)
        os.close(r_child)
        os.close(w_child)
        self.tx, self.rx = Connection(w_parent, readable=False), Connection(r_parent, writable=False)
        self.ready, self.item, self.deadline = False, None, time.monotonic() + 120.0  # start-up limit

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for c in (self.tx, self.rx):
            if not c.closed:
                c.close()


class _Pool:
    def __init__(self, n: int):
        self.pid, self.workers, self.start_failures = os.getpid(), [_Worker() for _ in range(n)], 0
        self.closed = False

    def close(self):
        self.closed = True
        for w in self.workers:
            try:
                w.tx.send(None)
            except OSError:
                pass  # already dead; kill() below reaps it
        for w in self.workers:
            try:
                w.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                pass  # busy or stuck: kill() below
            w.kill()
        self.workers = []

    def replace(self, k: int) -> _Worker:
        if self.closed:  # close_pool() ran (at exit) while a daemon thread was mid-batch: do not respawn
            raise RuntimeError("reward judge pool was closed during a batch")
        self.workers[k].kill()
        self.workers[k] = _Worker()
        return self.workers[k]

    def run(self, items: list[tuple], cfg: RewardConfig) -> dict:
        """Score items [(i, response, answer, finished)] -> {i: result}; restarts dead/timed-out workers."""
        todo, out, cfg_d = list(reversed(items)), {}, dataclasses.asdict(cfg)

        def fail(k: int, why: str):  # the in-flight item gets a 0 with the reason; the worker is replaced
            i, _, _, finished = self.workers[k].item
            out[i] = _result(cfg.penalty if not finished else 0.0, 0.0, 0.0, why, None)
            self.replace(k)

        while todo or any(w.item is not None for w in self.workers):
            for k, w in enumerate(self.workers):  # one item to every idle worker
                if w.ready and w.item is None and w.proc.poll() is not None:  # died while idle
                    w = self.replace(k)
                if w.ready and w.item is None and todo:
                    w.item, w.deadline = todo.pop(), time.monotonic() + cfg.timeout_s
                    try:
                        w.tx.send((*w.item, cfg_d))
                    except OSError:
                        pass  # worker gone: its pipe reads EOF below and the item is reported 'worker_died'
            busy = [w for w in self.workers if w.item is not None or not w.ready]
            wait([w.rx for w in busy], timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            for k, w in enumerate(self.workers):
                if w.ready and w.item is None:
                    continue
                if not w.rx.poll():
                    if time.monotonic() > w.deadline and not w.ready:
                        raise RuntimeError("reward judge worker did not start within 120 s")
                    if time.monotonic() > w.deadline:
                        fail(k, f"timeout: judgement exceeded {cfg.timeout_s} s (worker killed)")
                    continue
                try:
                    msg = w.rx.recv()
                except EOFError:
                    why = f"worker_died: judge process exited with code {w.proc.wait()}"
                    if w.ready:
                        fail(k, why)
                        continue
                    self.start_failures += 1  # died while starting: retry a few times, then it is a fault
                    if self.start_failures > 3:
                        raise RuntimeError(f"reward judge workers keep failing to start ({why})")
                    self.replace(k)
                    continue
                if msg == "ready":
                    w.ready, self.start_failures = True, 0
                elif isinstance(msg[1], str):
                    raise RuntimeError(f"reward judge worker raised on item {msg[0]}:\n{msg[1]}")
                else:
                    out[msg[0]], w.item = msg[1], None
        return out


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()
_ATEXIT: list = []  # non-empty once close_pool is registered with atexit


def close_pool() -> None:
    """Stop the judge workers (registered with atexit when the pool is first created)."""
    global _POOL
    locked = _POOL_LOCK.acquire(timeout=1.0)  # at exit a daemon thread may hold it mid-batch: do not hang
    try:
        if _POOL is not None and _POOL.pid == os.getpid():  # a forked child must not close its parent's
            _POOL.close()
        _POOL = None
    finally:
        if locked:
            _POOL_LOCK.release()


def score_batch(responses: list[str], answers: list[str], finished: list[bool] | None = None,
                cfg: RewardConfig = RewardConfig()) -> list[dict]:
    """score_response over lists, in parallel on cfg.num_workers persistent judge processes (reused across
    calls; 0 = sequential in-process). Every item is bounded by cfg.timeout_s; order is preserved."""
    finished = [True] * len(responses) if finished is None or not cfg.truncation_penalty else list(finished)
    if not (len(responses) == len(answers) == len(finished)):
        raise ValueError(f"score_batch: lengths differ: responses {len(responses)}, answers {len(answers)}, "
                         f"finished {len(finished)}")
    if cfg.fn:
        load_fn(cfg.fn)  # fail fast, here, with a clear message, rather than once per item in the workers
    if cfg.num_workers <= 0:
        return [score_response(r, a, f, cfg) for r, a, f in zip(responses, answers, finished)]
    out: list = [None] * len(responses)
    items = []
    for i, (r, a, f) in enumerate(zip(responses, answers, finished)):
        if why := _bad_input(r, a):  # do not ship non-strings (maybe unpicklable) to the workers
            out[i] = _result(cfg.penalty if not f else 0.0, 0.0, 0.0, why, None)
        else:
            items.append((i, r, a, bool(f)))
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid() or len(_POOL.workers) != cfg.num_workers:
            if _POOL is not None and _POOL.pid == os.getpid():
                _POOL.close()
            if not _ATEXIT:
                _ATEXIT.append(atexit.register(close_pool))
            _POOL = _Pool(cfg.num_workers)
        pool = _POOL
        try:
            for i, res in pool.run(items, cfg).items():
                out[i] = res
        except BaseException:  # error or Ctrl-C mid-batch: in-flight items would leak into the next call
            pool.close()
            if _POOL is pool:
                _POOL = None
            raise
    return out


# ------------------------------------------------------------------------------------------------------------
# reflection statistics (MAYE's evaluation scheme)
# ------------------------------------------------------------------------------------------------------------
def reflection_stats(responses: list[str], correct: list[bool], words=REFLECTION_WORDS) -> dict:
    """MAYE's five ratios (0 when a denominator is 0) and per-word total occurrences `words/<w>`.

    N responses, R = contain any word (lower-case substring), C = correct, RC = both:
    reflection_ratio R/N; ..._in_correct_answers RC/C; ..._in_incorrect_answers (R-RC)/(N-C);
    correct_ratio_in_reflection_texts RC/R; correct_ratio_in_no_reflection_texts (C-RC)/(N-R)."""
    if len(responses) != len(correct):
        raise ValueError(f"reflection_stats: {len(responses)} responses but {len(correct)} correct flags")
    counts = Counter()
    n = r = c = rc = 0
    for k, (text, ok) in enumerate(zip(responses, correct)):
        if not isinstance(text, str):
            raise ValueError(f"reflection_stats: responses[{k}] is {type(text).__name__}, expected str")
        low = text.lower()
        hits = {w: low.count(w) for w in words}
        counts.update(hits)
        refl = any(hits.values())
        n, r, c, rc = n + 1, r + refl, c + bool(ok), rc + (refl and bool(ok))

    def div(a, b):
        return a / b if b else 0.0

    return {"reflection_ratio": div(r, n), "reflection_ratio_in_correct_answers": div(rc, c),
            "reflection_ratio_in_incorrect_answers": div(r - rc, n - c),
            "correct_ratio_in_reflection_texts": div(rc, r), "correct_ratio_in_no_reflection_texts": div(c - rc, n - r),
            **{f"words/{w}": counts[w] for w in words}}


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Args:
    responses: str = ""
    """jsonl with `response` and `answer` fields (optional bool `finished`, default true)."""
    out: str = ""
    """Where to write the scored jsonl (input fields + score/accuracy/format/reason/pred); empty = stdout."""
    reward: RewardConfig = RewardConfig()


def read_jsonl(path: str) -> list[dict]:
    """Rows with str `response`, `answer` (a JSON number is accepted and turned into a str), bool `finished`."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{k}: invalid JSON ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{k}: expected a JSON object, got {type(row).__name__}")
            for field in ("response", "answer"):
                if field not in row:
                    raise ValueError(f"{path}:{k}: missing field {field!r}")
            if isinstance(row["answer"], (int, float)) and not isinstance(row["answer"], bool):
                row["answer"] = str(row["answer"])
            for field, typ in (("response", str), ("answer", str), ("finished", bool)):
                if field in row and not isinstance(row[field], typ):
                    raise ValueError(f"{path}:{k}: field {field!r} is {type(row[field]).__name__}, "
                                     f"expected {typ.__name__}")
            rows.append(row)
    return rows


def main(args: Args) -> None:
    from rich.console import Console
    from rich.table import Table
    if not args.responses:
        raise SystemExit("--responses is required (a jsonl with `response` and `answer` fields)")
    rows = read_jsonl(args.responses)
    t0 = time.perf_counter()
    res = score_batch([r["response"] for r in rows], [r["answer"] for r in rows],
                      [r.get("finished", True) for r in rows], args.reward)
    dt = time.perf_counter() - t0
    lines = [json.dumps({**row, **s}, ensure_ascii=False) for row, s in zip(rows, res)]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    else:
        print("\n".join(lines))
    n = max(len(res), 1)
    table = Table(title=f"reward: {len(res)} responses in {dt:.2f} s (incl. judge start-up)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    stats = {"accuracy": sum(s["accuracy"] for s in res) / n, "format rate": sum(s["format"] for s in res) / n,
             "mean score": sum(s["score"] for s in res) / n}
    stats.update(reflection_stats([r["response"] for r in rows], [s["accuracy"] > 0 for s in res],
                                  args.reward.reflection_words))
    stats.update({f"reason/{k}": v for k, v in Counter(s["reason"].split(":")[0] for s in res if s["reason"]).items()})
    for k, v in stats.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console(stderr=not args.out).print(table)  # keep stdout pure jsonl when it carries the scored lines


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))

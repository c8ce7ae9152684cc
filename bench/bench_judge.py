"""Benchmark: judge agreement with labelled tables, per answer category: our reward judge vs raw math-verify.

Two tables of rows {category, gold, response, expected, source}: a gold answer as the datasets store it, a model
response with its answer in \\boxed{}, and whether a careful human grader calls the final answer equal to the gold.
  tests/fixtures/judge_table.jsonl       353 rows: geometry3k, MM-Math, MathVerse forms, cases from public
                                         answer-checker test suites, issue 14, and 105 held-out rows
  tests/fixtures/mathverify_table.jsonl  219 rows: Math-Verify's own test suite (Apache-2.0), its curated
                                         final-answer cases; category = the Math-Verify test function
                                         (tests/fixtures/README.md says how they were made)
Two judges are scored against `expected`:
  ours         reward.score_batch(responses, golds, None, RewardConfig(num_workers=2)); correct = accuracy > 0
  math-verify  verify(parse("$" + gold + "$"), parse(response)), default configs and math-verify's own timeouts,
               on the main thread; an exception or a case over 5 s counts as False
The table lists rows, agreement % and false positives (judged equal where `expected` is false) per category, then
every row where ours disagrees with `expected`, and judgements/s for each judge (ours: the whole score_batch call,
pool start included; math-verify: parse + verify, sequential, this process).

    python bench/bench_judge.py                                      # both tables
    python bench/bench_judge.py --table tests/fixtures/mathverify_table.jsonl
Final line: RESULT {"name": "judge_agreement", "tables": [...]}. Always exits 0: it reports figures, it gates nothing.
"""
import argparse
import json
import os
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MV_LIMIT_S = 5.0


def load_table(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            missing = {"category", "gold", "response", "expected"} - row.keys()
            if missing:
                raise ValueError(f"{path}:{n}: missing {sorted(missing)}")
            rows.append(row)
    return rows


def judge_ours(rows: list[dict]) -> tuple[list[bool] | None, float, str]:
    """(verdicts, seconds for the score_batch call, error). The import is inside: reward.py may be mid-rewrite."""
    try:
        import reward
        cfg = reward.RewardConfig(num_workers=2)
        t0 = time.perf_counter()
        res = reward.score_batch([r["response"] for r in rows], [r["gold"] for r in rows], None, cfg)
        dt = time.perf_counter() - t0
        return [r["accuracy"] > 0 for r in res], dt, ""
    except Exception:  # noqa: BLE001 -- a broken judge is a result to report, not a crash
        return None, 0.0, traceback.format_exc(limit=3)


def judge_mv(rows: list[dict]) -> tuple[list[bool], float]:
    """Raw math-verify with its defaults (parsing_timeout=5, timeout_seconds=5: signal based, main thread only)."""
    import logging

    from math_verify import parse, verify
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # parse failures on odd text are expected
    out, t_all = [], time.perf_counter()
    for r in rows:
        t0 = time.perf_counter()
        try:
            ok = bool(verify(parse("$" + r["gold"] + "$"), parse(r["response"])))
        except Exception:  # noqa: BLE001 -- any failure is a "not equal"
            ok = False
        out.append(ok and time.perf_counter() - t0 <= MV_LIMIT_S)
    return out, time.perf_counter() - t_all


def short(s: str, n: int = 60) -> str:
    s = s.replace("\n", "\\n")
    return s if len(s) <= n else s[:n - 3] + "..."


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", type=Path, nargs="+", default=[ROOT / "tests" / "fixtures" / f"{name}.jsonl" for name
                                                             in ("judge_table", "mathverify_table")])
    args = ap.parse_args()
    results = []
    for table in args.table:
        print(f"== {table}")
        results.append(bench_table(table))
        print()
    print("RESULT " + json.dumps({"name": "judge_agreement", "tables": results}))


def bench_table(table: Path) -> dict:
    rows = load_table(table)
    result = {"table": str(table), "rows": len(rows), "load_avg_1min_at_start": round(os.getloadavg()[0], 2)}

    ours, dt_ours, err = judge_ours(rows)
    mv, dt_mv = judge_mv(rows)
    if err:
        print(f"ours: reward.score_batch failed, its columns are empty:\n{err}")

    cats = list(dict.fromkeys(r["category"] for r in rows))  # first-seen order
    stats = defaultdict(lambda: [0, 0, 0, 0, 0])  # rows, ours agree, mv agree, ours FP, mv FP
    for i, r in enumerate(rows):
        for key in (r["category"], "TOTAL"):
            s = stats[key]
            s[0] += 1
            if ours is not None:
                s[1] += ours[i] == r["expected"]
                s[3] += ours[i] and not r["expected"]
            s[2] += mv[i] == r["expected"]
            s[4] += mv[i] and not r["expected"]

    head = f"{'category':20s} | {'rows':>4s} | {'ours agree %':>12s} | {'math-verify agree %':>19s} | " \
           f"{'ours false pos':>14s} | {'mv false pos':>12s}"
    print(head)
    print("-" * len(head))
    for key in cats + ["TOTAL"]:
        n, oa, ma, ofp, mfp = stats[key]
        o_pct, o_fp = (f"{100 * oa / n:.1f}", str(ofp)) if ours is not None else ("-", "-")
        if key == "TOTAL":
            print("-" * len(head))
        print(f"{key:20s} | {n:4d} | {o_pct:>12s} | {100 * ma / n:19.1f} | {o_fp:>14s} | {mfp:12d}")
        if key == "TOTAL":
            result.update({"ours_agree": None if ours is None else oa, "mv_agree": ma,
                           "ours_agree_pct": None if ours is None else round(100 * oa / n, 1),
                           "mv_agree_pct": round(100 * ma / n, 1), "ours_false_pos": None if ours is None else ofp,
                           "mv_false_pos": mfp})
    result["per_category"] = {k: {"rows": stats[k][0],
                                  "ours_agree_pct": None if ours is None else round(100 * stats[k][1] / stats[k][0], 1),
                                  "mv_agree_pct": round(100 * stats[k][2] / stats[k][0], 1)} for k in cats}

    print()
    if ours is None:
        print("ours: no verdicts (reward.score_batch failed)")
    else:
        bad = [(r, o, m) for r, o, m in zip(rows, ours, mv) if o != r["expected"]]
        print(f"rows where ours disagrees with expected: {len(bad)}")
        for r, o, m in bad:
            print(f"  [{r['category']}] gold={short(r['gold'], 40)!r} response={short(r['response'])!r} "
                  f"expected={r['expected']} ours={o} mv={m}")
        print(f"\nours: {len(rows)} judgements in {dt_ours:.2f} s = {len(rows) / dt_ours:.0f}/s "
              f"(one score_batch call, 2 judge workers, pool start included)")
        result["ours_per_s"] = round(len(rows) / dt_ours, 1)
    print(f"math-verify: {len(rows)} judgements in {dt_mv:.2f} s = {len(rows) / dt_mv:.0f}/s "
          f"(parse + verify, sequential, this process)")
    result["mv_per_s"] = round(len(rows) / dt_mv, 1)
    return result


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 -- a benchmark prints figures; it never fails the caller
        traceback.print_exc()
    sys.exit(0)

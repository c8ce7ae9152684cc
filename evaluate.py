"""evaluate.py: MAYE's evaluation scheme (stage 6): accuracy under three decodings, length, reflection; reports.

What it does (MAYE, arXiv 2504.02587, section 4):
  * `evaluate_model`: one engine x one split -> per decoding setting accuracy, mean response length, truncation
    rate and MAYE's reflection ratios/words. Defaults are MAYE's three settings: pass@1 at T=0.01 (top_p 0.001),
    pass@1 at T=0.6, pass@8 at T=1.0 (correct if any of 8 is). Correctness is reward.py's accuracy.
  * `evaluate_run`: every (k-th) checkpoint of a run dir -> RUN/eval.jsonl, one line per checkpoint x split x
    setting, appended as soon as it is done; a rerun skips what is there (resume).
  * `aggregate` / `write_report`: several runs grouped by arm (rl / sft / vanilla, or --labels) -> MAYE Table 3
    (per arm: mean +- std across seeds of the per-run mean over epochs, and of the per-run max over epochs),
    Figure 4 (training curves from metrics.jsonl, +- std shaded), Figure 5 (val/test accuracy per epoch), report.md.
Simplifications: one engine per checkpoint (built, used for all splits and settings, dropped); seeds of a
sampled setting are fixed (EvalConfig.seed), so a rerun reproduces; std is the sample std (ddof=1), 0 for one run.

Run alone:
    python evaluate.py --model toy/models/qwen2_5_vl-tiny --data-file toy/data/validation.jsonl --eval.max-tokens 64
    python evaluate.py --runs runs/rl_s0 runs/rl_s1 runs/sft_s0 toy/models/qwen2_5_vl-small --out report \\
        --eval.max-tokens 64 --data.validation toy/data/validation.jsonl --data.test toy/data/test.jsonl
    python evaluate.py --runs ... --out report --report-only      # redraw from existing eval.jsonl files
    python evaluate.py --help
"""
from __future__ import annotations

import gc
import json
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from reward import RewardConfig, reflection_stats, score_batch
from rollout import DataConfig, RolloutConfig, load_dataset, make_engine


@dataclass(frozen=True)
class EvalConfig:
    settings: tuple[str, ...] = ("pass@1_t0.01", "pass@1_t0.6", "pass@8_t1.0")
    """Decodings 'pass@K_tT[_pP][_nN]': pass@K at temperature T, top_p P (0.001 if T<=0.01 else 1), N samples (K)."""
    max_tokens: int = 2048
    """Max new tokens per response (MAYE 2048; the toy task needs 64)."""
    splits: tuple[str, ...] = ("validation", "test")
    """Splits to evaluate in --runs mode: names of DataConfig path fields (--data.<split>)."""
    every_k: int = 1
    """Evaluate every k-th checkpoint of a run (the last one always)."""
    limit: int = 0
    """Evaluate only the first `limit` problems of each split (0 = all)."""
    seed: int | None = 0
    """Sampling seed: prompt i gets seed + i*n, as in one engine call (None = unseeded)."""
    unbiased: bool = False
    """pass@k by Chen et al. (2021)'s unbiased estimator from N>=K samples instead of 'any of the first K'."""
    batch_size: int = 256
    """Prompts per engine.generate call (the progress bar advances per batch)."""
    save_responses: bool = True
    """Write every response with its verdict to RUN/eval_responses/<checkpoint>/<split>_<setting>.jsonl."""


class Setting(NamedTuple):
    name: str
    k: int
    n: int
    temperature: float
    top_p: float


_SETTING_RE = re.compile(r"^pass@(\d+)_t(\d+(?:\.\d*)?)(?:_p(\d*\.?\d+(?:e-?\d+)?))?(?:_n(\d+))?$")


def parse_setting(name: str) -> Setting:
    """'pass@8_t1.0' -> Setting(k=8, n=8, T=1.0, top_p=1.0); 'pass@1_t0.01' -> top_p 0.001 (MAYE's near-greedy)."""
    m = _SETTING_RE.match(name)
    if not m:
        raise ValueError(f"eval setting {name!r}: expected 'pass@K_tT[_pP][_nN]', e.g. 'pass@8_t1.0'")
    k, t = int(m.group(1)), float(m.group(2))
    top_p = float(m.group(3)) if m.group(3) else (0.001 if t <= 0.01 else 1.0)
    n = int(m.group(4)) if m.group(4) else k
    if k < 1 or n < k or not 0 < top_p <= 1:
        raise ValueError(f"eval setting {name!r}: need 1 <= K <= N and 0 < top_p <= 1")
    return Setting(name, k, n, t, top_p)


def pass_at_k(correct: list[list[bool]], k: int, unbiased: bool = False) -> float:
    """Mean over problems of pass@k from each problem's n sampled verdicts.

    Default (MAYE): problem solved if any of its first k responses is correct (needs n >= k).
    unbiased (Chen et al. 2021, Codex paper eq. 1): 1 - C(n-c, k) / C(n, k), with c correct of n, computed as
    1 - prod_{i=n-c+1..n} (1 - k/i) for numerical stability; equals the default when n == k."""
    if not correct:
        raise ValueError("pass_at_k: no problems")
    total = 0.0
    for j, c in enumerate(correct):
        n = len(c)
        if n < k:
            raise ValueError(f"pass_at_k: problem {j} has {n} responses, fewer than k={k}")
        if not unbiased:
            total += any(c[:k])
            continue
        wrong = n - sum(map(bool, c))
        total += 1.0 if wrong < k else 1.0 - math.prod(1.0 - k / i for i in range(wrong + 1, n + 1))
    return total / len(correct)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value)."""
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def check_answers(samples, where: str) -> None:
    """Clear error if any sample lacks a gold answer (a split without answers cannot be evaluated)."""
    missing = [s.id for s in samples if not isinstance(s.answer, str) or not s.answer.strip()]
    if not samples:
        raise ValueError(f"{where}: no samples")
    if missing:
        raise ValueError(f"{where}: {len(missing)} of {len(samples)} samples have no `answer` "
                         f"(first: {missing[0]!r}); a split without answers cannot be evaluated")


def evaluate_model(engine, samples, cfg: EvalConfig = EvalConfig(), reward_cfg: RewardConfig = RewardConfig(),
                   settings: tuple[str, ...] | None = None,
                   on_batch: Callable[[int], None] | None = None) -> dict[str, dict]:
    """{setting: {accuracy, mean_length, length_clip_ratio, format_ratio, response_accuracy, n_problems,
    n_responses, reflection/<ratio>, reflection/words/<w>, records}} for `engine` on `samples`.

    accuracy = pass_at_k (see there); mean_length = mean generated tokens over all responses; reflection stats
    (reward.reflection_stats) over all responses; a response is correct if reward accuracy > 0.5 (the judge
    gives 1/0; truncation does not zero accuracy, MAYE scores the text). `engine.generate(samples, n,
    temperature, top_p, max_tokens, seed)` -> list[list[Completion]]. on_batch(prompts_done) drives a progress bar."""
    check_answers(samples, "evaluate_model")
    out = {}
    for s in map(parse_setting, settings if settings is not None else cfg.settings):
        comps = []
        for b in range(0, len(samples), cfg.batch_size):
            chunk = samples[b:b + cfg.batch_size]
            got = engine.generate(chunk, n=s.n, temperature=s.temperature, top_p=s.top_p,
                                  max_tokens=cfg.max_tokens,
                                  seed=None if cfg.seed is None else cfg.seed + b * s.n)  # = one call's seeds
            if len(got) != len(chunk) or any(len(g) != s.n for g in got):
                raise RuntimeError(f"engine.generate returned {[len(g) for g in got]} completions for "
                                   f"{len(chunk)} prompts x n={s.n}")
            comps += got
            if on_batch:
                on_batch(len(chunk))
        flat = [(sample, j, c) for sample, cs in zip(samples, comps) for j, c in enumerate(cs)]  # (P*n,)
        scores = score_batch([c.text for _, _, c in flat], [x.answer for x, _, _ in flat],
                             [c.finish_reason == "stop" for _, _, c in flat], reward_cfg)
        ok = [r["accuracy"] > 0.5 for r in scores]
        n_resp = len(flat)
        records = [{"id": x.id, "sample": j, "response": c.text, "answer": x.answer, "pred": r["pred"],
                    "accuracy": r["accuracy"], "correct": v, "finish_reason": c.finish_reason,
                    "length": len(c.token_ids), "reason": r["reason"]}
                   for (x, j, c), r, v in zip(flat, scores, ok)]
        refl = reflection_stats([c.text for _, _, c in flat], ok, reward_cfg.reflection_words)
        out[s.name] = {
            "accuracy": pass_at_k([ok[i:i + s.n] for i in range(0, n_resp, s.n)], s.k, cfg.unbiased),
            "mean_length": sum(len(c.token_ids) for _, _, c in flat) / n_resp,
            "length_clip_ratio": sum(c.finish_reason == "length" for _, _, c in flat) / n_resp,
            "format_ratio": sum(r["format"] for r in scores) / n_resp,
            "response_accuracy": sum(ok) / n_resp,
            "n_problems": len(samples), "n_responses": n_resp,
            **{f"reflection/{k}": v for k, v in refl.items()}, "records": records}
    return out


# ------------------------------------------------------------------------------------------------------------
# whole runs
# ------------------------------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[dict]:
    """[{name, path, step, epoch, kind}] sorted by step. A run has RUN/checkpoints/*/ (each with vlrl_state.json);
    a plain HF model dir (config.json with model_type, no checkpoints/) is one 'vanilla' checkpoint at step 0."""
    run = Path(run_dir)
    if (run / "checkpoints").is_dir():
        out = []
        for d in sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir()):
            state_path = d / "vlrl_state.json"
            if not state_path.is_file():
                raise ValueError(f"checkpoint {d}: no vlrl_state.json (incomplete save?)")
            st = json.loads(state_path.read_text())
            for key, typ in (("step", int), ("epoch", (int, float)), ("kind", str)):
                if not isinstance(st.get(key), typ) or isinstance(st.get(key), bool):
                    raise ValueError(f"{state_path}: field {key!r} is {st.get(key)!r}, expected {typ}")
            out.append({"name": d.name, "path": str(d), "step": st["step"], "epoch": float(st["epoch"]),
                        "kind": st["kind"]})
        if not out:
            raise ValueError(f"run {run}: checkpoints/ is empty")
        return sorted(out, key=lambda c: c["step"])
    cfg_path = run / "config.json"
    if cfg_path.is_file() and "model_type" in json.loads(cfg_path.read_text()):
        return [{"name": "model", "path": str(run), "step": 0, "epoch": 0.0, "kind": "vanilla"}]
    raise ValueError(f"{run}: neither a run dir (checkpoints/) nor an HF model dir (config.json with model_type)")


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a jsonl file; a malformed line raises naming file:line (an interrupted write included)."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); fix or delete that line") from e
    return rows


EVAL_KEYS = ("checkpoint", "step", "epoch", "kind", "split", "setting", "max_tokens", "limit", "accuracy")


def read_eval(path: str | Path) -> list[dict]:
    """eval.jsonl rows, each checked for the fields that resume and the report rely on (error names file:line)."""
    rows = read_jsonl(path)
    for i, r in enumerate(rows, 1):
        if missing := [k for k in EVAL_KEYS if k not in r]:
            raise ValueError(f"{path}: row {i} lacks {missing}; not an eval.jsonl written by evaluate.py?")
    return rows


def evaluate_run(run_dir: str | Path, data_cfg: DataConfig = DataConfig(), rollout_cfg: RolloutConfig = RolloutConfig(),
                 cfg: EvalConfig = EvalConfig(), reward_cfg: RewardConfig = RewardConfig(),
                 engine_fn: Callable[[str], object] | None = None, progress=None,
                 eval_dir: str | Path | None = None) -> list[dict]:
    """Evaluate the run's checkpoints (every cfg.every_k-th and the last) on cfg.splits x cfg.settings, appending
    one line per (checkpoint, split, setting) to EVAL_DIR/eval.jsonl (default EVAL_DIR = RUN) as each finishes;
    lines already there are skipped (resume). Returns all of the file's rows.
    engine_fn(model_dir) -> engine (default rollout.make_engine); progress: a rich Progress to advance."""
    ckpts = list_checkpoints(run_dir)
    run = Path(eval_dir or run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ckpts = [c for i, c in enumerate(ckpts) if i % max(cfg.every_k, 1) == 0 or i == len(ckpts) - 1]
    settings = [parse_setting(s) for s in cfg.settings]
    eval_path = run / "eval.jsonl"
    done = set()
    for r in read_eval(eval_path) if eval_path.exists() else []:
        done.add((r["checkpoint"], r["split"], r["setting"]))
        if (r["max_tokens"], r["limit"]) != (cfg.max_tokens, cfg.limit):
            raise ValueError(f"{eval_path} has results at max_tokens={r['max_tokens']}, limit={r['limit']}; "
                             f"this call asks for {cfg.max_tokens}, {cfg.limit}: move that file away first")
    todo = [(c, sp, s) for c in ckpts for sp in cfg.splits for s in settings if (c["name"], sp, s.name) not in done]
    data = {}
    for sp in dict.fromkeys(sp for _, sp, _ in todo):  # load and check every split before any model is loaded
        path = getattr(data_cfg, sp, None)
        if not isinstance(path, str) or not path:
            raise ValueError(f"split {sp!r}: no file (DataConfig has no non-empty field {sp!r}; --data.{sp})")
        data[sp] = load_dataset(path, data_cfg)[:cfg.limit or None]
        check_answers(data[sp], f"split {sp!r} ({path})")
    make = engine_fn or (lambda d: make_engine(d, rollout_cfg, data_cfg))
    task = progress.add_task(Path(run_dir).name, total=sum(len(data[sp]) for _, sp, _ in todo)) if progress else None
    for ck in ckpts:
        mine = [(sp, s) for c, sp, s in todo if c is ck]
        if not mine:
            continue
        try:
            engine = make(ck["path"])
        except Exception as e:  # re-raised with the checkpoint named: the caller sees which one is broken
            raise RuntimeError(f"checkpoint {ck['path']} failed to load: {type(e).__name__}: {e}") from e
        for sp, s in mine:
            t0 = time.perf_counter()
            res = evaluate_model(engine, data[sp], cfg, reward_cfg, (s.name,),
                                 on_batch=(lambda m: progress.advance(task, m)) if progress else None)[s.name]
            records = res.pop("records")
            row = {"run": str(run_dir), "checkpoint": ck["name"], "step": ck["step"], "epoch": ck["epoch"],
                   "kind": ck["kind"], "split": sp, "setting": s.name, "k": s.k, "n": s.n,
                   "temperature": s.temperature, "top_p": s.top_p, "max_tokens": cfg.max_tokens, "limit": cfg.limit,
                   **res, "time_s": round(time.perf_counter() - t0, 3)}
            if cfg.save_responses:
                rdir = run / "eval_responses" / ck["name"]
                rdir.mkdir(parents=True, exist_ok=True)
                (rdir / f"{sp}_{s.name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            with open(eval_path, "a", encoding="utf-8") as f:  # one write per line, flushed: resumable
                f.write(json.dumps(row) + "\n")
        del engine
        gc.collect()
    return read_eval(eval_path) if eval_path.exists() else []


# ------------------------------------------------------------------------------------------------------------
# several runs: MAYE Table 3, Figures 4 and 5, report.md
# ------------------------------------------------------------------------------------------------------------
ARM_ORDER = ("vanilla", "sft", "rl")
ARM_COLOURS = {"vanilla": "0.35", "sft": "tab:blue", "rl": "tab:red"}


def arm_order(arms) -> list[str]:
    """vanilla, sft, rl first (MAYE's column order), then any other label alphabetically."""
    return [a for a in ARM_ORDER if a in arms] + sorted(set(arms) - set(ARM_ORDER))


def run_arm(rows: list[dict]) -> str:
    """A run's arm: the `kind` of its last evaluated checkpoint (a run may start from a vanilla step 0)."""
    return max(rows, key=lambda r: r["step"])["kind"]


def aggregate(runs: dict[str, list[dict]], arms: dict[str, str], split: str, setting: str,
              metric: str = "accuracy") -> dict[str, dict]:
    """MAYE Table 3 numbers for one split x setting. runs: {run: eval.jsonl rows}, arms: {run: arm}.

    Per run: mean and max of `metric` over its epochs (checkpoints with epoch > 0; all if it has none, as a
    vanilla model). Per arm: {"n": runs, "mean": (mean, std) across runs of the per-run means, "max": (mean,
    std) across runs of the per-run maxima, "per_run": {run: {"mean", "max", "epochs"}}}."""
    per_arm: dict[str, dict] = {}
    for run, rows in runs.items():
        mine = [r for r in rows if r["split"] == split and r["setting"] == setting]
        if not mine:
            continue
        epochs = [r for r in mine if r["epoch"] > 0] or mine
        vals = [float(r[metric]) for r in epochs]
        per_arm.setdefault(arms[run], {})[run] = {"mean": sum(vals) / len(vals), "max": max(vals),
                                                  "epochs": len(vals)}
    return {arm: {"n": len(pr), "mean": mean_std([p["mean"] for p in pr.values()]),
                  "max": mean_std([p["max"] for p in pr.values()]), "per_run": pr}
            for arm, pr in per_arm.items()}


def _pct(ms: tuple[float, float], n: int) -> str:
    return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}" if n > 1 else f"{100 * ms[0]:.1f}"


def table_markdown(runs: dict[str, list[dict]], arms: dict[str, str], splits, settings) -> str:
    """One MAYE-Table-3-style markdown table per setting: rows Vanilla / <arm> mean ... / <arm> max ...,
    columns the splits; cells in % as mean ± std across runs (std omitted for a single run)."""
    out = []
    for setting in settings:
        agg = {sp: aggregate(runs, arms, sp, setting) for sp in splits}
        present = arm_order({a for g in agg.values() for a in g})
        if not present:
            continue
        lines = [f"**{setting}** (accuracy %, mean ± std across runs)", "",
                 "| | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
        for stat in ("mean", "max"):
            for arm in present:
                if arm == "vanilla" and stat == "max":
                    continue
                n = max(agg[sp][arm]["n"] for sp in splits if arm in agg[sp])
                name = "Vanilla" if arm == "vanilla" else f"{arm.upper() if len(arm) <= 4 else arm} {stat}"
                cells = [_pct(agg[sp][arm][stat], agg[sp][arm]["n"]) if arm in agg[sp] else "–" for sp in splits]
                lines.append(f"| {name} ({n} run{'s' * (n > 1)}) | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """RUN/metrics.jsonl rows; each must have an int "step" and a numeric "epoch" (error names file:line)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = read_jsonl(path) if path.exists() else []
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("step"), int) or not isinstance(r.get("epoch"), (int, float)):
            raise ValueError(f"{path}:{i}: needs an int 'step' and a numeric 'epoch', got "
                             f"{r.get('step')!r}, {r.get('epoch')!r}")
    return rows


def series(rows: list[dict], key: str, x: str, where: str = "") -> dict[float, float]:
    """{x: value} of `key` over metric rows that have it (a later line at the same x wins: resumed runs)."""
    out = {}
    for r in rows:
        if key in r:
            v = r[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"{where}: {key!r} at {x}={r[x]} is {v!r}, expected a number")
            out[float(r[x])] = float(v)
    return out


def band(per_run: list[dict[float, float]]) -> tuple[list[float], list[float], list[float]]:
    """xs, mean, std across runs at each x that any run has (runs missing an x do not count there)."""
    xs = sorted({x for s in per_run for x in s})
    stats = [mean_std([s[x] for s in per_run if x in s]) for x in xs]
    return xs, [m for m, _ in stats], [sd for _, sd in stats]


def _plot_band(ax, per_run, label, colour, style="-"):
    xs, m, sd = band(per_run)
    if not xs:
        return False
    ax.plot(xs, m, style, color=colour, label=f"{label} (n={len(per_run)})", lw=1.8,
            marker="o" if len(xs) < 12 else None, ms=3)
    floor = 0.0 if min(v for s in per_run for v in s.values()) >= 0 else -math.inf  # counts/ratios stay >= 0
    ax.fill_between(xs, [max(a - b, floor) for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color=colour,
                    alpha=0.18, lw=0)
    return True


def _colour(arm: str, k: int) -> str:
    return ARM_COLOURS.get(arm, f"C{(k + 3) % 10}")


def training_figure(metrics: dict[str, list[dict]], arms: dict[str, str], path: str | Path) -> Path:
    """MAYE Figure 4: training accuracy per epoch, response length, reflection ratios and the two most frequent
    reflection words per step, per arm, mean ± std (shaded) across its runs. Panels without data say so."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    totals: dict[str, float] = defaultdict(float)
    for rows in metrics.values():
        for r in rows:
            for k, v in r.items():
                if k.startswith("reflection/words/") and isinstance(v, (int, float)):
                    totals[k] += v
    words = [k for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v > 0][:2]
    has_epoch_acc = any("train/epoch_accuracy" in r for rows in metrics.values() for r in rows)
    panels = [("Training accuracy per epoch", "epoch", "accuracy", [("train/epoch_accuracy", "-", "")])
              if has_epoch_acc else  # no epoch finished yet: the per-step rollout accuracy instead
              ("Training accuracy per step (no epoch finished)", "step", "accuracy", [("rews/acc_rewards", "-", "")]),
              ("Response length", "step", "mean tokens per response", [("response/lengths", "-", "")]),
              ("Reflection ratio", "step", "fraction of responses", [("reflection/reflection_ratio", "-", "")]),
              ("Reflection ratio: correct vs incorrect answers", "step", "fraction of responses",
               [("reflection/reflection_ratio_in_correct_answers", "-", " correct"),
                ("reflection/reflection_ratio_in_incorrect_answers", "--", " incorrect")])]
    panels += [(f"Reflection word '{w.split('/')[-1]}'", "step", "occurrences per step", [(w, "-", "")])
               for w in words]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.axis("off")
            if i == len(panels):
                ax.text(0.5, 0.5, f"{'no' if not words else 'no second'} reflection word\nin the training logs",
                        ha="center", va="center",
                        fontsize=12, color="0.4", transform=ax.transAxes)
            continue
        title, x, ylabel, keys = panels[i]
        drawn = False
        for k, arm in enumerate(arm_order(set(arms.values()))):
            mine = [run for run in metrics if arms[run] == arm]
            for key, style, suffix in keys:
                per_run = [s for run in mine if (s := series(metrics[run], key, x, f"{run}/metrics.jsonl"))]
                drawn |= bool(per_run) and _plot_band(ax, per_run, arm + suffix, _colour(arm, k), style)
        ax.set_title(title, fontsize=12)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=9)
        else:
            ax.text(0.5, 0.5, "no data in metrics.jsonl", ha="center", va="center", color="0.4",
                    transform=ax.transAxes)
    fig.suptitle("Training dynamics (mean ± std across runs)", fontsize=14)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def accuracy_figure(runs: dict[str, list[dict]], arms: dict[str, str], splits, settings, path: str | Path) -> Path:
    """MAYE Figure 5: accuracy per epoch, one panel per setting x split; each arm mean ± std across runs,
    a vanilla model (one checkpoint) as a flat dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(settings), len(splits), figsize=(6.5 * len(splits), 3.6 * len(settings) + 0.6),
                             squeeze=False, constrained_layout=True)
    for i, setting in enumerate(settings):
        for j, sp in enumerate(splits):
            ax, drawn = axes[i][j], False
            for k, arm in enumerate(arm_order(set(arms.values()))):
                per_run = [{r["epoch"]: r["accuracy"] for r in runs[run]
                            if r["split"] == sp and r["setting"] == setting} for run in runs if arms[run] == arm]
                per_run = [p for p in per_run if p]
                if not per_run:
                    continue
                if all(len(p) == 1 for p in per_run) and arm == "vanilla":
                    m, sd = mean_std([v for p in per_run for v in p.values()])
                    ax.axhline(m, color=_colour(arm, k), ls="--", lw=1.8, label=f"{arm} (n={len(per_run)})")
                    if sd:
                        ax.axhspan(m - sd, m + sd, color=_colour(arm, k), alpha=0.12, lw=0)
                else:
                    _plot_band(ax, per_run, arm, _colour(arm, k))
                drawn = True
            ax.set_title(f"{sp}: {setting}", fontsize=12)
            ax.set_xlabel("epoch")
            ax.set_ylabel("accuracy")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if drawn:
                ax.legend(fontsize=9)
            else:
                ax.text(0.5, 0.5, "not evaluated", ha="center", va="center", color="0.4", transform=ax.transAxes)
    fig.suptitle("Accuracy per epoch (mean ± std across runs)", fontsize=14)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def consistency_rows(runs: dict[str, list[dict]], metrics: dict[str, list[dict]],
                     setting: str = "pass@1_t0.01") -> list[tuple]:
    """(run, step, logged val/accuracy, eval accuracy, logged val/mean_length, eval mean_length) at every step
    with both a training-log validation line and a validation eval.jsonl row (NaN when a length was not logged)."""
    out = []
    for run, rows in runs.items():
        where = f"{run}/metrics.jsonl"
        acc = series(metrics.get(run, []), "val/accuracy", "step", where)
        length = series(metrics.get(run, []), "val/mean_length", "step", where)
        for r in rows:
            if r["split"] == "validation" and r["setting"] == setting and float(r["step"]) in acc:
                out.append((run, r["step"], acc[float(r["step"])], r["accuracy"],
                            length.get(float(r["step"]), math.nan), r.get("mean_length", math.nan)))
    return out


def write_report(runs: dict[str, list[dict]], metrics: dict[str, list[dict]], arms: dict[str, str], out: str | Path,
                 splits=("validation", "test"), settings=EvalConfig.settings) -> Path:
    """OUT/report.md with the Table 3 markdown (also OUT/table.md), Figures 4 and 5 (PNG) and a check that the
    evaluation reproduces the training logs' validation accuracy at the same steps."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = table_markdown(runs, arms, splits, settings)
    (out / "table.md").write_text(table)
    training_figure(metrics, arms, out / "training_curves.png")
    accuracy_figure(runs, arms, splits, settings, out / "accuracy_per_epoch.png")
    lines = ["# vlrl evaluation report", "", "## Runs", "", "| run | arm | checkpoints evaluated | metrics lines |",
             "|---|---|---:|---:|"]
    lines += [f"| `{run}` | {arms[run]} | {len({r['checkpoint'] for r in rows})} | {len(metrics.get(run, []))} |"
              for run, rows in runs.items()]
    lines += ["", "## Accuracy (MAYE Table 3)", "",
              "Mean: per run, the mean over its epochs (checkpoints after epoch 0), then mean ± std across runs. "
              "Max: per run, the best epoch, then mean ± std across runs.", "", table,
              "## Training dynamics (MAYE Figure 4)", "", "![training curves](training_curves.png)", "",
              "## Accuracy per epoch (MAYE Figure 5)", "", "![accuracy per epoch](accuracy_per_epoch.png)", ""]
    check = consistency_rows(runs, metrics)
    if check:
        worst = max(abs(c[2] - c[3]) for c in check)
        lines += ["## Check: evaluation vs the training log", "",
                  f"validation pass@1_t0.01 here vs `val/accuracy` and `val/mean_length` logged during training at "
                  f"the same step (largest accuracy difference {100 * worst:.1f} points):", "",
                  "| run | step | accuracy % (log) | accuracy % (eval) | mean length (log) | mean length (eval) |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| `{run}` | {step} | {100 * a:.1f} | {100 * b:.1f} | {la:.2f} | {lb:.2f} |"
                  for run, step, a, b, la, lb in check]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Args:
    model: str = ""
    """One model dir (HF format) to evaluate on --data-file; prints a table."""
    data_file: str = ""
    """Split file for --model (MAYE jsonl, verl parquet or messages jsonl), as rollout.py's --data-file."""
    runs: tuple[str, ...] = ()
    """Run dirs (RUN/checkpoints/*) and/or plain model dirs (vanilla) to evaluate and compare."""
    labels: tuple[str, ...] = ()
    """Arm of each --runs entry, in order (e.g. rl rl sft vanilla); default: the checkpoints' vlrl_state kind."""
    out: str = ""
    """--runs: report folder (report.md, table.md, PNGs; evals of plain model dirs go to OUT/models/). --model:
    where to write results.json and responses.jsonl (optional)."""
    report_only: bool = False
    """--runs: do not evaluate; draw the report from the eval.jsonl files already written."""
    eval: EvalConfig = EvalConfig()
    data: DataConfig = DataConfig()
    """Split files and prompt settings (the same --data.* flags as train.py and sft.py)."""
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()


def _progress():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn())


def main(args: Args) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console()
    if bool(args.model) == bool(args.runs):
        raise SystemExit("give either --model DIR --data-file FILE, or --runs DIR [DIR ...] --out REPORT_DIR")
    if args.model:
        if not args.data_file:
            raise SystemExit("--model needs --data-file FILE (a split with answers)")
        samples = load_dataset(args.data_file, args.data)[:args.eval.limit or None]
        check_answers(samples, args.data_file)
        settings = [parse_setting(s) for s in args.eval.settings]
        engine = make_engine(args.model, args.rollout, args.data)
        with _progress() as progress:
            task = progress.add_task(Path(args.model).name, total=len(samples) * len(settings))
            res = evaluate_model(engine, samples, args.eval, args.reward, on_batch=lambda m: progress.advance(task, m))
        table = Table(title=f"{args.model} on {args.data_file} ({len(samples)} problems, max {args.eval.max_tokens} tokens)")
        for col in ("setting", "accuracy", "mean length", "clipped", "reflection ratio"):
            table.add_column(col, justify="left" if col == "setting" else "right")
        for name, r in res.items():
            table.add_row(name, f"{100 * r['accuracy']:.1f}%", f"{r['mean_length']:.1f}",
                          f"{100 * r['length_clip_ratio']:.1f}%", f"{100 * r['reflection/reflection_ratio']:.1f}%")
        console.print(table)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            with open(Path(args.out) / "responses.jsonl", "w") as f:
                f.writelines(json.dumps({"setting": n, **rec}) + "\n" for n, r in res.items() for rec in r["records"])
            (Path(args.out) / "results.json").write_text(json.dumps(
                {n: {k: v for k, v in r.items() if k != "records"} for n, r in res.items()}, indent=1))
        return
    if not args.out:
        raise SystemExit("--runs needs --out REPORT_DIR")
    if args.labels and len(args.labels) != len(args.runs):
        raise SystemExit(f"--labels has {len(args.labels)} entries for {len(args.runs)} --runs")
    # a plain model dir (vanilla) is not written into: its eval.jsonl goes to OUT/models/<its path, flattened>
    eval_dirs = {run: run if (Path(run) / "checkpoints").is_dir() else
                 str(Path(args.out) / "models" / re.sub(r"[^\w.-]+", "_", str(Path(run).resolve()).strip("/")))
                 for run in args.runs}
    if not args.report_only:
        with _progress() as progress:
            for run in args.runs:
                evaluate_run(run, args.data, args.rollout, args.eval, args.reward, progress=progress,
                             eval_dir=eval_dirs[run])
    runs = {}
    for run in args.runs:
        path = Path(eval_dirs[run]) / "eval.jsonl"
        if not path.exists():
            raise SystemExit(f"{run}: no {path} (run without --report-only first)")
        runs[run] = read_eval(path)
    arms = dict(zip(args.runs, args.labels)) if args.labels else {run: run_arm(rows) for run, rows in runs.items()}
    metrics = {run: read_metrics(run) for run in args.runs}
    path = write_report(runs, metrics, arms, args.out, args.eval.splits, args.eval.settings)
    console.print(Path(args.out, "table.md").read_text())
    console.print(f"report: {path}")


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))

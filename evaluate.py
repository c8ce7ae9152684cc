"""evaluate.py: MAYE's evaluation scheme (stage 6): accuracy under three decodings, length, reflection; reports.

MAYE (arXiv 2504.02587, sec. 4): `evaluate_model` scores one engine on one split; `evaluate_run` a run's checkpoints,
into a resumable RUN/eval.jsonl; `write_report` writes Table 3, Figures 4 and 5 and report.md. Run alone:
    python evaluate.py --model toy/models/qwen2_5_vl-tiny --data-file toy/data/validation.jsonl --eval.max-tokens 64
    python evaluate.py --runs runs/rl runs/sft toy/models/qwen2_5_vl-tiny --out report --eval.max-tokens 64
"""
import gc
import json
import math
import re
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Literal, NamedTuple

from safetensors.torch import load_file

from common import read_jsonl
from data import DataConfig, fits_model, load_dataset
from reward import RewardConfig, score_batch
from rollout import RolloutConfig, make_engine


@dataclass(frozen=True)
class EvalConfig:
    settings: tuple[str, ...] = ("pass@1_t0.01", "pass@1_t0.6", "pass@8_t1.0")
    """Decodings 'pass@K_tT[_pP][_nN]': pass@K at temperature T, top_p P (0.001 if T<=0.01 else 1), N samples (K)."""
    max_tokens: int = 2048  # Max new tokens per response (MAYE 2048; the toy task needs 64).
    splits: tuple[Literal["train", "validation", "test"], ...] = ("validation", "test")  # --runs: --data.X files
    every_k: int = 1  # Evaluate every k-th checkpoint of a run (the last one always).
    limit: int = 0  # Evaluate only the first `limit` problems of each split (0 = all).
    seed: int | None = 0  # Sampling seed: prompt i gets seed + i*n, as in one engine call (None = unseeded).
    unbiased: bool = False  # pass@k by Chen et al. (2021)'s unbiased estimator from N>=K samples, not 'any of K'.
    batch_size: int = 256  # Prompts per engine.generate call (the progress bar advances per batch).
    save_responses: bool = True  # Write responses and verdicts to RUN/eval_responses/CHECKPOINT/SPLIT_SETTING.jsonl.


REFLECTION_WORDS = ("re-check", "re-evaluate", "re-examine", "re-think", "recheck", "reevaluate", "reexamine",
                    "reevaluation", "rethink", "check again", "think again", "try again", "verify", "wait", "yet")
Setting = NamedTuple("Setting", [("name", str), ("k", int), ("n", int), ("temperature", float), ("top_p", float)])
EVAL_KEYS = ("checkpoint", "step", "epoch", "kind", "split", "setting", "max_tokens", "limit", "accuracy")
ARM_COLOURS = {"vanilla": "0.35", "sft": "tab:blue", "rl": "tab:red"}  # MAYE's column order; others: C3, C4...
FIGURE4 = [  # MAYE Figure 4 panels: (title, x, y label, [(metrics.jsonl key, line style, label suffix)])
    ("Training accuracy per epoch", "epoch", "accuracy", [("train/epoch_accuracy", "-", "")]),
    ("Response length", "step", "mean tokens per response", [("response/lengths", "-", "")]),
    ("Reflection ratio", "step", "fraction of responses", [("reflection/reflection_ratio", "-", "")]),
    ("Reflection ratio: correct vs incorrect answers", "step", "fraction of responses",
     [("reflection/reflection_ratio_in_correct_answers", "-", " correct"),
      ("reflection/reflection_ratio_in_incorrect_answers", "--", " incorrect")])]


def parse_setting(name: str) -> Setting:
    """'pass@8_t1.0' -> Setting(k=8, n=8, T=1.0, top_p=1.0); 'pass@1_t0.01' -> top_p 0.001 (MAYE's near-greedy)."""
    m = re.fullmatch(r"pass@(\d+)_t(\d+(?:\.\d*)?)(?:_p(\d*\.?\d+(?:e-?\d+)?))?(?:_n(\d+))?", name)
    if not m:
        raise ValueError(f"eval setting {name!r}: expected 'pass@K_tT[_pP][_nN]', e.g. 'pass@8_t1.0'")
    k, t, n = int(m.group(1)), float(m.group(2)), int(m.group(4) or m.group(1))
    top_p = float(m.group(3)) if m.group(3) else (0.001 if t <= 0.01 else 1.0)
    if k < 1 or n < k or not 0 < top_p <= 1:
        raise ValueError(f"eval setting {name!r}: need 1 <= K <= N and 0 < top_p <= 1")
    return Setting(name, k, n, t, top_p)


def pass_at_k(correct: list[list[bool]], k: int, unbiased: bool = False) -> float:
    """Mean over problems of pass@k from n >= k verdicts each: MAYE's 'any of the first k correct', or unbiased (Chen
    et al. 2021, eq. 1) 1 - C(n-c, k) / C(n, k) for c correct, computed as 1 - prod_{i=n-c+1..n} (1 - k/i)."""
    if not correct or min(map(len, correct)) < k:
        raise ValueError(f"pass_at_k: no problems, or one with fewer than k={k} responses")
    if not unbiased:
        return sum(any(c[:k]) for c in correct) / len(correct)
    total = 0
    for c in correct:
        wrong = len(c) - sum(map(bool, c))
        total += 1.0 if wrong < k else 1.0 - math.prod(1.0 - k / i for i in range(wrong + 1, len(c) + 1))
    return total / len(correct)


def reflection_stats(responses: list[str], correct: list[bool], words=REFLECTION_WORDS) -> dict:
    """MAYE's reflection statistics: five ratios (0 when a denominator is 0) and per-word total occurrences `words/<w>`.
    N responses, R = contain any word (lower-case substring), C = correct, RC = both: reflection_ratio R/N,
    ..._in_correct_answers RC/C, ..._in_incorrect_answers (R-RC)/(N-C), correct_ratio_in_reflection_texts RC/R,
    correct_ratio_in_no_reflection_texts (C-RC)/(N-R)."""
    if len(responses) != len(correct) or not all(isinstance(t, str) for t in responses):
        raise ValueError(f"reflection_stats: {len(responses)} responses (strings needed), {len(correct)} correct flags")
    hits = [{w: text.lower().count(w) for w in words} for text in responses]  # per response: count of each word
    refl, ok = [any(h.values()) for h in hits], [bool(c) for c in correct]
    n, r, c, rc = len(ok), sum(refl), sum(ok), sum(x and y for x, y in zip(refl, ok))
    ratios = {"reflection_ratio": (r, n), "reflection_ratio_in_correct_answers": (rc, c),
              "reflection_ratio_in_incorrect_answers": (r - rc, n - c), "correct_ratio_in_reflection_texts": (rc, r),
              "correct_ratio_in_no_reflection_texts": (c - rc, n - r)}
    out = {name: a / b if b else 0.0 for name, (a, b) in ratios.items()}
    return out | {f"words/{w}": sum(h[w] for h in hits) for w in words}


def evaluate_model(engine, samples, cfg: EvalConfig = EvalConfig(), reward_cfg: RewardConfig = RewardConfig(),
                   settings: tuple[str, ...] | None = None, on_batch: Callable[[int], None] = lambda m: None) -> dict:
    """{setting: {accuracy (pass_at_k; a response is correct if its reward accuracy > 0.5, truncated or not, as in
    MAYE), mean_length (generated tokens), length_clip_ratio, format_ratio, response_accuracy, n_problems, n_responses,
    reflection/* (reflection_stats), records}}. on_batch(prompts done) drives a progress bar."""
    out = {}
    for s in map(parse_setting, settings if settings is not None else cfg.settings):
        responses = []  # (sample, index among its n, completion), problem-major
        for b in range(0, len(samples), cfg.batch_size):
            chunk = samples[b:b + cfg.batch_size]
            seed = None if cfg.seed is None else cfg.seed + b * s.n  # the seeds of one call for all prompts
            got = engine.generate(chunk, n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=cfg.max_tokens,
                                  seed=seed)
            if len(got) != len(chunk) or any(len(g) != s.n for g in got):
                raise RuntimeError(f"engine.generate returned {[len(g) for g in got]} completions for "
                                   f"{len(chunk)} prompts x n={s.n}")
            for x, completions in zip(chunk, got):
                responses += [(x, j, c) for j, c in enumerate(completions)]
            on_batch(len(chunk))
        texts, N = [c.text for _, _, c in responses], len(responses)
        stopped = [c.finish_reason == "stop" for _, _, c in responses]
        scores = score_batch(texts, [x.answer for x, _, _ in responses], stopped, reward_cfg)
        ok = [r["accuracy"] > 0.5 for r in scores]
        records = []
        for (x, j, c), r, v in zip(responses, scores, ok):
            records.append(dict(id=x.id, sample=j, response=c.text, answer=x.answer, pred=r["pred"],
                                accuracy=r["accuracy"], correct=v, finish_reason=c.finish_reason,
                                length=len(c.token_ids), reason=r["reason"]))
        out[s.name] = {
            "accuracy": pass_at_k([ok[i:i + s.n] for i in range(0, N, s.n)], s.k, cfg.unbiased),
            "mean_length": sum(len(c.token_ids) for _, _, c in responses) / N,
            "length_clip_ratio": sum(c.finish_reason == "length" for _, _, c in responses) / N,
            "format_ratio": sum(r["format"] for r in scores) / N, "response_accuracy": sum(ok) / N,
            "n_problems": len(samples), "n_responses": N, "records": records,
            **{f"reflection/{k}": v for k, v in reflection_stats(texts, ok).items()}}
    return out


def validate(engine, samples, reward_cfg: RewardConfig, max_tokens: int) -> dict:
    """The trainers' validation: greedy pass@1 (MAYE's T=0.01, top_p=0.001) accuracy and mean length."""
    res = evaluate_model(engine, samples, EvalConfig(settings=("pass@1_t0.01",), max_tokens=max_tokens), reward_cfg)
    return {"val/accuracy": res["pass@1_t0.01"]["accuracy"], "val/mean_length": res["pass@1_t0.01"]["mean_length"]}


# ---- whole runs ----------------------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[dict]:
    """[{name, path, step, epoch, kind}] by step: RUN/checkpoints/*/, or a plain HF model dir as 'vanilla' step 0."""
    run, out = Path(run_dir), []
    if not (run / "checkpoints").is_dir():
        if (run / "config.json").is_file() and "model_type" in json.loads((run / "config.json").read_text()):
            return [{"name": "model", "path": str(run), "step": 0, "epoch": 0.0, "kind": "vanilla"}]
        raise ValueError(f"{run}: neither a run dir (checkpoints/) nor an HF model dir (config.json with model_type)")
    for d in sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir() and p.suffix != ".tmp"):  # complete
        st = json.loads((d / "vlrl_state.json").read_text())
        out.append({"name": d.name, "path": str(d), "step": int(st["step"]), "epoch": float(st["epoch"]),
                    "kind": str(st["kind"])})
    return sorted(out, key=lambda c: c["step"])


def load_checkpoint(engine, ck: dict, rollout_cfg: RolloutConfig, data_cfg: DataConfig, engine_fn=None):
    """An engine on checkpoint `ck`: a new one, or the run's vLLM `engine` given the checkpoint's weights."""
    try:
        if engine is None or engine_fn or rollout_cfg.engine != "vllm":
            return engine_fn(ck["path"]) if engine_fn else make_engine(ck["path"], rollout_cfg, data_cfg)
        for f in sorted(Path(ck["path"]).glob("*.safetensors")):
            engine.update_weights(load_file(f).items())
        return engine
    except Exception as e:  # re-raised with the checkpoint named: the caller sees which one is broken
        raise RuntimeError(f"checkpoint {ck['path']} failed to load: {type(e).__name__}: {e}") from e


def evaluate_run(run_dir: str | Path, data_cfg: DataConfig = DataConfig(), rollout_cfg: RolloutConfig = RolloutConfig(),
                 cfg: EvalConfig = EvalConfig(), reward_cfg: RewardConfig = RewardConfig(),
                 engine_fn: Callable[[str], object] | None = None, progress=None, eval_dir=None) -> list[dict]:
    """Every cfg.every_k-th checkpoint and the last, on cfg.splits x cfg.settings, one line each appended to
    EVAL_DIR/eval.jsonl (default RUN/) as it is done; lines already there are skipped. Returns all the file's rows."""
    ckpts = list_checkpoints(run_dir)
    ckpts = [c for i, c in enumerate(ckpts) if i % max(cfg.every_k, 1) == 0 or i == len(ckpts) - 1]
    settings = [parse_setting(s) for s in cfg.settings]
    out_dir = Path(eval_dir or run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_path = out_dir / "eval.jsonl"
    rows = read_jsonl(eval_path, EVAL_KEYS) if eval_path.exists() else []
    for r in rows:
        if (r["max_tokens"], r["limit"]) != (cfg.max_tokens, cfg.limit):
            raise ValueError(f"{eval_path} has results at max_tokens={r['max_tokens']}, limit={r['limit']}; "
                             f"this call asks for {cfg.max_tokens}, {cfg.limit}: move that file away first")
    done = {(r["checkpoint"], r["split"], r["setting"]) for r in rows}
    todo = [(c, sp, s) for c in ckpts for sp in cfg.splits for s in settings if (c["name"], sp, s.name) not in done]
    fits = None  # prompt lengths and images vs our engines' limits
    if todo and not engine_fn:
        fits = fits_model(ckpts[-1]["path"], data_cfg, cfg.max_tokens, rollout_cfg.max_model_len,
                          rollout_cfg.max_images)
    data = {}  # every split is loaded and checked before any model is
    for _, sp, _ in todo:
        if sp not in data:
            data[sp] = load_dataset(getattr(data_cfg, sp), data_cfg, fits)[:cfg.limit or None]  # --data.<split>
    task = progress.add_task(Path(run_dir).name, total=sum(len(data[sp]) for _, sp, _ in todo)) if progress else None
    on_batch = partial(progress.advance, task) if progress else lambda prompts_done: None
    engine = None  # a vLLM engine serves the whole run
    for ck in ckpts:
        mine = [(sp, s) for c, sp, s in todo if c is ck]
        if not mine:
            continue
        engine = load_checkpoint(engine, ck, rollout_cfg, data_cfg, engine_fn)
        for sp, s in mine:
            t0 = time.perf_counter()
            res = evaluate_model(engine, data[sp], cfg, reward_cfg, (s.name,), on_batch)[s.name]
            res["time_s"] = round(time.perf_counter() - t0, 3)
            records = res.pop("records")  # to eval_responses/, not eval.jsonl
            if cfg.save_responses:
                responses_dir = out_dir / "eval_responses" / ck["name"]
                responses_dir.mkdir(parents=True, exist_ok=True)
                (responses_dir / f"{sp}_{s.name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            with open(eval_path, "a", encoding="utf-8") as f:  # a line per result as it is done: resumable
                f.write(json.dumps({"run": str(run_dir), "checkpoint": ck["name"], "step": ck["step"],
                                    "epoch": ck["epoch"], "kind": ck["kind"], "split": sp, "setting": s.name,
                                    "k": s.k, "n": s.n, "temperature": s.temperature, "top_p": s.top_p,
                                    "max_tokens": cfg.max_tokens, "limit": cfg.limit, **res}) + "\n")
    del engine  # the run's engine (a vLLM one holds GPU memory) goes before the next run's starts
    gc.collect()
    return read_jsonl(eval_path, EVAL_KEYS) if eval_path.exists() else []


# ---- several runs: MAYE Table 3, Figures 4 and 5, report.md --------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def percent(mean_and_std: tuple[float, float], with_std: bool) -> str:
    return f"{100 * mean_and_std[0]:.1f}" + (f" ± {100 * mean_and_std[1]:.1f}" if with_std else "")


def arm_order(arms) -> list[str]:
    """vanilla, sft, rl first (MAYE's column order), then any other label alphabetically."""
    return [a for a in ARM_COLOURS if a in arms] + sorted(set(arms) - set(ARM_COLOURS))


def aggregate(runs: dict[str, list[dict]], arms: dict[str, str], split: str, setting: str,
              metric: str = "accuracy") -> dict[str, dict]:
    """MAYE Table 3 for one split x setting. Per run: the mean and max of `metric` over its epochs (epoch > 0; all
    for a vanilla model). Per arm: {n, mean: (mean, std) across runs, max: (mean, std), per_run: {run: {mean, max}}}."""
    per_arm: dict[str, dict] = {}
    for run, rows in runs.items():
        mine = [r for r in rows if r["split"] == split and r["setting"] == setting]
        if not mine:
            continue
        trained = [r for r in mine if r["epoch"] > 0]
        vals = [float(r[metric]) for r in trained or mine]
        per_arm.setdefault(arms[run], {})[run] = {"mean": sum(vals) / len(vals), "max": max(vals), "epochs": len(vals)}
    out = {}
    for arm, per_run in per_arm.items():
        means, maxes = [p["mean"] for p in per_run.values()], [p["max"] for p in per_run.values()]
        out[arm] = {"n": len(per_run), "mean": mean_std(means), "max": mean_std(maxes), "per_run": per_run}
    return out


def table_markdown(runs: dict[str, list[dict]], arms: dict[str, str], splits, settings) -> str:
    """A MAYE-Table-3 markdown table per setting: rows Vanilla, <arm> mean, <arm> max; columns splits; % mean ± std."""
    tables = []
    for setting in settings:
        agg = {sp: aggregate(runs, arms, sp, setting) for sp in splits}
        present = arm_order({arm for per_split in agg.values() for arm in per_split})
        if not present:
            continue
        lines = [f"**{setting}** (accuracy %, mean ± std across runs)", "", "| | " + " | ".join(splits) + " |",
                 "|---|" + "---:|" * len(splits)]
        for stat in ("mean", "max"):
            for arm in present:
                if (arm, stat) == ("vanilla", "max"):
                    continue  # an untrained model has one checkpoint: its mean is its max
                n = max(agg[sp][arm]["n"] for sp in splits if arm in agg[sp])
                name = "Vanilla" if arm == "vanilla" else f"{arm.upper() if len(arm) <= 4 else arm} {stat}"
                cells = [percent(agg[sp][arm][stat], agg[sp][arm]["n"] > 1) if arm in agg[sp] else "–"
                         for sp in splits]
                lines.append(f"| {name} ({n} run{'s' * (n > 1)}) | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables) + "\n"


def series(rows: list[dict], key: str, x: str, where: str = "") -> dict[float, float]:
    """{x: value} of `key` over the metric rows that have it (a later line at the same x wins: resumed runs)."""
    for r in rows:
        if key in r and (isinstance(r[key], bool) or not isinstance(r[key], (int, float))):
            raise ValueError(f"{where}: {key!r} at {x}={r[x]} is {r[key]!r}, expected a number")
    return {float(r[x]): float(r[key]) for r in rows if key in r}


def findings(runs: dict[str, list[dict]], metrics: dict[str, list[dict]], arms: dict[str, str], splits,
             settings) -> list[str]:
    """'What this shows', written from the numbers: RL vs SFT per split (Table 3's mean over epochs; a gap counts when
    it exceeds the larger std across runs) and per decoding on the last split; the last checkpoints' response length
    and reflection ratio (first split, a sampled decoding where there is one); length vs reflection over RL steps."""
    out = []
    for sp in splits:
        agg = aggregate(runs, arms, sp, settings[0])
        if not {"sft", "rl"} <= set(agg):
            continue
        (rl, rl_std), (sft, sft_std) = agg["rl"]["mean"], agg["sft"]["mean"]
        verdict = ("one run per arm, no spread to judge it by (`SEEDS=3`)." if min(agg["rl"]["n"], agg["sft"]["n"]) < 2
                   else "more than the spread across runs." if abs(rl - sft) > max(rl_std, sft_std)
                   else "within the spread across runs, so not a clear difference.")
        means = "".join(f"{a} {percent(agg[a]['mean'], bool(agg[a]['mean'][1]))}, " for a in arm_order(agg))
        out.append(f"- **{sp}**{' (out of distribution)' * (sp == 'test')}, {settings[0]}, mean over epochs: {means}"
                   f"so {'RL' if rl > sft else 'SFT'} leads by {100 * abs(rl - sft):.1f} points: {verdict}")
    last_split = {s: aggregate(runs, arms, splits[-1], s) for s in settings}
    compared = [s for s, agg in last_split.items() if {"sft", "rl"} <= set(agg)]
    wins = [s for s in compared if last_split[s]["rl"]["mean"][0] > last_split[s]["sft"]["mean"][0]]
    if compared:
        out.append(f"- On {splits[-1]}, RL's mean beats SFT's in {len(wins)} of {len(compared)} decodings"
                   + (f" ({', '.join(wins)})." if wins else "."))
    setting = next((s for s in settings if parse_setting(s).temperature > 0.01), settings[0])
    for key, name, scale, unit in (("mean_length", "Response length", 1, " tokens"),
                                   ("reflection/reflection_ratio", "Reflection ratio", 100, "%")):
        last = {}  # arm -> [value at each run's last evaluated checkpoint]
        for run, rows in runs.items():
            mine = [r for r in rows if (r["split"], r["setting"]) == (splits[0], setting) and key in r]
            if mine:
                last.setdefault(arms[run], []).append(scale * max(mine, key=lambda r: r["step"])[key])
        values = []
        for arm in arm_order(last):
            m, sd = mean_std(last[arm])
            values.append(f"{arm} {m:.1f}" + (f" ± {sd:.1f}" if sd else "") + unit)
        out.append(f"- {name} at the last checkpoint ({splits[0]}, {setting}): " + ", ".join(values) + ".")
    corr = []  # Pearson's r of length and reflection ratio over each RL run's steps (undefined for a constant series)
    for run, rows in metrics.items():
        both = [r for r in rows if "reflection/reflection_ratio" in r and "response/lengths" in r]
        lengths = [float(r["response/lengths"]) for r in both]
        ratios = [float(r["reflection/reflection_ratio"]) for r in both]
        if arms[run] == "rl" and len(both) > 2 and len(set(lengths)) > 1 and len(set(ratios)) > 1:
            corr.append(f"{statistics.correlation(lengths, ratios):+.2f}")
    if corr:
        out.append("- Over RL's steps, response length and reflection ratio correlate at " + ", ".join(corr)
                   + " (Pearson, one figure per run; MAYE Figure 4 pairs them).")
    return out


def figure(path: Path, title: str, panels: list, arms: dict[str, str], colours: dict[str, str], ncols: int, figsize,
           empty: str, ylim=None) -> None:
    """PNG of panels (title, xlabel, ylabel, [(label suffix, line style, {run: {x: y}})]): per arm (in the order and
    colours of `colours`), mean ± std (shaded, clipped at 0 for non-negative data) across its runs (`arms`: run ->
    arm); a vanilla arm with one point per run as a dashed level."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing to close
    fig = Figure(figsize=figsize, constrained_layout=True)
    axes = fig.subplots(math.ceil(len(panels) / ncols), ncols, squeeze=False)
    for ax, (panel_title, xlabel, ylabel, curves) in zip(axes.flat, panels):
        for arm, colour in colours.items():
            for suffix, style, data in curves:
                per_run = [s for run, s in data.items() if arms[run] == arm and s]
                if not per_run:
                    continue
                xs = sorted({x for s in per_run for x in s})
                m, sd = zip(*[mean_std([s[x] for s in per_run if x in s]) for x in xs])  # over the runs that have x
                label = f"{arm}{suffix} (n={len(per_run)})"
                if arm == "vanilla" and len(xs) == 1:  # an untrained model: a level across the panel
                    ax.axhline(m[0], color=colour, ls="--", lw=1.8, label=label)
                    ax.axhspan(m[0] - sd[0], m[0] + sd[0], color=colour, alpha=0.12 if sd[0] else 0, lw=0)
                    continue
                ax.plot(xs, m, style, color=colour, label=label, lw=1.8, marker="o" if len(xs) < 12 else None, ms=3)
                floor = 0.0 if min(v for s in per_run for v in s.values()) >= 0 else -math.inf
                ax.fill_between(xs, [max(a - b, floor) for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                                color=colour, alpha=0.18, lw=0)
        ax.set(title=panel_title, xlabel=xlabel, ylabel=ylabel)
        if ylim:
            ax.set_ylim(ylim)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=9)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", color="0.4", transform=ax.transAxes)
    fig.suptitle(title, fontsize=14)
    fig.savefig(path, dpi=110)


def figure4(metrics: dict[str, list[dict]]) -> list:
    """`figure`'s panels for MAYE Figure 4: FIGURE4, then the two most frequent reflection words; before any epoch
    ends, the rollouts' accuracy per step in the first panel."""
    logged = [r for rows in metrics.values() for r in rows]
    totals = {}  # reflection/words/<w> -> occurrences over all logged steps
    for r in logged:
        for k, v in r.items():
            if k.startswith("reflection/words/") and isinstance(v, (int, float)):
                totals[k] = totals.get(k, 0) + v
    words = [k for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v > 0][:2]
    panels = list(FIGURE4)
    for w in words:
        panels.append((f"Reflection word '{w.removeprefix('reflection/words/')}'", "step", "occurrences per step",
                       [(w, "-", "")]))
    panels += [("Reflection word", "step", "occurrences per step", [])] * (2 - len(words))
    if not any("train/epoch_accuracy" in r for r in logged):
        panels[0] = ("Training accuracy per step (no epoch finished)", "step", "accuracy",
                     [("rews/acc_rewards", "-", "")])
    out = []
    for title, x, ylabel, keys in panels:
        curves = []
        for key, style, suffix in keys:
            per_run = {run: series(rows, key, x, f"{run}/metrics.jsonl") for run, rows in metrics.items()}
            curves.append((suffix, style, per_run))
        out.append((title, x, ylabel, curves))
    return out


def log_check(runs: dict[str, list[dict]], metrics: dict[str, list[dict]]) -> list[str]:
    """report.md's check: validation pass@1_t0.01 here vs `val/accuracy` and `val/mean_length` logged during training
    at the same step (nan where no length was logged); nothing if no step has both."""
    table, differences = [], []
    for run, rows in runs.items():
        acc = series(metrics.get(run, []), "val/accuracy", "step", f"{run}/metrics.jsonl")
        length = series(metrics.get(run, []), "val/mean_length", "step", f"{run}/metrics.jsonl")
        for r in rows:
            step = float(r["step"])
            if (r["split"], r["setting"]) != ("validation", "pass@1_t0.01") or step not in acc:
                continue
            differences.append(abs(acc[step] - r["accuracy"]))
            table.append(f"| `{run}` | {r['step']} | {100 * acc[step]:.1f} | {100 * r['accuracy']:.1f} | "
                         f"{length.get(step, math.nan):.2f} | {r.get('mean_length', math.nan):.2f} |")
    if not table:
        return []
    return ["## Check: evaluation vs the training log", "",
            "validation pass@1_t0.01 here vs `val/accuracy` and `val/mean_length` logged during training at the "
            f"same step (largest accuracy difference {100 * max(differences):.1f} points):", "",
            "| run | step | accuracy % (log) | accuracy % (eval) | mean length (log) | mean length (eval) |",
            "|---|---:|---:|---:|---:|---:|", *table]


def write_report(runs: dict[str, list[dict]], metrics: dict[str, list[dict]], arms: dict[str, str], out: str | Path,
                 splits=("validation", "test"), settings=EvalConfig.settings) -> Path:
    """OUT/report.md: Table 3 (also table.md), Figures 4 and 5 (PNGs), a check against the logged val/* at each step."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = table_markdown(runs, arms, splits, settings)
    (out / "table.md").write_text(table)
    colours = {a: ARM_COLOURS.get(a, f"C{(k + 3) % 10}") for k, a in enumerate(arm_order(set(arms.values())))}
    figure(out / "training_curves.png", "Training dynamics (mean ± std across runs)", figure4(metrics), arms, colours,
           3, (16, 8.5), "no data in metrics.jsonl")
    figure5 = []
    for setting in settings:
        for sp in splits:
            per_run = {}
            for run, rows in runs.items():
                per_run[run] = {r["epoch"]: r["accuracy"] for r in rows if (r["split"], r["setting"]) == (sp, setting)}
            figure5.append((f"{sp}: {setting}", "epoch", "accuracy", [("", "-", per_run)]))
    figure(out / "accuracy_per_epoch.png", "Accuracy per epoch (mean ± std across runs)", figure5, arms, colours,
           len(splits), (6.5 * len(splits), 3.6 * len(settings) + 0.6), "not evaluated", ylim=(-0.02, 1.02))
    lines = ["# vlrl evaluation report", "", "## Runs", "", "| run | arm | checkpoints evaluated | metrics lines |",
             "|---|---|---:|---:|"]
    for run, rows in runs.items():
        checkpoints = len({r["checkpoint"] for r in rows})
        lines.append(f"| `{run}` | {arms[run]} | {checkpoints} | {len(metrics.get(run, []))} |")
    lines += ["", "## Accuracy (MAYE Table 3)", "",
              "Mean: per run, the mean over its epochs (checkpoints after epoch 0), then mean ± std across runs. "
              "Max: per run, the best epoch, then mean ± std across runs.", "", table,
              "## What this shows", "", *findings(runs, metrics, arms, splits, settings), "",
              "## Training dynamics (MAYE Figure 4)", "", "![training curves](training_curves.png)", "",
              "## Accuracy per epoch (MAYE Figure 5)", "", "![accuracy per epoch](accuracy_per_epoch.png)", "",
              *log_check(runs, metrics)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


# ---- CLI -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Args:
    model: str = ""  # One model dir (HF format) to evaluate on --data-file; prints a table.
    data_file: str = ""  # Split file for --model (MAYE jsonl, verl parquet or messages jsonl), read by data.py.
    runs: tuple[str, ...] = ()  # Run dirs (RUN/checkpoints/*) and/or plain model dirs (vanilla) to evaluate, compare.
    labels: tuple[str, ...] = ()  # Arm of each --runs entry (e.g. rl rl sft vanilla); default: the checkpoints' kind.
    out: str = ""  # --runs: report dir (plain model dirs' evals: OUT/models/); --model: results.json, responses.jsonl.
    report_only: bool = False  # --runs: do not evaluate; draw the report from the eval.jsonl files already written.
    eval: EvalConfig = EvalConfig()
    data: DataConfig = DataConfig()  # Split files and prompt settings (the same --data.* flags as train.py, sft.py).
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()


def evaluate_one_model(args: Args, progress) -> None:
    """--model DIR --data-file FILE: a table of the settings; with --out, results.json and responses.jsonl."""
    from rich.table import Column, Table
    fits = fits_model(args.model, args.data, args.eval.max_tokens, args.rollout.max_model_len, args.rollout.max_images)
    samples = load_dataset(args.data_file, args.data, fits)[:args.eval.limit or None]
    settings = [parse_setting(s) for s in args.eval.settings]  # a bad one fails before the model loads
    engine = make_engine(args.model, args.rollout, args.data)
    with progress:
        task = progress.add_task(Path(args.model).name, total=len(samples) * len(settings))
        res = evaluate_model(engine, samples, args.eval, args.reward, on_batch=lambda m: progress.advance(task, m))
    title = f"{args.model} on {args.data_file} ({len(samples)} problems, max {args.eval.max_tokens} tokens)"
    columns = [Column(name, justify="right") for name in ("accuracy", "mean length", "clipped", "reflection ratio")]
    table = Table("setting", *columns, title=title)
    for name, r in res.items():
        table.add_row(name, f"{100 * r['accuracy']:.1f}%", f"{r['mean_length']:.1f}",
                      f"{100 * r['length_clip_ratio']:.1f}%", f"{100 * r['reflection/reflection_ratio']:.1f}%")
    progress.console.print(table)
    if args.out:
        responses, results = [], {}
        for name, r in res.items():
            responses += [json.dumps({"setting": name, **record}) + "\n" for record in r["records"]]
            results[name] = {k: v for k, v in r.items() if k != "records"}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "responses.jsonl").write_text("".join(responses))
        Path(args.out, "results.json").write_text(json.dumps(results, indent=1))


def main(args: Args) -> None:
    import rich.progress as rp
    progress = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                           rp.TimeElapsedColumn(), rp.TimeRemainingColumn())
    if bool(args.model) == bool(args.runs) or not (args.data_file if args.model else args.out):
        raise SystemExit("give either --model DIR --data-file FILE [--out DIR], or --runs DIR [DIR ...] --out DIR")
    if args.labels and len(args.labels) != len(args.runs):
        raise SystemExit(f"--labels has {len(args.labels)} entries for {len(args.runs)} --runs")
    if args.model:
        evaluate_one_model(args, progress)
        return
    eval_dirs = {}  # a plain model dir (vanilla) is not written into: its eval.jsonl goes to OUT/models/<its path>
    for run in args.runs:
        if (Path(run) / "checkpoints").is_dir():
            eval_dirs[run] = run
        else:
            flat_path = re.sub(r"[^\w.-]+", "_", str(Path(run).resolve()).strip("/"))
            eval_dirs[run] = str(Path(args.out) / "models" / flat_path)
    if not args.report_only:
        with progress:
            for run in args.runs:
                evaluate_run(run, args.data, args.rollout, args.eval, args.reward, progress=progress,
                             eval_dir=eval_dirs[run])
    runs = {run: read_jsonl(Path(eval_dirs[run]) / "eval.jsonl", EVAL_KEYS) for run in args.runs}
    if args.labels:
        arms = dict(zip(args.runs, args.labels))
    else:  # the `kind` of a run's last evaluated checkpoint (a run may start from a vanilla step 0)
        arms = {run: max(rows, key=lambda r: r["step"])["kind"] for run, rows in runs.items()}
    metrics = {}
    for run in args.runs:
        metrics_path = Path(run, "metrics.jsonl")
        metrics[run] = read_jsonl(metrics_path, ("step", "epoch")) if metrics_path.exists() else []
    path = write_report(runs, metrics, arms, args.out, args.eval.splits, args.eval.settings)
    progress.console.print(Path(args.out, "table.md").read_text())
    progress.console.print(f"report: {path}")


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))

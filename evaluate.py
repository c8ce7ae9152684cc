"""evaluate.py: MAYE's evaluation scheme (stage 6): accuracy under three decodings, length, reflection; reports.

MAYE (arXiv 2504.02587, sec. 4): `evaluate_model`: reward.py's accuracy at pass@1 T=0.01 (top_p 0.001), pass@1 T=0.6,
pass@8 T=1.0, length, truncation, reflection (`validate`: the trainers' pass@1 T=0.01). `evaluate_run`: a resumable
RUN/eval.jsonl (a line per checkpoint x split x setting; one engine per run). `write_report`: Table 3 (per run mean and
max over epochs, then mean ± std across an arm's runs), Figures 4 and 5, report.md. Run alone (--report-only redraws):
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
from pathlib import Path
from typing import Callable, Literal, NamedTuple

from common import figure, mean_std, read_jsonl
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
EVAL_KEYS = ("checkpoint", "step", "epoch", "kind", "split", "setting", "max_tokens", "limit", "accuracy")  # eval.jsonl
ARM_COLOURS = {"vanilla": "0.35", "sft": "tab:blue", "rl": "tab:red"}  # in MAYE's column order; others: C3, C4...
FIGURE4 = [  # MAYE Figure 4 panels: (title, x, y label, [(metrics.jsonl key, line style, label suffix)])
    ("Training accuracy per epoch", "epoch", "accuracy", [("train/epoch_accuracy", "-", "")]),
    ("Response length", "step", "mean tokens per response", [("response/lengths", "-", "")]),
    ("Reflection ratio", "step", "fraction of responses", [("reflection/reflection_ratio", "-", "")]),
    ("Reflection ratio: correct vs incorrect answers", "step", "fraction of responses",
     [("reflection/reflection_ratio_in_correct_answers", "-", " correct"),
      ("reflection/reflection_ratio_in_incorrect_answers", "--", " incorrect")])]


def parse_setting(name: str) -> Setting:
    """'pass@8_t1.0' -> Setting(k=8, n=8, T=1.0, top_p=1.0); 'pass@1_t0.01' -> top_p 0.001 (MAYE's near-greedy)."""
    if not (m := re.fullmatch(r"pass@(\d+)_t(\d+(?:\.\d*)?)(?:_p(\d*\.?\d+(?:e-?\d+)?))?(?:_n(\d+))?", name)):
        raise ValueError(f"eval setting {name!r}: expected 'pass@K_tT[_pP][_nN]', e.g. 'pass@8_t1.0'")
    k, t, n = int(m.group(1)), float(m.group(2)), int(m.group(4) or m.group(1))
    top_p = float(m.group(3)) if m.group(3) else (0.001 if t <= 0.01 else 1.0)
    if k < 1 or n < k or not 0 < top_p <= 1:
        raise ValueError(f"eval setting {name!r}: need 1 <= K <= N and 0 < top_p <= 1")
    return Setting(name, k, n, t, top_p)


def pass_at_k(correct: list[list[bool]], k: int, unbiased: bool = False) -> float:
    """Mean over problems of pass@k from n >= k verdicts each: MAYE's 'any of the first k correct', or unbiased (Chen et
    al. 2021, eq. 1) 1 - C(n-c, k) / C(n, k) for c correct, computed as 1 - prod_{i=n-c+1..n} (1 - k/i)."""
    if not correct or min(map(len, correct)) < k:
        raise ValueError(f"pass_at_k: no problems, or one with fewer than k={k} responses")
    if not unbiased:
        return sum(any(c[:k]) for c in correct) / len(correct)
    return sum(1.0 if (wrong := len(c) - sum(map(bool, c))) < k else
               1.0 - math.prod(1.0 - k / i for i in range(wrong + 1, len(c) + 1)) for c in correct) / len(correct)


def reflection_stats(responses: list[str], correct: list[bool], words=REFLECTION_WORDS) -> dict:
    """MAYE's reflection statistics: five ratios (0 when a denominator is 0) and per-word total occurrences `words/<w>`.
    N responses, R = contain any word (lower-case substring), C = correct, RC = both: reflection_ratio R/N,
    ..._in_correct_answers RC/C, ..._in_incorrect_answers (R-RC)/(N-C), correct_ratio_in_reflection_texts RC/R,
    correct_ratio_in_no_reflection_texts (C-RC)/(N-R)."""
    if len(responses) != len(correct) or not all(isinstance(t, str) for t in responses):
        raise ValueError(f"reflection_stats: {len(responses)} responses (strings needed), {len(correct)} correct flags")
    hits = [{w: low.count(w) for w in words} for low in map(str.lower, responses)]
    refl, ok = [any(h.values()) for h in hits], [bool(c) for c in correct]
    n, r, c, rc = len(ok), sum(refl), sum(ok), sum(x and y for x, y in zip(refl, ok))
    ratios = {"reflection_ratio": (r, n), "reflection_ratio_in_correct_answers": (rc, c),
              "reflection_ratio_in_incorrect_answers": (r - rc, n - c), "correct_ratio_in_reflection_texts": (rc, r),
              "correct_ratio_in_no_reflection_texts": (c - rc, n - r)}
    return {**{k: a / b if b else 0.0 for k, (a, b) in ratios.items()},
            **{f"words/{w}": sum(h[w] for h in hits) for w in words}}


def evaluate_model(engine, samples, cfg: EvalConfig = EvalConfig(), reward_cfg: RewardConfig = RewardConfig(),
                   settings: tuple[str, ...] | None = None, on_batch: Callable[[int], None] = lambda m: None) -> dict:
    """{setting: {accuracy (pass_at_k; a response is correct if its reward accuracy > 0.5, truncated or not, as in
    MAYE), mean_length (generated tokens), length_clip_ratio, format_ratio, response_accuracy, n_problems, n_responses,
    reflection/* (reflection_stats), records}}. on_batch(prompts done) drives a progress bar."""
    out = {}
    for s in map(parse_setting, settings if settings is not None else cfg.settings):
        comps = []
        for b in range(0, len(samples), cfg.batch_size):
            chunk = samples[b:b + cfg.batch_size]
            got = engine.generate(chunk, n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=cfg.max_tokens,
                                  seed=None if cfg.seed is None else cfg.seed + b * s.n)  # = one call's seeds
            if len(got) != len(chunk) or any(len(g) != s.n for g in got):
                raise RuntimeError(f"engine.generate returned {[len(g) for g in got]} completions for "
                                   f"{len(chunk)} prompts x n={s.n}")
            comps += got
            on_batch(len(chunk))
        flat = [(x, j, c) for x, cs in zip(samples, comps) for j, c in enumerate(cs)]  # (P*n,), problem-major
        texts, N = [c.text for _, _, c in flat], len(flat)
        scores = score_batch(texts, [x.answer for x, _, _ in flat], [c.finish_reason == "stop" for _, _, c in flat],
                             reward_cfg)
        ok = [r["accuracy"] > 0.5 for r in scores]
        records = [dict(id=x.id, sample=j, response=c.text, answer=x.answer, pred=r["pred"], accuracy=r["accuracy"],
                        correct=v, finish_reason=c.finish_reason, length=len(c.token_ids), reason=r["reason"])
                   for (x, j, c), r, v in zip(flat, scores, ok)]
        out[s.name] = {
            "accuracy": pass_at_k([ok[i:i + s.n] for i in range(0, N, s.n)], s.k, cfg.unbiased),
            "mean_length": sum(len(c.token_ids) for _, _, c in flat) / N,
            "length_clip_ratio": sum(c.finish_reason == "length" for _, _, c in flat) / N,
            "format_ratio": sum(r["format"] for r in scores) / N, "response_accuracy": sum(ok) / N,
            "n_problems": len(samples), "n_responses": N, "records": records,
            **{f"reflection/{k}": v for k, v in reflection_stats(texts, ok).items()}}
    return out


def validate(engine, samples, reward_cfg: RewardConfig, max_tokens: int) -> dict:
    """The trainers' validation: greedy pass@1 (MAYE's T=0.01, top_p=0.001) accuracy and mean length."""
    res = evaluate_model(engine, samples, EvalConfig(settings=("pass@1_t0.01",), max_tokens=max_tokens), reward_cfg)
    return {"val/accuracy": res["pass@1_t0.01"]["accuracy"], "val/mean_length": res["pass@1_t0.01"]["mean_length"]}


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


def evaluate_run(run_dir: str | Path, data_cfg: DataConfig = DataConfig(), rollout_cfg: RolloutConfig = RolloutConfig(),
                 cfg: EvalConfig = EvalConfig(), reward_cfg: RewardConfig = RewardConfig(),
                 engine_fn: Callable[[str], object] | None = None, progress=None, eval_dir=None) -> list[dict]:
    """Every cfg.every_k-th checkpoint and the last, on cfg.splits x cfg.settings, one line each appended to
    EVAL_DIR/eval.jsonl (default RUN/) as it is done; lines already there are skipped. Returns all the file's rows."""
    ckpts = list_checkpoints(run_dir)
    ckpts = [c for i, c in enumerate(ckpts) if i % max(cfg.every_k, 1) == 0 or i == len(ckpts) - 1]
    settings = [parse_setting(s) for s in cfg.settings]
    (run := Path(eval_dir or run_dir)).mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(eval_path, EVAL_KEYS) if (eval_path := run / "eval.jsonl").exists() else []
    if other := [r for r in rows if (r["max_tokens"], r["limit"]) != (cfg.max_tokens, cfg.limit)]:
        raise ValueError(f"{eval_path} has results at max_tokens={other[0]['max_tokens']}, limit={other[0]['limit']}; "
                         f"this call asks for {cfg.max_tokens}, {cfg.limit}: move that file away first")
    done = {(r["checkpoint"], r["split"], r["setting"]) for r in rows}
    todo = [(c, sp, s) for c in ckpts for sp in cfg.splits for s in settings if (c["name"], sp, s.name) not in done]
    data, fits = {}, None if engine_fn or not todo else fits_model(  # prompt lengths vs our engines' limit; images
        ckpts[-1]["path"], data_cfg, cfg.max_tokens, rollout_cfg.max_model_len, rollout_cfg.max_images)
    for sp in dict.fromkeys(sp for _, sp, _ in todo):  # load and check every split before any model is loaded
        data[sp] = load_dataset(getattr(data_cfg, sp), data_cfg, fits)[:cfg.limit or None]  # --data.<split>
    task = progress.add_task(Path(run_dir).name, total=sum(len(data[sp]) for _, sp, _ in todo)) if progress else None
    engine = None  # a vLLM engine serves the whole run
    for ck in ckpts:
        if not (mine := [(sp, s) for c, sp, s in todo if c is ck]):
            continue
        try:
            if engine is None or engine_fn or rollout_cfg.engine != "vllm":
                engine = engine_fn(ck["path"]) if engine_fn else make_engine(ck["path"], rollout_cfg, data_cfg)
            else:  # the checkpoint's weights into the run's vLLM engine (no second start-up), a file at a time
                from safetensors.torch import load_file
                shards = sorted(Path(ck["path"]).glob("*.safetensors"))
                engine.update_weights(kv for f in shards for kv in load_file(f).items())   # a file in memory at a time
        except Exception as e:  # re-raised with the checkpoint named: the caller sees which one is broken
            raise RuntimeError(f"checkpoint {ck['path']} failed to load: {type(e).__name__}: {e}") from e
        for sp, s in mine:
            t0 = time.perf_counter()
            res = evaluate_model(engine, data[sp], cfg, reward_cfg, (s.name,),
                                 on_batch=(lambda m: progress.advance(task, m)) if progress else lambda m: None)[s.name]
            records, res["time_s"] = res.pop("records"), round(time.perf_counter() - t0, 3)
            if cfg.save_responses:
                (rdir := run / "eval_responses" / ck["name"]).mkdir(parents=True, exist_ok=True)
                (rdir / f"{sp}_{s.name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            with open(eval_path, "a", encoding="utf-8") as f:  # a line per result as it is done: resumable
                f.write(json.dumps({"run": str(run_dir), "checkpoint": ck["name"], "step": ck["step"],
                                    "epoch": ck["epoch"], "kind": ck["kind"], "split": sp, "setting": s.name, "k": s.k,
                                    "n": s.n, "temperature": s.temperature, "top_p": s.top_p,
                                    "max_tokens": cfg.max_tokens, "limit": cfg.limit, **res}) + "\n")
    del engine
    gc.collect()
    return read_jsonl(eval_path, EVAL_KEYS) if eval_path.exists() else []


def arm_order(arms) -> list[str]:
    """vanilla, sft, rl first (MAYE's column order), then any other label alphabetically."""
    return [a for a in ARM_COLOURS if a in arms] + sorted(set(arms) - set(ARM_COLOURS))


def aggregate(runs: dict[str, list[dict]], arms: dict[str, str], split: str, setting: str,
              metric: str = "accuracy") -> dict[str, dict]:
    """MAYE Table 3 for one split x setting. Per run: the mean and max of `metric` over its epochs (epoch > 0; all
    for a vanilla model). Per arm: {n, mean: (mean, std) across runs, max: (mean, std), per_run: {run: {mean, max}}}."""
    per_arm: dict[str, dict] = {}
    for run, rows in runs.items():
        if mine := [r for r in rows if r["split"] == split and r["setting"] == setting]:
            vals = [float(r[metric]) for r in ([r for r in mine if r["epoch"] > 0] or mine)]
            per_arm.setdefault(arms[run], {})[run] = {"mean": sum(vals) / len(vals), "max": max(vals),
                                                      "epochs": len(vals)}
    return {arm: {"n": len(pr), "mean": mean_std([p["mean"] for p in pr.values()]),
                  "max": mean_std([p["max"] for p in pr.values()]), "per_run": pr} for arm, pr in per_arm.items()}


def table_markdown(runs: dict[str, list[dict]], arms: dict[str, str], splits, settings) -> str:
    """A MAYE-Table-3 markdown table per setting: rows Vanilla, <arm> mean, <arm> max; columns splits; % mean ± std."""
    out = []
    for setting in settings:
        agg = {sp: aggregate(runs, arms, sp, setting) for sp in splits}
        if not (present := arm_order({a for g in agg.values() for a in g})):
            continue
        out.append("\n".join([f"**{setting}** (accuracy %, mean ± std across runs)", "",
                              "| | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]))
        for stat, arm in [(st, a) for st in ("mean", "max") for a in present if (a, st) != ("vanilla", "max")]:
            n = max(agg[sp][arm]["n"] for sp in splits if arm in agg[sp])
            name = "Vanilla" if arm == "vanilla" else f"{arm.upper() if len(arm) <= 4 else arm} {stat}"
            cells = [(f"{100 * a[arm][stat][0]:.1f}" + (f" ± {100 * a[arm][stat][1]:.1f}" if a[arm]["n"] > 1 else ""))
                     if arm in (a := agg[sp]) else "–" for sp in splits]
            out[-1] += f"\n| {name} ({n} run{'s' * (n > 1)}) | " + " | ".join(cells) + " |"
    return "\n\n".join(out) + "\n"


def series(rows: list[dict], key: str, x: str, where: str = "") -> dict[float, float]:
    """{x: value} of `key` over the metric rows that have it (a later line at the same x wins: resumed runs)."""
    if bad := [r for r in rows if key in r and (isinstance(r[key], bool) or not isinstance(r[key], (int, float)))]:
        raise ValueError(f"{where}: {key!r} at {x}={bad[0][x]} is {bad[0][key]!r}, expected a number")
    return {float(r[x]): float(r[key]) for r in rows if key in r}


def findings(runs: dict[str, list[dict]], metrics: dict[str, list[dict]], arms: dict[str, str], splits,
             settings) -> list[str]:
    """'What this shows', written from the numbers: RL vs SFT per split (Table 3's mean over epochs; a gap counts when
    it exceeds the larger std across runs) and per decoding on the last split; the last checkpoints' response length
    and reflection ratio (first split, a sampled decoding where there is one); length vs reflection over RL steps."""
    out, pct = [], lambda ms: f"{100 * ms[0]:.1f}" + (f" ± {100 * ms[1]:.1f}" if ms[1] else "")
    for sp in splits:
        if {"sft", "rl"} <= set(agg := aggregate(runs, arms, sp, settings[0])):
            (r, rs), (f, fs), n = agg["rl"]["mean"], agg["sft"]["mean"], min(agg[a]["n"] for a in ("rl", "sft"))
            out.append(f"- **{sp}**{' (out of distribution)' * (sp == 'test')}, {settings[0]}, mean over epochs: " +
                       "".join(f"{a} {pct(agg[a]['mean'])}, " for a in arm_order(agg)) +
                       f"so {'RL' if r > f else 'SFT'} leads by {100 * abs(r - f):.1f} points: " + (
                           "one run per arm, no spread to judge it by (`SEEDS=3`)." if n < 2 else
                           "more than the spread across runs." if abs(r - f) > max(rs, fs) else
                           "within the spread across runs, so not a clear difference."))
    if both := {s: a for s in settings if {"sft", "rl"} <= set(a := aggregate(runs, arms, splits[-1], s))}:
        wins = [s for s, a in both.items() if a["rl"]["mean"][0] > a["sft"]["mean"][0]]
        out.append(f"- On {splits[-1]}, RL's mean beats SFT's in {len(wins)} of {len(both)} decodings" +
                   (f" ({', '.join(wins)})." if wins else "."))
    setting = next((s for s in settings if parse_setting(s).temperature > 0.01), settings[0])
    for key, name, scale, unit in (("mean_length", "response length", 1, " tokens"),
                                   ("reflection/reflection_ratio", "reflection ratio", 100, "%")):
        last = {}  # arm -> [value at each run's last evaluated checkpoint]
        for run, rows in runs.items():
            if mine := [r for r in rows if (r["split"], r["setting"]) == (splits[0], setting) and key in r]:
                last.setdefault(arms[run], []).append(scale * max(mine, key=lambda r: r["step"])[key])
        out.append(f"- {name.capitalize()} at the last checkpoint ({splits[0]}, {setting}): " + ", ".join(
            f"{a} {m:.1f}" + (f" ± {sd:.1f}" if sd else "") + unit for a in arm_order(last)
            for m, sd in [mean_std(last[a])]) + ".")
    corr, keys = [], ("response/lengths", "reflection/reflection_ratio")   # Pearson's r over each RL run's steps
    for run, rows in metrics.items():
        xy = [[float(r[k]) for k in keys] for r in rows if set(keys) <= r.keys()]
        if arms[run] == "rl" and len(xy) > 2 and all(len(set(v)) > 1 for v in zip(*xy)):   # r needs variation
            corr.append(statistics.correlation(*zip(*xy)))
    if corr:
        out.append("- Over RL's steps, response length and reflection ratio correlate at " + ", ".join(
            f"{c:+.2f}" for c in corr) + " (Pearson, one figure per run; MAYE Figure 4 pairs them).")
    return out


def write_report(runs: dict[str, list[dict]], metrics: dict[str, list[dict]], arms: dict[str, str], out: str | Path,
                 splits=("validation", "test"), settings=EvalConfig.settings) -> Path:
    """OUT/report.md: Table 3 (also table.md), Figures 4 and 5 (PNGs), a check against the logged val/* at each step."""
    (out := Path(out)).mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table := table_markdown(runs, arms, splits, settings))
    logged = [r for rows in metrics.values() for r in rows]  # Figure 4: also the two most frequent reflection words
    totals = {k: sum(r[k] for r in logged if isinstance(r.get(k), (int, float)))
              for k in dict.fromkeys(k for r in logged for k in r if k.startswith("reflection/words/"))}
    words = [k for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v > 0][:2]
    panels = FIGURE4 + [(f"Reflection word '{w[17:]}'", "step", "occurrences per step", [(w, "-", "")]) for w in words]
    panels += [("Reflection word", "step", "occurrences per step", [])] * (2 - len(words))
    if not any("train/epoch_accuracy" in r for r in logged):  # no epoch finished yet: the rollouts' accuracy
        panels[0] = ("Training accuracy per step (no epoch finished)", "step", "accuracy",
                     [("rews/acc_rewards", "-", "")])
    colours = {a: ARM_COLOURS.get(a, f"C{(k + 3) % 10}") for k, a in enumerate(arm_order(set(arms.values())))}
    figure(out / "training_curves.png", "Training dynamics (mean ± std across runs)", [
        (title, x, ylabel, [(suffix, style, {run: series(rows, key, x, f"{run}/metrics.jsonl")
                                             for run, rows in metrics.items()}) for key, style, suffix in keys])
        for title, x, ylabel, keys in panels], arms, colours, 3, (16, 8.5), "no data in metrics.jsonl")
    figure(out / "accuracy_per_epoch.png", "Accuracy per epoch (mean ± std across runs)", [
        (f"{sp}: {setting}", "epoch", "accuracy", [("", "-", {run: {r["epoch"]: r["accuracy"] for r in rows
         if (r["split"], r["setting"]) == (sp, setting)} for run, rows in runs.items()})])
        for setting in settings for sp in splits],
        arms, colours, len(splits), (6.5 * len(splits), 3.6 * len(settings) + 0.6), "not evaluated", ylim=(-0.02, 1.02))
    lines = ["# vlrl evaluation report", "", "## Runs", "", "| run | arm | checkpoints evaluated | metrics lines |",
             "|---|---|---:|---:|", *[f"| `{run}` | {arms[run]} | {len({r['checkpoint'] for r in rows})} | "
                                       f"{len(metrics.get(run, []))} |" for run, rows in runs.items()],
             "", "## Accuracy (MAYE Table 3)", "",
             "Mean: per run, the mean over its epochs (checkpoints after epoch 0), then mean ± std across runs. "
             "Max: per run, the best epoch, then mean ± std across runs.", "", table,
             "## What this shows", "", *findings(runs, metrics, arms, splits, settings), "",
             "## Training dynamics (MAYE Figure 4)", "", "![training curves](training_curves.png)", "",
             "## Accuracy per epoch (MAYE Figure 5)", "", "![accuracy per epoch](accuracy_per_epoch.png)", ""]
    check = []  # (run, step, logged accuracy, eval accuracy, logged mean length, eval mean length; NaN if absent)
    for run, rows in runs.items():
        acc, length = (series(metrics.get(run, []), k, "step", f"{run}/metrics.jsonl")
                       for k in ("val/accuracy", "val/mean_length"))
        check += [(run, r["step"], acc[float(r["step"])], r["accuracy"], length.get(float(r["step"]), math.nan),
                   r.get("mean_length", math.nan)) for r in rows
                  if (r["split"], r["setting"]) == ("validation", "pass@1_t0.01") and float(r["step"]) in acc]
    if check:
        lines += ["## Check: evaluation vs the training log", "",
                  "validation pass@1_t0.01 here vs `val/accuracy` and `val/mean_length` logged during training at the "
                  f"same step (largest accuracy difference {100 * max(abs(c[2] - c[3]) for c in check):.1f} points):",
                  "", "| run | step | accuracy % (log) | accuracy % (eval) | mean length (log) | mean length (eval) |",
                  "|---|---:|---:|---:|---:|---:|", *[f"| `{run}` | {step} | {100 * a:.1f} | {100 * b:.1f} | {la:.2f} "
                                                    f"| {lb:.2f} |" for run, step, a, b, la, lb in check]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


@dataclass(frozen=True)
class Args:
    model: str = ""  # One model dir (HF format) to evaluate on --data-file; prints a table.
    data_file: str = ""  # Split file for --model (MAYE jsonl, verl parquet or messages jsonl), as rollout.py's.
    runs: tuple[str, ...] = ()  # Run dirs (RUN/checkpoints/*) and/or plain model dirs (vanilla) to evaluate, compare.
    labels: tuple[str, ...] = ()  # Arm of each --runs entry (e.g. rl rl sft vanilla); default: the checkpoints' kind.
    out: str = ""  # --runs: report dir (plain model dirs' evals: OUT/models/); --model: results.json, responses.jsonl.
    report_only: bool = False  # --runs: do not evaluate; draw the report from the eval.jsonl files already written.
    eval: EvalConfig = EvalConfig()
    data: DataConfig = DataConfig()  # Split files and prompt settings (the same --data.* flags as train.py, sft.py).
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()


def main(args: Args) -> None:
    import rich.progress as rp
    from rich.table import Column, Table
    progress = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                           rp.TimeElapsedColumn(), rp.TimeRemainingColumn())
    if bool(args.model) == bool(args.runs) or not (args.data_file if args.model else args.out):
        raise SystemExit("give either --model DIR --data-file FILE [--out DIR], or --runs DIR [DIR ...] --out DIR")
    if args.labels and len(args.labels) != len(args.runs):
        raise SystemExit(f"--labels has {len(args.labels)} entries for {len(args.runs)} --runs")
    if args.model:
        fits = fits_model(args.model, args.data, args.eval.max_tokens, args.rollout.max_model_len,
                          args.rollout.max_images)
        samples = load_dataset(args.data_file, args.data, fits)[:args.eval.limit or None]
        settings = [parse_setting(s) for s in args.eval.settings]  # a bad one fails before the model loads
        engine = make_engine(args.model, args.rollout, args.data)
        with progress:
            task = progress.add_task(Path(args.model).name, total=len(samples) * len(settings))
            res = evaluate_model(engine, samples, args.eval, args.reward, on_batch=lambda m: progress.advance(task, m))
        table = Table("setting", *(Column(c, justify="right") for c in ("accuracy", "mean length", "clipped",
                      "reflection ratio")), title=f"{args.model} on {args.data_file} ({len(samples)} problems, max "
                      f"{args.eval.max_tokens} tokens)")
        for name, r in res.items():
            table.add_row(name, f"{100 * r['accuracy']:.1f}%", f"{r['mean_length']:.1f}",
                          f"{100 * r['length_clip_ratio']:.1f}%", f"{100 * r['reflection/reflection_ratio']:.1f}%")
        progress.console.print(table)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "responses.jsonl").write_text("".join(json.dumps({"setting": n, **rec}) + "\n"
                                                                 for n, r in res.items() for rec in r["records"]))
            Path(args.out, "results.json").write_text(json.dumps({n: {k: v for k, v in r.items() if k != "records"}
                                                                  for n, r in res.items()}, indent=1))
        return
    # a plain model dir (vanilla) is not written into: its eval.jsonl goes to OUT/models/<its path, flattened>
    eval_dirs = {run: run if (Path(run) / "checkpoints").is_dir() else
                 str(Path(args.out) / "models" / re.sub(r"[^\w.-]+", "_", str(Path(run).resolve()).strip("/")))
                 for run in args.runs}
    if not args.report_only:
        with progress:
            for run in args.runs:
                evaluate_run(run, args.data, args.rollout, args.eval, args.reward, progress=progress,
                             eval_dir=eval_dirs[run])
    runs = {run: read_jsonl(Path(eval_dirs[run]) / "eval.jsonl", EVAL_KEYS) for run in args.runs}
    # default arm: the `kind` of a run's last evaluated checkpoint (a run may start from a vanilla step 0)
    arms = dict(zip(args.runs, args.labels or [max(rows, key=lambda r: r["step"])["kind"] for rows in runs.values()]))
    metrics = {run: read_jsonl(p, ("step", "epoch")) if (p := Path(run, "metrics.jsonl")).exists() else []
               for run in args.runs}
    path = write_report(runs, metrics, arms, args.out, args.eval.splits, args.eval.settings)
    progress.console.print(Path(args.out, "table.md").read_text(), f"report: {path}", sep="\n")


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))

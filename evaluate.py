"""evaluate.py: MAYE's evaluation scheme (stage 6): accuracy under three decodings, length, reflection; reports.

MAYE (arXiv 2504.02587, sec. 4): `evaluate_model`: reward.py's accuracy at pass@1 T=0.01 (top_p 0.001), pass@1 T=0.6,
pass@8 T=1.0, length, truncation, reflection (`validate`: the trainers' pass@1 T=0.01; `epoch_accuracy`: train.py's
training accuracy per epoch). `evaluate_run`: a resumable RUN/eval.jsonl (a line per checkpoint x split x setting;
one engine per run). With --runs, `report.write_report` then draws Table 3, Figures 4 and 5 and report.md from those
files. Run alone (--report-only redraws the report):
    python evaluate.py --model toy/models/qwen2_5_vl-tiny --data-file toy/data/validation.jsonl --eval.max-tokens 64
    python evaluate.py --runs runs/rl runs/sft toy/models/qwen2_5_vl-tiny --out report --eval.max-tokens 64
"""
import gc
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple

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
EVAL_KEYS = ("checkpoint", "step", "epoch", "kind", "split", "setting", "max_tokens", "limit", "accuracy")  # eval.jsonl


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


def epoch_accuracy(rows: list[dict], metrics: dict, steps_per_epoch: int) -> dict[str, float]:
    """MAYE's training accuracy per epoch (Figure 4 in report.py), logged by train.py at an epoch's last step:
    {"train/epoch_accuracy": the mean of its steps' training accuracies} (every step has B responses), from this step's
    metrics and the logged rows of its earlier steps (a resumed run's too); else {}."""
    if metrics["step"] % steps_per_epoch:
        return {}
    accs = [r["rews/acc_rewards"] for r in rows if r["step"] > metrics["step"] - steps_per_epoch]
    return {"train/epoch_accuracy": (sum(accs) + metrics["rews/acc_rewards"]) / (len(accs) + 1)}


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
    from report import write_report   # report.py imports this module: a top-level import here would be circular
    path = write_report(runs, metrics, arms, args.out, args.eval.splits, args.eval.settings)
    progress.console.print(Path(args.out, "table.md").read_text(), f"report: {path}", sep="\n")


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))

"""report.py: MAYE's Table 3, Figures 4 and 5 and report.md, from evaluate.py's eval.jsonl files and the runs'
metrics.jsonl (evaluate.py's --runs calls `write_report`; --report-only redraws it without evaluating).

Table 3 (`table_markdown`): per run the mean and the max of an accuracy over its epochs, then mean ± std over an
arm's runs. Figure 4: training accuracy, response length and reflection ratios over steps; Figure 5: accuracy per
epoch for each split and decoding. `findings` writes "what this shows" from the numbers, with the spread across
runs as the bar.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from evaluate import EvalConfig, parse_setting

ARM_COLOURS = {"vanilla": "0.35", "sft": "tab:blue", "rl": "tab:red"}  # in MAYE's column order; others: C3, C4...
FIGURE4 = [  # MAYE Figure 4 panels: (title, x, y label, [(metrics.jsonl key, line style, label suffix)])
    ("Training accuracy per epoch", "epoch", "accuracy", [("train/epoch_accuracy", "-", "")]),
    ("Response length", "step", "mean tokens per response", [("response/lengths", "-", "")]),
    ("Reflection ratio", "step", "fraction of responses", [("reflection/reflection_ratio", "-", "")]),
    ("Reflection ratio: correct vs incorrect answers", "step", "fraction of responses",
     [("reflection/reflection_ratio_in_correct_answers", "-", " correct"),
      ("reflection/reflection_ratio_in_incorrect_answers", "--", " incorrect")])]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def figure(path: Path, title: str, panels: list, arms: dict[str, str], colours: dict[str, str], ncols: int, figsize,
           empty: str, ylim=None):
    """PNG of panels (title, xlabel, ylabel, [(label suffix, line style, {run: {x: y}})]): per arm (in the order and
    colours of `colours`), mean ± std (shaded, clipped at 0 for non-negative data) across its runs (`arms`: run ->
    arm); a vanilla arm with one point per run as a dashed level."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing to close
    fig = Figure(figsize=figsize, constrained_layout=True)
    axes = fig.subplots(-(-len(panels) // ncols), ncols, squeeze=False)
    for ax, (panel_title, xlabel, ylabel, curves) in zip(axes.flat, panels):
        for arm, colour in colours.items():
            for suffix, style, data in curves:
                if not (per_run := [s for run, s in data.items() if arms[run] == arm and s]):
                    continue
                xs = sorted({x for s in per_run for x in s})  # mean, std at each x over the runs that have it
                m, sd = zip(*[mean_std([s[x] for s in per_run if x in s]) for x in xs])
                label = f"{arm}{suffix} (n={len(per_run)})"
                if arm == "vanilla" and len(xs) == 1:  # an untrained model: a level across the panel
                    ax.axhline(m[0], color=colour, ls="--", lw=1.8, label=label)
                    ax.axhspan(m[0] - sd[0], m[0] + sd[0], color=colour, alpha=0.12 if sd[0] else 0, lw=0)
                    continue
                ax.plot(xs, m, style, color=colour, label=label, lw=1.8, marker="o" if len(xs) < 12 else None, ms=3)
                floor = 0.0 if min(v for s in per_run for v in s.values()) >= 0 else -math.inf
                ax.fill_between(xs, [max(a - b, floor) for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                                color=colour, alpha=0.18, lw=0)
        ax.set(title=panel_title, xlabel=xlabel, ylabel=ylabel, **({"ylim": ylim} if ylim else {}))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=9)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", color="0.4", transform=ax.transAxes)
    fig.suptitle(title, fontsize=14)
    fig.savefig(path, dpi=110)


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

"""Smoke test of the README's first command: `FAST=1 bash run.sh` runs the whole protocol (toy world -> vanilla
instruct model -> SFT and RL from it -> evaluation report) at tiny size, into a temp dir."""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS, SPLITS = ("pass@1_t0.01", "pass@1_t0.6", "pass@8_t1.0"), ("validation", "test")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def table3_cells(report: str) -> dict[tuple[str, str], list[float]]:
    """{(setting, row label such as 'RL mean'): [% per split]} from the report's Table 3 blocks."""
    cells, setting = {}, None
    for line in report.splitlines():
        if m := re.fullmatch(r"\*\*(pass@\S+)\*\* \(accuracy %.*", line):
            setting = m.group(1)
        elif setting and (m := re.fullmatch(r"\| (Vanilla|(?:SFT|RL) (?:mean|max)) \(1 run\) \| (.*) \|", line)):
            cells[setting, m.group(1)] = [float(c) for c in m.group(2).split(" | ")]
    return cells


@pytest.mark.slow
def test_fast_chain(tmp_path):
    env = dict(os.environ, FAST="1", TOY=str(tmp_path / "toy"), RUNS=str(tmp_path / "runs"))
    p = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    runs = tmp_path / "runs"
    assert f"report: {runs}/report/report.md" in p.stdout
    report = (runs / "report" / "report.md").read_text()
    vanilla = tmp_path / "toy" / "models" / "qwen2_5_vl-tiny-instruct"
    evals = {"vanilla": read_jsonl(next((runs / "report" / "models").glob("*/eval.jsonl"))),
             "sft": read_jsonl(runs / "sft_s1" / "eval.jsonl"), "rl": read_jsonl(runs / "rl_s1" / "eval.jsonl")}
    # the runs table: one row per arm, with its checkpoints (as on disk) and metrics lines (as in its file)
    assert f"| `{vanilla}` | vanilla | 1 | 0 |" in report, report[:1500]
    for arm in ("sft", "rl"):
        run = runs / f"{arm}_s1"
        n_ckpt, n_lines = len(list((run / "checkpoints").glob("step_*"))), len(read_jsonl(run / "metrics.jsonl"))
        assert f"| `{run}` | {arm} | {n_ckpt} | {n_lines} |" in report, (arm, report[:1500])
    # Table 3, every cell: the arm's accuracy over its epochs (all rows for the vanilla model) in its eval.jsonl
    cells = table3_cells(report)
    assert len(cells) == 5 * len(SETTINGS), cells
    for setting in SETTINGS:
        for arm, rows in evals.items():
            per_split = [[r["accuracy"] for r in rows if (r["split"], r["setting"]) == (sp, setting)
                          and (r["epoch"] > 0 or arm == "vanilla")] for sp in SPLITS]
            assert all(per_split), (arm, setting)
            stats = {"mean": [sum(v) / len(v) for v in per_split], "max": [max(v) for v in per_split]}
            for stat in ("mean",) if arm == "vanilla" else ("mean", "max"):
                label = "Vanilla" if arm == "vanilla" else f"{arm.upper()} {stat}"
                assert cells[setting, label] == [round(100 * x, 1) for x in stats[stat]], (setting, label)
    # "What this shows": the response length of each arm's last checkpoint, as its eval.jsonl has it
    lengths = [f"{arm} {max(rows, key=lambda r: r['step'])['mean_length']:.1f} tokens" for arm, rows in evals.items()
               for rows in [[r for r in rows if (r["split"], r["setting"]) == ("validation", "pass@1_t0.6")]]]
    assert "- Response length at the last checkpoint (validation, pass@1_t0.6): " + ", ".join(lengths) + "." \
        in report, report[report.find("## What this shows"):][:1500]
    # the check against the training log: each arm's greedy validation at its last step, logged and evaluated
    for arm in ("sft", "rl"):
        run = runs / f"{arm}_s1"
        ev = max((r for r in evals[arm] if (r["split"], r["setting"]) == ("validation", "pass@1_t0.01")),
                 key=lambda r: r["step"])
        log = next(m for m in read_jsonl(run / "metrics.jsonl") if m["step"] == ev["step"])
        assert (f"| `{run}` | {ev['step']} | {100 * log['val/accuracy']:.1f} | {100 * ev['accuracy']:.1f} | "
                f"{log['val/mean_length']:.2f} | {ev['mean_length']:.2f} |") in report, (arm, report[-1500:])
    assert "leads by" in report and list((runs / "report").glob("*.png"))
    rl = read_jsonl(runs / "rl_s1" / "metrics.jsonl")
    assert [m["step"] for m in rl] == [1, 2] and "val/accuracy" in rl[-1]
    # both arms start from the vanilla instruct model and train one epoch: their last checkpoints are at epoch 1
    for arm in ("sft_s1", "rl_s1"):
        states = [json.loads(p.read_text()) for p in (runs / arm / "checkpoints").glob("*/vlrl_state.json")]
        assert max(s["epoch"] for s in states) == 1.0, arm
    assert (vanilla / "model.safetensors").is_file()

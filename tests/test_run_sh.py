"""Smoke test of the README's first command: `FAST=1 bash run.sh` runs the whole protocol (toy world -> vanilla
instruct model -> SFT and RL from it -> evaluation report) at tiny size, into a temp dir."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fast_chain(tmp_path):
    env = dict(os.environ, FAST="1", TOY=str(tmp_path / "toy"), RUNS=str(tmp_path / "runs"))
    p = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    runs = tmp_path / "runs"
    assert f"report: {runs}/report/report.md" in p.stdout
    report = (runs / "report" / "report.md").read_text()
    assert "vanilla" in report.lower() and "rl" in report.lower() and "sft" in report.lower()
    assert "## What this shows" in report and "leads by" in report
    assert list((runs / "report").glob("*.png"))
    rl = [json.loads(x) for x in (runs / "rl_s1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rl] == [1, 2] and "val/accuracy" in rl[-1]
    # both arms start from the vanilla instruct model and train one epoch: their last checkpoints are at epoch 1
    for arm in ("sft_s1", "rl_s1"):
        states = [json.loads(p.read_text()) for p in (runs / arm / "checkpoints").glob("*/vlrl_state.json")]
        assert max(s["epoch"] for s in states) == 1.0, arm
    assert (tmp_path / "toy" / "models" / "qwen2_5_vl-tiny-instruct" / "model.safetensors").is_file()

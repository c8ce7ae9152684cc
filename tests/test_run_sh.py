"""Smoke test of the README's first command: `FAST=1 bash run.sh` runs the whole chain (toy world -> SFT -> RL ->
evaluation report) at tiny size, into a temp dir."""
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
    assert list((runs / "report").glob("*.png"))
    rl = [json.loads(x) for x in (runs / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rl] == [1, 2] and "val/accuracy" in rl[-1]
    assert (runs / "sft" / "checkpoints").is_dir()

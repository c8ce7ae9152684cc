"""RL step benchmarks: the per-step time split, weight-sync time vs model size, per-rank FSDP memory (1 vs 2 ranks).

    python bench/bench_train.py                 # needs the toy world: python toy.py --out toy
    python bench/bench_train.py --steps 6 --sizes tiny small

Prints a table and, last, one machine-readable line: RESULT {...}. Timings are medians over the steps after the
first (which includes warm-up). Measure on an idle machine: other CPU-bound processes distort everything.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Args:
    toy: str = "toy"
    """Toy world folder (python toy.py --out toy)."""
    steps: int = 6
    """RL steps per run (the first is dropped as warm-up)."""
    sizes: tuple[str, ...] = ("tiny", "small")
    """Toy model sizes to time."""
    prompts_per_step: int = 8
    """Prompts per step (x rollout.n responses)."""
    n: int = 8
    """Responses per prompt."""
    max_tokens: int = 32
    """Max new tokens per response."""


def time_split(args: Args, size: str) -> dict:
    """Run train.py for args.steps steps on one rank; median seconds per phase over steps 2..N."""
    toy = Path(args.toy)
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "train.py"), "--model.path", str(toy / "models" / f"qwen2_5_vl-{size}"),
               "--data.train", str(toy / "data" / "train.jsonl"), "--out-dir", out, "--max-steps", str(args.steps),
               "--prompts-per-step", str(args.prompts_per_step), "--rollout.n", str(args.n),
               "--rollout.max-tokens", str(args.max_tokens), "--mini-batch-size", str(args.prompts_per_step * args.n),
               "--micro-batch-size", "32", "--val-every", "-1", "--save-every", str(10**9),
               "--reward.no-truncation-penalty"]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            raise SystemExit(f"train.py failed:\n{p.stderr[-4000:]}")
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()][1:]
    phases = ["generate", "reward", "logprobs", "update", "sync", "step"]
    res = {k: statistics.median(r[f"time/{k}"] for r in rows) for k in phases}
    res["tokens_per_s"] = statistics.median(r["perf/tokens_per_s"] for r in rows)
    res["outside_generate_update"] = 1 - (res["generate"] + res["update"]) / res["step"]
    return res


def memory_worker(args_and_path) -> None:
    """On each rank: shard the model, take one optimizer step, report local bytes of params, grads, Adam state."""
    import torch
    import torch.distributed as dist
    from common import ModelConfig, OptimConfig, build_optimizer, init_distributed, load_model, shard_model
    path, result_file = args_and_path
    rank, world, device = init_distributed()
    cfg = ModelConfig(path=path, freeze_vision=False)
    model = shard_model(load_model(path, cfg, device), cfg, device)
    opt, _ = build_optimizer(model, OptimConfig(), 10)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()

    def local_bytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    params = sum(local_bytes(p) for p in model.parameters())
    grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    state = sum(local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    totals = torch.tensor([params, grads, state], dtype=torch.float64)
    gathered = [torch.zeros_like(totals) for _ in range(world)]
    dist.all_gather(gathered, totals)
    if rank == 0:
        Path(result_file).write_text(json.dumps([g.tolist() for g in gathered]))
    dist.destroy_process_group()


def memory(path: str, nproc: int) -> dict:
    from common import launch
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        launch(memory_worker, nproc, (path, f.name))
        per_rank = json.loads(Path(f.name).read_text())
    mb = [sum(r) / 2**20 for r in per_rank]
    return {"ranks": nproc, "max_rank_MiB": max(mb), "params_grads_optim_MiB_rank0": [x / 2**20 for x in per_rank[0]]}


def main(args: Args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = {"split": {}, "memory": {}}
    for size in args.sizes:
        result["split"][size] = time_split(args, size)
        s = result["split"][size]
        print(f"{size:6s} step {s['step']:.2f}s | generate {s['generate']:.2f} reward {s['reward']:.2f} "
              f"logprobs {s['logprobs']:.2f} update {s['update']:.2f} sync {s['sync']:.3f} | outside gen+update "
              f"{100 * s['outside_generate_update']:.1f}% | {s['tokens_per_s']:.0f} tok/s")
    path = str(Path(args.toy) / "models" / f"qwen2_5_vl-{args.sizes[-1]}")
    for nproc in (1, 2):
        m = memory(path, nproc)
        result["memory"][nproc] = m
        print(f"memory {nproc} rank(s): {m['max_rank_MiB']:.1f} MiB/rank (params, grads, Adam state on rank 0: "
              + ", ".join(f"{x:.1f}" for x in m["params_grads_optim_MiB_rank0"]) + " MiB)")
    result["memory_ratio_2_over_1"] = result["memory"][2]["max_rank_MiB"] / result["memory"][1]["max_rank_MiB"]
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(tyro.cli(Args))

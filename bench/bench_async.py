"""Async vs sync on the 1 + 1 core split: train.py --async-steps 1 against today's loop, alternating, same work.

MAYE trains on 7 GPUs while 1 GPU generates. On this 2-core CPU the analogue is the training rank on core 0
(`taskset -c 0`, --threads 1) and the engine process on core 1 (VLLM_CPU_OMP_THREADS_BIND=1: common.EngineClient
starts it there). In the synchronous loop each side idles while the other works, so a step is generation plus
scoring, log-probs, update and weight sync; with --async-steps 1 the engine samples step k+1's responses while the
rank works on step k, so a step tends to the longer of the two sides plus the sync. Equal halves overlapped perfectly
give ~0.5x.

The work and the command are bench_vs_trl.py's (its toy folder, its train.py flags): P prompts x G samples x M new
tokens (the random-init models rarely stop early), T = 1.0, fp32, GRPO, one optimizer
step per generation step, the k3 KL at beta. The default (tiny, beta 0.04, 8 x 4 x 64) is a size where, in the
synchronous loop on this split, generation on core 1 and log-probs + update on core 0 take about the same time
(bench/README.md has the measured split). The synchronous runs pass no flag (0 is train.py's default).

Printed: each run's medians over steps 2..S of train.py's time/* metrics (`rest` = step minus the phases; with
--async-steps 1 the wait for the batch sampled ahead is in generate at the step's start and in sync before the
weights go to the engine); then per mode the median over runs, the runs' range, and async / sync.

    python bench/bench_async.py                                   # tiny, beta 0.04, 3 repeats x 8 steps per mode
    python bench/bench_async.py --size small --beta 0 --repeats 2     # a larger toy, KL off
    python bench/bench_async.py --modes 0                         # the synchronous side alone
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_trl as V  # noqa: E402  (bench/ is not a package)

PHASES = ("generate", "reward", "logprobs", "update", "sync")     # train.py's time/* metrics, in step order


@dataclass(frozen=True)
class Args:
    size: str = "tiny"
    """Toy model size (toy.py: tiny ~1M, small ~10M, mid ~90M parameters)."""
    beta: float = 0.04
    """KL coefficient (k3 in the loss; 0 = no reference model)."""
    modes: tuple[int, ...] = (0, 1)
    """--async-steps values to compare (the first is the baseline of the ratio)."""
    prompts: int = 8
    """Prompts per step P."""
    n: int = 4
    """Samples per prompt G."""
    max_tokens: int = 64
    """Max new tokens per sample M."""
    steps: int = 8
    """Steps per run; the medians are over steps 2..steps."""
    repeats: int = 3
    """Runs per mode, the modes alternating."""
    image_size: int = 56
    """Image side in pixels (bench_vs_trl.py's toy world)."""
    extra: str = ""
    """More train.py flags for every run, one string."""
    out: str = "/tmp/bench_vs_trl"
    """Scratch folder (the toy world is bench_vs_trl.py's, shared)."""


def run_args(args: Args, mode: int) -> V.Args:
    """bench_vs_trl's settings for one run of `mode` on the split."""
    flags = (f"--async-steps {mode} " if mode else "") + args.extra
    return V.Args(sizes=(args.size,), kls=(args.beta,), engines=("vllm",), prompts=args.prompts, n=args.n,
                  max_tokens=args.max_tokens, steps=args.steps, image_size=args.image_size, out=args.out, split=True,
                  vlrl_args=flags)


def line(name: str, r: dict) -> str:
    phases = " ".join(f"{k} {r[k]:.2f}" for k in PHASES) + f" rest {r['step'] - sum(r[k] for k in PHASES):.2f}"
    return f"{name:16s} step {r['step']:.2f}s | {phases} | staleness {r['staleness']:.2f} | peak {r['peak_GB']:.1f} GB"


def main(args: Args) -> None:
    toy = V.build_world(run_args(args, 0))
    runs: dict[int, list[dict]] = {m: [] for m in args.modes}
    for rep in range(args.repeats):
        for mode in args.modes:
            runs[mode].append(V.vlrl_run(run_args(args, mode), toy, args.size, args.beta, "vllm"))
            print(line(f"async {mode} run {rep + 1}", runs[mode][-1]), flush=True)
    summary = {}
    for mode, rs in runs.items():
        summary[mode] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        steps = sorted(r["step"] for r in rs)
        print(line(f"async {mode} median", summary[mode]) + f" | runs {steps[0]:.2f}-{steps[-1]:.2f}s")
    base = summary[args.modes[0]]["step"]
    for mode in args.modes[1:]:
        print(f"async {mode} / async {args.modes[0]}: {summary[mode]['step'] / base:.2f}x the step time")
    print("RESULT " + json.dumps({"args": vars(args), "runs": runs, "median": summary}))


if __name__ == "__main__":
    main(tyro.cli(Args))

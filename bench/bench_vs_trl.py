"""vlrl vs TRL's GRPOTrainer at the same work, side by side: step time, time to the first step, peak memory.

Same random-init Qwen2.5-VL folder (toy.py), same prompts (the toy's train split, the same instruction), same work
per step: P prompts x G samples of up to M new tokens at T=1.0, fp32 on CPU, GRPO advantages (group mean and std),
token-mean PPO loss (TRL's default "dapo" aggregation), one optimizer step per generation step, KL off or k3 in the
loss at beta. The reward is vlrl's (reward.score_batch) on both sides. Each side runs with its own defaults for
threads and processes, as a user would get them.

Printed per setting: the median step time over steps 2..S (step 1 pays warm-up), the ratio vlrl / TRL, vlrl's phase
split (generate, log-probs, update, other), the time from the command to the end of step 1, and the peak of the
summed RSS over each side's whole process tree (sampled every 0.2 s).

With --split, vlrl runs as MAYE's 7 + 1 GPUs would on this 2-core CPU: the training rank on core 0 (`taskset -c 0`,
--threads 1), the engine on core 1 (VLLM_CPU_OMP_THREADS_BIND=1); TRL keeps both cores for its one process, as it
would run (it generates and trains in turn, so a split would only idle a core). --vlrl-args adds train.py flags.

TRL is a benchmark-only dependency: bench/requirements-trl.txt goes into bench/.venv-trl, a venv that sees .venv's
packages through a .pth file, so it adds only TRL and its few extras and never changes .venv (made here on first use).

    python bench/bench_vs_trl.py                                              # tiny and small toys, KL off and on
    python bench/bench_vs_trl.py --sizes mid --image-size 224 --max-tokens 256 --steps 4 --kls 0   # representative
    python bench/bench_vs_trl.py --sizes tiny --kls 0.04 --engines vllm --split --vlrl-args="--async-steps 1"  # async
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
INSTRUCTION = " Put the final answer in \\boxed{}."


@dataclass(frozen=True)
class Args:
    sizes: tuple[str, ...] = ("tiny", "small")
    """Toy model sizes (toy.py: tiny ~1M, small ~10M, mid ~90M parameters)."""
    kls: tuple[float, ...] = (0.0, 0.04)
    """KL coefficients beta to run (0 = no reference model; else k3 in the loss, TRL's estimator)."""
    engines: tuple[str, ...] = ("vllm", "hf")
    """vlrl's engines to run (each against the same TRL run)."""
    prompts: int = 8
    """Prompts per step P."""
    n: int = 4
    """Samples per prompt G."""
    max_tokens: int = 64
    """Max new tokens per sample M."""
    steps: int = 6
    """Steps per run; the median is over steps 2..steps."""
    repeats: int = 1
    """Runs of each side per setting, alternating TRL and vlrl."""
    image_size: int = 56
    """Image side in pixels (the toy draws 56; larger sizes are upscaled copies: 224 gives 64 image tokens)."""
    split: bool = False
    """vlrl's training rank on core 0 with one thread, its engine on core 1 (TRL keeps both cores)."""
    vlrl_args: str = ""
    """Extra train.py flags for vlrl's runs, one string (e.g. "--async-steps 1")."""
    out: str = "/tmp/bench_vs_trl"
    """Scratch folder (toy world, runs)."""
    trl_worker: str = ""
    """Internal: a JSON job for TRL's side, run under bench/.venv-trl by this script."""


def trl_python() -> Path:
    """bench/.venv-trl/bin/python with bench/requirements-trl.txt installed (once per requirements file)."""
    venv, req = ROOT / "bench" / ".venv-trl", ROOT / "bench" / "requirements-trl.txt"
    stamp = venv / f".installed-{hashlib.sha1(req.read_bytes()).hexdigest()[:12]}"
    if not stamp.exists():
        print(f"[bench] installing {req.name} into {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = subprocess.run([venv / "bin" / "python", "-c",
                               "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "vlrl_main_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # .venv's packages
        subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                        str(req)], check=True)
        stamp.touch()
    return venv / "bin" / "python"


def run_measured(cmd: list, env: dict | None = None) -> dict:
    """Run cmd from the repo root: {rc, stderr, peak_GB (the summed RSS of it and all its descendants, sampled every
    0.2 s), first_step_s (command start to its first stdout line starting with 'step ', vlrl's step line)}."""
    import psutil
    t0, err = time.time(), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                            env=None if env is None else os.environ | env)
    peak, done, first = [0], threading.Event(), None

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
            except psutil.Error:  # a process ended between listing and reading it
                pass
            time.sleep(0.2)
    threading.Thread(target=sample, daemon=True).start()
    for line in proc.stdout:
        if first is None and line.startswith("step "):
            first = time.time() - t0
    proc.wait()
    done.set()
    err.seek(0)
    return {"rc": proc.returncode, "stderr": err.read(), "peak_GB": peak[0] / 1e9, "first_step_s": first}


def build_world(args: Args) -> Path:
    """OUT/toy: the toy world (qwen2_5_vl at args.sizes, 64 train rows), images upscaled to args.image_size."""
    toy = Path(args.out) / f"toy_{args.image_size}"
    if not all((toy / "models" / f"qwen2_5_vl-{s}" / "config.json").exists() for s in args.sizes):
        subprocess.run([sys.executable, "toy.py", "--out", str(toy), "--archs", "qwen2_5_vl", "--sizes", *args.sizes,
                        "--train-size", "64", "--val-size", "8", "--test-size", "8", "--instruct-size", "8"],
                       cwd=ROOT, check=True, capture_output=True)
        if args.image_size != 56:
            from PIL import Image
            for png in (toy / "data" / "images").glob("*.png"):
                Image.open(png).resize((args.image_size, args.image_size), Image.NEAREST).save(png)
    return toy


def vlrl_cmd(args: Args, toy: Path, size: str, beta: float, engine: str, out: str) -> list[str]:
    """train.py at the bench's work (args.steps steps, no validation, no checkpoint but the last), args.vlrl_args added;
    with args.split under `taskset -c 0` with one thread (run it with SPLIT_ENV: the engine on core 1)."""
    cmd = [sys.executable, "train.py", "--model.path", str(toy / "models" / f"qwen2_5_vl-{size}"),
               "--data.train", str(toy / "data" / "train.jsonl"), "--data.instruction", INSTRUCTION,
               "--out-dir", out, "--max-steps", str(args.steps), "--prompts-per-step", str(args.prompts),
               "--rollout.n", str(args.n), "--rollout.max-tokens", str(args.max_tokens), "--rollout.temperature", "1.0",
               "--rollout.engine", engine, "--mini-batch-size", str(args.prompts * args.n),
               "--micro-batch-size", str(args.prompts * args.n), "--advantage.estimator", "grpo",
               "--advantage.kl-coef", str(beta), "--advantage.kl-type", "k3", "--optim.lr", "1e-5",
               "--val-every", "-1", "--save-every", str(10**9), "--reward.no-truncation-penalty",
               *shlex.split(args.vlrl_args)]
    return ["taskset", "-c", "0", *cmd, "--threads", "1"] if args.split else cmd


SPLIT_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "1"}     # common.EngineClient starts the engine on these cores


def phase_split(rows: list[dict]) -> dict:
    """Medians over steps 2..S of train.py's time/* metrics, with "other" = step - generate - log-probs - update."""
    for r in rows:
        r["time/other"] = r["time/step"] - r["time/generate"] - r["time/logprobs"] - r["time/update"]
    return {k[5:]: statistics.median(r[k] for r in rows[1:]) for k in rows[0] if k.startswith("time/")}


def vlrl_run(args: Args, toy: Path, size: str, beta: float, engine: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        run = run_measured(vlrl_cmd(args, toy, size, beta, engine, out), SPLIT_ENV if args.split else None)
        if run["rc"]:
            raise SystemExit(f"train.py failed:\n{run['stderr'][-4000:]}")
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {**phase_split(rows), "peak_GB": run["peak_GB"], "first_step_s": run["first_step_s"],
            "staleness": statistics.mean(r.get("rollout/staleness", 0) for r in rows[1:])}


def trl_run(args: Args, toy: Path, size: str, beta: float) -> dict:
    with tempfile.TemporaryDirectory() as out:
        job = dict(model=str(toy / "models" / f"qwen2_5_vl-{size}"), data=str(toy / "data" / "train.jsonl"), out=out,
                   beta=beta, prompts=args.prompts, n=args.n, max_tokens=args.max_tokens, steps=args.steps,
                   t0=time.time())
        run = run_measured([str(trl_python()), __file__, "--trl-worker", json.dumps(job)])
        if run["rc"]:
            raise SystemExit(f"TRL failed:\n{run['stderr'][-4000:]}")
        ends = json.loads((Path(out) / "step_ends.json").read_text())
    steps = [b - a for a, b in zip(ends, ends[1:])]  # steps 2..S
    return {"step": statistics.median(steps), "peak_GB": run["peak_GB"], "first_step_s": ends[0] - job["t0"]}


def trl_worker(job: dict) -> None:
    """TRL's side, in bench/.venv-trl: GRPOTrainer on the same rows, recording the wall clock at each step's end."""
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reward import RewardConfig, score_batch
    rows = [json.loads(x) for x in Path(job["data"]).read_text().splitlines()]
    base = Path(job["data"]).parent
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": r["question"].replace("<image>", "") + INSTRUCTION}]}],
        "image": Image.open(base / r["image"]).convert("RGB"), "answer": r["answer"]} for r in rows])

    def accuracy(completions, answer, **kw):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        scored = score_batch(texts, answer, [True] * len(texts), RewardConfig(truncation_penalty=False))
        return [s["score"] for s in scored]

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.time())
    cfg = GRPOConfig(output_dir=job["out"], per_device_train_batch_size=job["prompts"] * job["n"],
                     num_generations=job["n"], max_completion_length=job["max_tokens"], temperature=1.0, top_p=1.0,
                     beta=job["beta"], learning_rate=1e-5, max_steps=job["steps"], logging_steps=1, save_strategy="no",
                     report_to=[], use_cpu=True, bf16=False, seed=0, model_init_kwargs={"dtype": torch.float32})
    GRPOTrainer(model=job["model"], reward_funcs=accuracy, args=cfg, train_dataset=data,
                callbacks=[StepClock()]).train()
    Path(job["out"], "step_ends.json").write_text(json.dumps(ends))


def main(args: Args) -> None:
    if args.trl_worker:
        return trl_worker(json.loads(args.trl_worker))
    trl_python()
    toy, result = build_world(args), []
    for size in args.sizes:
        for beta in [beta for beta in args.kls for _ in range(args.repeats)]:   # each setting args.repeats times
            trl = trl_run(args, toy, size, beta)
            for engine in args.engines:
                v = vlrl_run(args, toy, size, beta, engine)
                result.append({"size": size, "beta": beta, "engine": engine, "split": args.split,
                               "vlrl_args": args.vlrl_args, "trl": trl, "vlrl": v})
                print(f"{size:5s} beta {beta:<4g} {engine:4s} | TRL {trl['step']:.2f}s vlrl {v['step']:.2f}s "
                      f"({v['step'] / trl['step']:.2f}x) | vlrl generate {v['generate']:.2f} "
                      f"logprobs {v['logprobs']:.2f} update {v['update']:.2f} other {v['other']:.2f} | "
                      f"to end of step 1: TRL {trl['first_step_s']:.0f}s"
                      f" vlrl {v['first_step_s']:.0f}s | peak RSS TRL {trl['peak_GB']:.1f} GB "
                      f"vlrl {v['peak_GB']:.1f} GB", flush=True)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(tyro.cli(Args))

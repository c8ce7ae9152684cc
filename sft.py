"""sft.py: supervised fine-tuning (SFT), the baseline MAYE's RL is measured against, and the toy world's warm start.

What this stage does (MAYE, arXiv 2504.02587, Table 3's "SFT" arm; MAYE never released its SFT code):
1. Loads (image, question) -> target pairs with rollout.py's validated loader. The target is the row's `solution`
   (MAYE's field; the assistant turn of `messages` rows) or, when absent (verl rows), `\\boxed{answer}`. Response
   token ids = tokenizer(target) + [<|im_end|>], the chat template's end of the assistant turn, so the model learns
   to stop. Bad targets (empty, special tokens inside, too long) fail like rollout.py's bad rows: the error names
   file:line and the field; `--data.skip-invalid` skips and reports them.
2. Trains with the same process layout and model code as train.py (FSDP2 ranks, `load_model`/`shard_model`/
   `build_optimizer`, M-RoPE-correct `data.collate` + `rollout.compute_logprobs`). Loss on response tokens only:
       L = -sum_{i,t} m_it log pi(y_it | image, prompt, y_i<t) / N,   N = response tokens of the GLOBAL batch,
   summed over micro-batches and ranks, so 1 rank and N ranks take the same step (tests check this to 1e-5).
3. Per epoch (and every --val-every steps): validation loss (all ranks) and greedy validation accuracy
   (evaluate.validate: T=0.01, top_p=0.001, MAYE's pass@1 setting), metrics.jsonl, an HF-format checkpoint.

Validation engine: an FSDP-sharded model cannot generate on one rank, so rank 0 gathers the full state dict (a
collective, also used for the checkpoint; LoRA merged in) and pushes it into ONE engine process kept for the whole
run (common.EngineClient: `--rollout.engine vllm` or `hf`, started at the first validation, on the last GPU as in
train.py: run --nproc (GPUs - 1)). The other ranks wait at a barrier meanwhile.

Simplifications: padding, not packing (data.collate's left-padded prompts + right-padded responses); the LR
schedule steps once per optimizer step; the last partial batch of each epoch is dropped (common.batch_indices, a
pure function of (seed, step), so --resume continues on exactly the data an uninterrupted run would see).
MAYE's SFT settings are the defaults (lr 1e-5, warm-up + cosine, batch 16, vision tower frozen); the toy warm start
needs a much hotter run (see run.sh): random-init weights, vision tower trained.

Run alone:
    python sft.py --help
    python sft.py --model.path toy/models/qwen2_5_vl-tiny --out-dir runs/sft_tiny --max-steps 20 --val-limit 16
    python sft.py --model.path toy/models/qwen3_vl-tiny --model.lora-rank 8 --optim.lr 1e-3 --out-dir runs/sft_lora
    python sft.py --model.path toy/models/qwen2_5_vl-small --out-dir runs/sft --optim.lr 1e-3 --batch-size 32 \\
        --model.no-freeze-vision --epochs 2 --val-every 20 --val-limit 100 --rollout.engine hf   # toy warm start
    python sft.py --nproc 7 --model.path /models/Qwen2.5-VL-7B-Instruct --data.train mm_math/train.jsonl ...
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import tyro

from common import (EngineClient, MetricsLogger, ModelConfig, OptimConfig, batch_indices, build_optimizer, check_model,
                    clip_grad_norm, engine_gpu, format_line, full_state_dict, init_distributed, latest_checkpoint,
                    launch, load_model, load_trainer_state, micro_batches, prepare_out_dir, print0, save_checkpoint,
                    shard_model, to_device)
from data import DataConfig, DataError, Sample, blocked_token_ids, collate, fits_model, load_dataset, stop_token_ids
from evaluate import validate
from reward import RewardConfig
from rollout import RolloutConfig, compute_logprobs, serve_engine

END_OF_TURN = "<|im_end|>"
LOG_LINE = (("epoch {:.2f}", "epoch"), ("loss {:.4f}", "train/loss"), ("gnorm {:.3f}", "training/grad_norm"),
            ("lr {:.2e}", "training/lr"), ("{:.2f}s", "time/step"), ("val loss {:.4f}", "val/loss"),
            ("acc {:.3f}", "val/accuracy"))


@dataclass(frozen=True)
class Args:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig(lr=1e-5)
    """AdamW + warm-up/cosine; lr 1e-5 is MAYE's SFT setting (other fields as train.py)."""
    rollout: RolloutConfig = RolloutConfig(max_tokens=64)
    """Only the engine for greedy validation: --rollout.engine, --rollout.max-tokens, dtype, KV cache."""
    reward: RewardConfig = RewardConfig()
    """Judge for validation accuracy."""
    out_dir: str = "runs/sft"
    """Run directory: config.json, metrics.jsonl, checkpoints/step_NNNNNN/ (HF format)."""
    seed: int = 0
    """Seed of the data order (batch_indices is a pure function of (seed, step))."""
    nproc: int = 1
    """Training ranks to spawn (ignored under torchrun)."""
    threads: int = 0
    """CPU threads per rank (0 = cores / ranks)."""
    batch_size: int = 16
    """Sequences per optimizer step over all ranks (MAYE's SFT: 16); must be divisible by the ranks."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank (gradient accumulation up to the batch)."""
    epochs: int = 1
    """Passes over the training set (MAYE: the same as the RL run's)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = epochs x steps per epoch); also the LR schedule's length."""
    max_response_tokens: int = 2048
    """Targets longer than this (tokens, incl. <|im_end|>) are invalid rows (never silently truncated)."""
    val_every: int = 0
    """Also validate every K steps (0 = only at the end of each epoch and of the run; -1 = never)."""
    val_limit: int = 0
    """Validate on the first N validation problems (0 = all)."""
    save_every: int = 0
    """Also checkpoint every K steps (checkpoints are always written at each epoch's end and the run's end)."""
    cache_prompts: bool = False
    """Keep every sample's processed prompt (pixels + ids) in memory across epochs: saves the image processor's
    time each step (most of collate's); only for small images (toy: ~75 KB per sample; real images: MBs)."""
    keep_checkpoints: int = 0
    """Keep the newest K checkpoints (0 = keep all: evaluate.py evaluates every epoch's)."""
    resume: bool = False
    """Continue from the newest checkpoint in out_dir (the number of ranks may differ)."""
    restart: bool = False
    """Start afresh in an out_dir that holds a run: move that run aside to OUT_DIR.old-TIME first."""
    tensorboard: bool = False
    """Also log to TensorBoard (out_dir/tb)."""
    wandb: str = ""
    """Also log to this wandb project."""


# ----------------------------------------------------------------------------------------------------------------
# Targets and loss (pure helpers; tests/test_sft.py checks them against independent computations)
# ----------------------------------------------------------------------------------------------------------------
def response_ids(tokenizer, sample: Sample, max_tokens: int) -> list[int]:
    """Token ids the model is trained to produce: tokenizer(target) + [<|im_end|>], target = sample.solution or
    `\\boxed{answer}` (verl rows carry no solution). The prompt ends in '<|im_start|>assistant\\n' (the generation
    prompt), so this is exactly what the engines would have to sample. Raises DataError naming source and field."""
    name, target = ("solution", sample.solution) if sample.solution is not None else \
        ("answer", f"\\boxed{{{sample.answer}}}")
    if not target.strip():
        raise DataError(f"{sample.source}: field '{name}': empty")
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if eot is None or eot == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {END_OF_TURN} token (not a Qwen chat tokenizer?)")
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    # Special tokens inside a target would teach the model to stop early (<|im_end|>) or to emit tokens that the
    # engines never sample (vision tokens: their log-prob is ~-3e38 under compute_logprobs' mask).
    special = set(blocked_token_ids(tokenizer, len(tokenizer))) | set(stop_token_ids(tokenizer))
    bad = sorted({tokenizer.convert_ids_to_tokens(i) for i in ids if i in special})
    if bad:
        raise DataError(f"{sample.source}: field '{name}': contains special token(s) {bad}")
    if len(ids) + 1 > max_tokens:
        raise DataError(f"{sample.source}: field '{name}': {len(ids) + 1} tokens > --max-response-tokens {max_tokens}")
    return ids + [eot]


def load_sft_data(path: str, data_cfg: DataConfig, tokenizer, max_tokens: int, check=None,
                  verbose: bool = True) -> tuple[list[Sample], list[list[int]]]:
    """data.load_dataset whose rows must also pass `check` and have a valid SFT target (response_ids): (samples,
    responses). A bad target fails like a bad row: file:line and field named, or skipped with --data.skip-invalid."""
    def check_row(s: Sample) -> None:
        (check or (lambda _: None))(s)
        response_ids(tokenizer, s, max_tokens)
    samples = load_dataset(path, data_cfg, check_row, verbose)
    return samples, [response_ids(tokenizer, s, max_tokens) for s in samples]


def response_nll(model, batch: dict) -> torch.Tensor:
    """sum_{i,t} -m_it log pi(y_it | x_i, y_i<t): the summed negative log-likelihood of the response tokens only.
    compute_logprobs returns log-probs at response positions and exact zeros elsewhere (prompt, image and padding
    tokens), so their labels contribute nothing, not even a gradient. Divide by the global token count N."""
    logp = compute_logprobs(model, batch)                                                   # (B, T)
    return -(logp * batch["response_mask"].to(logp.device)).sum()


class CachedProcessor:
    """The processor with its per-prompt outputs memoised (--cache-prompts). data.collate calls
    processor(text=[prompt], images=sample.images) for each distinct sample of a batch; SFT revisits every sample
    each epoch, and the images are the same PIL objects for the whole run, so (prompt, image ids) is a safe key."""

    def __init__(self, processor):
        self.processor, self.cache = processor, {}

    def __getattr__(self, name):                    # tokenizer, apply_chat_template, ...: the real processor's
        return getattr(self.processor, name)

    def __call__(self, text, images=None, **kw):
        key = (tuple(text), tuple(id(im) for im in images or ()), tuple(sorted(kw.items())))
        if key not in self.cache:
            self.cache[key] = self.processor(text=text, images=images, **kw)
        return self.cache[key]


@torch.no_grad()
def validation_loss(model, processor, samples: list[Sample], responses: list[list[int]], data_cfg: DataConfig,
                    micro: int, rank: int, world: int, device) -> float:
    """Token-mean NLL over all validation responses, sharded over ranks. FSDP2's forward all-gathers are
    collectives, so every rank runs the same number of forwards: a rank with nothing left in a chunk recomputes
    the chunk's first row with weight 0."""
    import torch.distributed as dist
    total = torch.zeros(2, dtype=torch.float64)                  # (nll sum, tokens)
    for chunk in micro_batches(list(range(len(samples))), micro * world):
        mine, weight = chunk[rank::world], 1.0
        if not mine:
            mine, weight = chunk[:1], 0.0
        batch = to_device(collate(processor, [samples[i] for i in mine], [responses[i] for i in mine], data_cfg),
                          device)
        total += weight * torch.tensor([response_nll(model, batch).item(), batch["response_mask"].sum().item()],
                                       dtype=torch.float64)
    # FSDP2 leaves the root's parameters unsharded after a forward without backward; the optimizer holds the
    # sharded ones, so reshard (get_optimizer_state_dict fails with `KeyError: 0` otherwise).
    model.reshard()
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def sft_step(model, optimizer, scheduler, samples: list[Sample], responses: list[list[int]], processor, args: Args,
             step: int, rank: int, world: int, device) -> tuple[float, float, float, int]:
    """One optimizer step on the global batch: this rank takes every world-th row, micro-batch by micro-batch, and
    divides its loss sums by the GLOBAL token count N (times world, since FSDP2 averages gradients over ranks), so 1
    rank and N ranks take the same step. Returns (mean loss per token over all ranks, grad norm, the lr used, N)."""
    import torch.distributed as dist
    n_tokens = sum(len(r) for r in responses)                         # the same on every rank
    mbs = micro_batches(list(range(rank, len(samples), world)), args.micro_batch_size)   # same count on every rank
    nll = torch.zeros(1, dtype=torch.float64)
    for k, mb in enumerate(mbs):
        model.set_requires_gradient_sync(k == len(mbs) - 1)           # reduce-scatter once per step
        batch = to_device(collate(processor, [samples[i] for i in mb], [responses[i] for i in mb], args.data), device)
        loss_sum = response_nll(model, batch)
        (loss_sum * (world / n_tokens)).backward()
        nll += loss_sum.item()
    gn = clip_grad_norm([p for p in model.parameters() if p.requires_grad], args.optim.grad_clip, step)
    lr = scheduler.get_last_lr()[0]                                    # the lr this step used
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    dist.all_reduce(nll)
    return nll.item() / n_tokens, gn, lr, n_tokens


# ----------------------------------------------------------------------------------------------------------------
# The SFT loop (one process per rank)
# ----------------------------------------------------------------------------------------------------------------
def sft_worker(args: Args, train_set: list[Sample], train_resp: list[list[int]], val_set: list[Sample],
               val_resp: list[list[int]]) -> None:
    import torch.distributed as dist
    from rich.progress import Progress
    from transformers import AutoProcessor
    rank, world, device = init_distributed(args.threads)
    ckpt = latest_checkpoint(args.out_dir) if args.resume else None
    processor = AutoProcessor.from_pretrained(ckpt or args.model.path)
    steps_per_epoch = len(train_set) // args.batch_size
    total_steps = args.max_steps or steps_per_epoch * args.epochs

    model = shard_model(load_model(args.model.path, args.model, device, resume=ckpt), args.model, device)
    optimizer, scheduler = build_optimizer(model, args.optim, total_steps)
    state = load_trainer_state(ckpt, model, optimizer, scheduler) if ckpt else {"step": 0}
    start = state["step"]
    batch_processor = CachedProcessor(processor) if args.cache_prompts else processor
    logger = MetricsLogger(args.out_dir, asdict(args), state if args.resume else None, args.tensorboard, args.wandb) \
        if rank == 0 else None
    engine = None                                          # the validation engine, started at the first validation
    print0(f"[sft] {world} rank(s) on {device}, {len(train_set)} train / {len(val_set)} val rows, steps "
           f"{start}->{total_steps} ({steps_per_epoch}/epoch), batch {args.batch_size}, resume={ckpt}")
    try:
        with Progress(disable=rank != 0 or not sys.stdout.isatty()) as progress:
            bar = progress.add_task("sft", total=total_steps, completed=start)
            for step in range(start, total_steps):
                t0 = time.time()
                _, idx = batch_indices(len(train_set), args.batch_size, args.seed, step)
                samples, responses = [train_set[i] for i in idx], [train_resp[i] for i in idx]   # (B,) each
                loss, gn, lr, n_tokens = sft_step(model, optimizer, scheduler, samples, responses, batch_processor,
                                                  args, step, rank, world, device)
                done, t1 = step + 1, time.time()
                metrics = {"step": done, "epoch": done / steps_per_epoch, "train/loss": loss,
                           "training/lr": lr, "training/grad_norm": gn, "train/tokens": n_tokens,
                           "time/step": t1 - t0, "perf/tokens_per_s": n_tokens / (t1 - t0)}

                epoch_end, last = done % steps_per_epoch == 0, done == total_steps
                do_val = bool(val_set) and (epoch_end or last or (args.val_every > 0 and done % args.val_every == 0))
                do_save = epoch_end or last or (args.save_every > 0 and done % args.save_every == 0)
                weights = full_state_dict(model) if (do_val or do_save) else None   # collective; {} off rank 0
                if do_save:                  # before validating: a failed validation loses no training
                    save_checkpoint(args.out_dir, done, done / steps_per_epoch, "sft", model, optimizer, scheduler,
                                    processor, weights, args.keep_checkpoints, {"metrics": metrics})
                if do_val:
                    metrics["val/loss"] = validation_loss(model, batch_processor, val_set, val_resp, args.data,
                                                          args.micro_batch_size, rank, world, device)
                    if rank == 0:
                        engine = engine or EngineClient(serve_engine, str(ckpt or args.model.path), args.rollout,
                                                        args.data)
                        engine.update_weights(weights.items())
                        metrics.update(validate(engine, val_set, args.reward, args.rollout.max_tokens))
                    dist.barrier()
                    metrics["time/val"] = time.time() - t1
                if rank == 0:
                    logger.log(metrics, format_line(done, total_steps, metrics, LOG_LINE))
                    progress.update(bar, completed=done)
    finally:
        if engine is not None:
            engine.close()
    dist.destroy_process_group()


def main(args: Args) -> None:
    """Check the flags, the model folder, the out-dir and every dataset row, then start the ranks."""
    from transformers import AutoProcessor
    check_model(args.model)
    processor = AutoProcessor.from_pretrained(args.model.path)
    verbose = int(os.environ.get("RANK", "0")) == 0
    train = load_sft_data(args.data.train, args.data, processor.tokenizer, args.max_response_tokens,
                          fits_model(args.model.path, args.data), verbose)
    val = load_sft_data(args.data.validation, args.data, processor.tokenizer, args.max_response_tokens,
                        fits_model(args.model.path, args.data, args.rollout.max_tokens, args.rollout.max_model_len,
                                   args.rollout.max_images),
                        verbose) if args.val_every >= 0 else ([], [])
    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    for bad, msg in ((args.batch_size < 1 or args.batch_size % world,
                      f"--batch-size {args.batch_size} must be a positive multiple of the {world} ranks"),
                     (args.batch_size > len(train[0]), f"--batch-size {args.batch_size} > the {len(train[0])} "
                                                       f"training rows of {args.data.train}"),
                     (min(args.micro_batch_size, args.epochs) < 1 or args.max_steps < 0,
                      "--micro-batch-size and --epochs must be >= 1, --max-steps >= 0"),
                     (args.resume and args.restart, "--resume continues the run in --out-dir, --restart moves it "
                                                    "aside"),
                     (args.rollout.seed != RolloutConfig.seed,
                      "--rollout.seed is rollout.py's: validation seeds its own requests")):
        if bad:
            raise SystemExit(f"sft.py: {msg}")
    if args.val_every >= 0:   # validation starts an engine: its GPU is free of ranks, or exit
        engine_gpu(int(os.environ.get("LOCAL_WORLD_SIZE", args.nproc)), args.rollout.gpu_memory_utilization)
    prepare_out_dir(args.out_dir, args.resume, args.restart)
    launch(sft_worker, args.nproc, args, *train, val[0][:args.val_limit or None], val[1][:args.val_limit or None])


if __name__ == "__main__":
    main(tyro.cli(Args))

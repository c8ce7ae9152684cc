"""The policy update against its bare limit: vlrl's `train.ppo_update` vs a bare forward/backward/AdamW step on the
same batch, in one process, alternating, so that both see the same machine state.

- `vlrl`: `train.ppo_update` on the FSDP2-wrapped model (1 rank, gloo): collate, tiled `compute_logprobs` with
  entropies, `advantage.policy_loss` (GRPO, token-mean, KL off), gradient clipping, AdamW. pi_old is fused (one
  on-policy update), as in bench_vs_trl.py's runs.
- `bare`: the same model loaded plainly (no FSDP), the same collated batch: one forward, the full logits
  log-softmaxed, the response tokens' log-probs times their advantages, backward, AdamW. No tiling, no masking of
  vision tokens, no clipping.

The batch is P prompts x G responses of exactly M random tokens (what the random-init toy models produce: they
never stop), the prompts from the toy's train split with images upscaled to --image-size (bench_vs_trl.build_world).

    python bench/bench_update.py --size mid --image-size 224 --max-tokens 256 --repeats 2   # representative size
    python bench/bench_update.py --size small                                               # toy size

Prints one line per repeat and, last, RESULT {...} with the medians and the ratio vlrl / bare.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


@dataclass(frozen=True)
class Args:
    size: str = "small"
    """Toy model size (tiny, small, mid)."""
    image_size: int = 56
    """Image side in pixels (bench_vs_trl.build_world upscales the toy's 56-px images)."""
    prompts: int = 8
    """Prompts P."""
    n: int = 4
    """Responses per prompt G."""
    max_tokens: int = 64
    """Response length M (every response has exactly M tokens)."""
    repeats: int = 3
    """Timed repeats of each contender (after one warm-up of each)."""
    out: str = "/tmp/bench_vs_trl"
    """Scratch folder of bench_vs_trl.py (its toy world is reused)."""


def main(a: Args) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    import torch
    from transformers import AutoProcessor

    import bench_vs_trl
    import common
    import data
    import train
    from rollout import Completion
    toy = bench_vs_trl.build_world(bench_vs_trl.Args(sizes=(a.size,), image_size=a.image_size, out=a.out))
    path = str(toy / "models" / f"qwen2_5_vl-{a.size}")
    args = train.Args(prompts_per_step=a.prompts, mini_batch_size=a.prompts * a.n, micro_batch_size=a.prompts * a.n,
                      advantage=train.AdvantageConfig(estimator="grpo", kl_coef=0.0),
                      data=data.DataConfig(instruction=bench_vs_trl.INSTRUCTION),
                      rollout=train.RolloutConfig(n=a.n, max_tokens=a.max_tokens, temperature=1.0))
    rank, world, device = common.init_distributed()
    processor = AutoProcessor.from_pretrained(path)
    prompts = data.load_dataset(str(toy / "data" / "train.jsonl"), args.data)[:a.prompts]
    samples = [s for s in prompts for _ in range(a.n)]                                          # (B,)
    g = torch.Generator().manual_seed(0)
    low = len(processor.tokenizer) - 20   # random tokens below the special ones
    comps = [Completion("", torch.randint(0, low, (a.max_tokens,), generator=g).tolist(), [0.0] * a.max_tokens,
                        "length") for _ in samples]
    B, T = len(samples), a.max_tokens
    mask, adv = torch.ones(B, T), torch.randn(B, 1, generator=g).expand(B, T).contiguous()     # (B, T)

    policy = common.shard_model(common.load_model(path, args.model, device), args.model, device)
    opt_v, _ = common.build_optimizer(policy, args.optim, 100)
    bare = common.load_model(path, args.model, device)
    opt_b = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=args.optim.lr)
    batch = common.to_device(data.collate(processor, samples, [c.token_ids for c in comps], args.data), device)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                    "image_grid_thw")}
    P = batch["response_start"]

    def run_vlrl():
        old_lp, ent = torch.zeros(B, T), torch.zeros(B, T)
        train.ppo_update(policy, opt_v, samples, comps, list(range(B)), adv, mask, old_lp, None, ent,
                         torch.Generator().manual_seed(1), processor, args, 0, rank, world, device)

    def run_bare():
        logits = bare(**inputs).logits[:, P - 1:-1].float()                                     # (B, M, V)
        lp = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, P:, None])[..., 0]         # (B, M)
        (-(lp * adv).sum() / mask.sum()).backward()
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"vlrl": [], "bare": []}
    for rep in range(a.repeats + 1):
        for name, fn in (("vlrl", run_vlrl), ("bare", run_bare)):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            print(f"{'warm-up' if rep == 0 else f'repeat {rep}'} {name}: {dt:.2f} s", flush=True)
            if rep:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("RESULT " + json.dumps({"name": "update_vs_bare", "size": a.size, "image_size": a.image_size,
                                  "batch": f"{a.prompts}x{a.n}x{a.max_tokens}", "threads": torch.get_num_threads(),
                                  "vlrl_s": round(med["vlrl"], 3), "bare_s": round(med["bare"], 3),
                                  "ratio": round(med["vlrl"] / med["bare"], 3), "runs": times}))


if __name__ == "__main__":
    main(tyro.cli(Args))

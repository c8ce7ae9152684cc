"""Peak extra memory of rollout.compute_logprobs at the real vocabulary size (issue 17), tiled vs untiled.

A random-init Qwen2.5-VL with the toy's `tiny` widths but Qwen's vocabulary (151,936 rows), text-only batches of
micro-batch B x (16 prompt + R response) tokens, fp32 on CPU. "all" is compute_logprobs with one tile holding every
position, which makes full (B, R, V) copies as the implementation before tiling did (logits, / T, the mask,
log_softmax, exp for the entropy); bench/README.md also gives that implementation's own figures. Each configuration
runs in a fresh process; the figure is its peak RSS during the call minus the peak before it (the model, its lm_head
gradient buffer and the batch already allocated), in GB, for a no-grad pass (old / ref log-probs) and a forward +
backward with entropy (the policy loss).

    python bench/bench_logprobs.py         # B=4; R 256, 512 in one tile, R 256..2048 in 512-position tiles (default)
"""
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
V = 151_936


def measure(model_dir: str, B: int, R: int, chunk: int, grad: bool) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    sys.path.insert(0, str(ROOT))
    import rollout
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_dir)
    config.text_config.vocab_size = V
    model = AutoModelForImageTextToText.from_config(config).float()
    P, T = 16, 16 + R
    ids = torch.randint(0, 151_000, (B, T))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_start": P,
             "response_mask": torch.cat([torch.zeros(B, P), torch.ones(B, R)], 1),
             "blocked_token_ids": torch.tensor([151652, 151653, 151654, 151655, 151656]), "tokenizer_len": 151_665}
    for p in model.parameters():                     # gradient buffers exist before the measured call
        p.grad = torch.zeros_like(p) if grad else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024    # the high-water mark so far (small)
    t0 = time.time()
    with torch.set_grad_enabled(grad):
        lp, ent = rollout.compute_logprobs(model, batch, 0.9, return_entropy=True, chunk_tokens=chunk)
        if grad:
            (lp.sum() + 0.01 * ent.sum()).backward()
    seconds = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024        # ru_maxrss is in KiB on Linux
    return {"B": B, "R": R, "chunk": chunk, "grad": grad, "extra_gb": (peak - before) / 1e9,
            "seconds": seconds, "full_copy_gb": B * R * V * 4 / 1e9}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print("RESULT1", json.dumps(measure(sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6] == "1")))
        return
    sys.path.insert(0, str(ROOT))
    import toy
    out = Path(tempfile.mkdtemp())
    toy.build(toy.Args(out=str(out), sizes=("tiny",), archs=("qwen2_5_vl",), train_size=8, val_size=8, test_size=8))
    model_dir, B, rows = str(out / "models" / "qwen2_5_vl-tiny"), 4, []
    runs = [(R, B * R) for R in (256, 512)] + [(R, 512) for R in (256, 512, 1024, 2048)]
    print(f"{'R':>5} {'tile':>6} {'grad':>5} {'extra GB':>9} {'(B,R,V) fp32 GB':>16} {'s':>7}")
    for R, chunk in runs:
        for grad in (False, True):
            p = subprocess.run([sys.executable, __file__, "--one", model_dir, str(B), str(R), str(chunk),
                                str(int(grad))], capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT1 ")]
            if not line:
                raise SystemExit(p.stderr[-3000:])
            r = json.loads(line[0][8:])
            rows.append(r)
            tile = "all" if chunk == B * R else str(chunk)
            print(f"{R:>5} {tile:>6} {str(grad):>5} {r['extra_gb']:>9.2f} {r['full_copy_gb']:>16.2f} "
                  f"{r['seconds']:>7.1f}", flush=True)
    print("RESULT " + json.dumps(rows))


if __name__ == "__main__":
    main()

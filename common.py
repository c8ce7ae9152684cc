"""common.py: what two or more of vlrl's modules share, and nothing else; code with one user lives with that user.

- Processes: `launch` starts the training ranks (or runs in place under torchrun), `init_distributed` joins the
  process group, `die_with_parent` ties a child's life to its parent's.
- The engine process and its client (`EngineClient`, train.py's and sft.py's handle on rollout.make_engine's engine):
  the engine's methods over a pipe, the weights streamed in buckets.
- Model and optimizer: `load_model` (fp32 master weights, frozen parts, LoRA), `shard_model` (FSDP2),
  `build_optimizer`, `clip_grad_norm`.
- Checkpoints: HF weights via `save_pretrained`, the optimizer via torch.distributed.checkpoint (reshards when the
  rank count changes), written atomically; `latest_checkpoint`, `load_trainer_state`.
- Runs: `prepare_out_dir`, `batch_indices` (the rows of a step), `MetricsLogger` and `read_jsonl` (our own files).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch

from data import DataError, file_rows


# ---- The engine's client (rollout.serve_engine serves rollout.make_engine's engine over a pipe)
def engine_dtype(name: str) -> torch.dtype:
    """--rollout.dtype as a torch dtype: auto = bfloat16 on GPU, float32 on CPU."""
    return getattr(torch, name if name != "auto" else "bfloat16" if torch.cuda.is_available() else "float32")


def engine_gpu(local_world: int, share: float = 0.0) -> str:
    """The engine process's CUDA_VISIBLE_DEVICES ("" without CUDA): the last GPU this node sees, which no training
    rank may use (this node's `local_world` ranks take cuda:0..). A single GPU is shared with one rank, and only with
    `share` (--rollout.gpu-memory-utilization) at most 0.5: the rank's fp32 weights, gradients and AdamW state are
    several times the engine's bf16 weights (vLLM's default 0.9 is for a GPU of its own)."""
    if not torch.cuda.is_available():
        return ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if len(ids) > 1 and local_world >= len(ids):
        raise SystemExit(f"the engine needs a GPU of its own: {local_world} training rank(s) on this node and "
                         f"{len(ids)} GPU(s); start {len(ids) - 1} (--nproc, or torchrun --nproc-per-node)")
    if len(ids) == 1 and local_world > 1:
        raise SystemExit(f"{local_world} training ranks on this node and 1 GPU: each rank needs a GPU; start 1 "
                         f"(--nproc 1), which shares the GPU with the engine")
    if len(ids) == 1 and local_world == 1 and share > 0.5:
        raise SystemExit(f"the engine shares this node's only GPU with the training rank, and "
                         f"--rollout.gpu-memory-utilization {share} would leave the rank {1 - share:.0%} of it; "
                         f"give the engine 0.5 or less (run.sh's NGPUS=1 gives 0.4)")
    return ids[-1]


def receive_weights(conn) -> Iterable[tuple[str, torch.Tensor]]:
    """The engine's side of EngineClient.update_weights (rollout.serve_engine calls it): (name, tensor) views of one
    received bucket at a time. Each bucket gets a fresh buffer (vLLM may hold a layer's tensors until the layer is
    complete), read straight from the pipe's socket: Connection.recv_bytes_into would copy it through a BytesIO (5x
    slower, bench/bench_sync.py)."""
    import socket
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        while (header := conn.recv()) is not None:
            nbytes, entries = header
            buf = torch.empty(nbytes, dtype=torch.uint8)
            view, got = memoryview(buf.numpy()), 0
            while got < nbytes:
                if not (n := sock.recv_into(view[got:])):
                    raise EOFError
                got += n
            for name, dtype, shape, start in entries:
                n = math.prod(shape) * dtype.itemsize
                yield name, buf[start:start + n].view(dtype).view(shape)


def omp_cores(bind: str) -> set[int] | None:
    """The cores of a VLLM_CPU_OMP_THREADS_BIND list ("1", "0-2,5"); None for vLLM's "auto" and "nobind"."""
    if bind in ("auto", "nobind"):
        return None
    try:
        cores = {c for part in bind.split(",") for c in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)}
    except ValueError:
        cores = set()
    if not cores or not cores <= set(range(os.cpu_count() or 1)):
        raise ValueError(f"VLLM_CPU_OMP_THREADS_BIND={bind!r}: expected this machine's core ids, such as 1 or 0-2,5")
    return cores


class EngineClient:
    """Rank 0's handle on the engine process (the last GPU, or the CPU): the engines' methods, forwarded over a pipe,
    so `rollout` and evaluate.py take either. A dead engine process raises RuntimeError at the next call."""

    def __init__(self, serve, model_dir: str, cfg, data_cfg, bucket_mb: int = 64):
        """serve(conn, model_dir, cfg, data_cfg, env): the engine process's main (rollout.serve_engine)."""
        import multiprocessing as mp
        from transformers import AutoTokenizer
        gpu = engine_gpu(int(os.environ.get("LOCAL_WORLD_SIZE", 0)), cfg.gpu_memory_utilization)   # "" on the CPU
        bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")       # the user's cores for the engine, if any
        cores = None if gpu else omp_cores(bind)
        threads = len(cores) if cores else os.cpu_count() or 1
        env = {"OMP_WAIT_POLICY": "PASSIVE"} | ({"CUDA_VISIBLE_DEVICES": gpu} if gpu else
               {"VLLM_CPU_OMP_THREADS_BIND": bind, "OMP_NUM_THREADS": str(threads)})
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, model_dir, cfg, data_cfg, env), daemon=True)
        own = os.sched_getaffinity(0)   # vLLM binds its threads only under its own multiprocessing executor (off here):
        os.sched_setaffinity(0, cores or own)         # the engine inherits this thread's cores at its start
        self.proc.start()
        os.sched_setaffinity(0, own)
        child.close()              # only the engine holds that end now: its death is EOF here
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)     # for Forced Rethinking's triggers
        self.dtype, self.bucket_bytes = engine_dtype(cfg.dtype), bucket_mb << 20

    def _call(self, method: str, *args, send: Callable[[], None] = lambda: None):
        """Forward one call (`send()` then writes what follows it). The engine starts while the caller goes on (rank 0
        loads its models): an error at its start-up is the first call's answer."""
        try:
            self.conn.send((method, args))
            send()
            status, result = self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):   # the engine process has exited
            status, result = "died", None
            with contextlib.suppress(EOFError, OSError):   # did it say why? (poll: a forked child may hold the pipe)
                if self.conn.poll(1):
                    status, result = self.conn.recv()
            if status != "error":
                self.proc.join(5)
                raise RuntimeError(f"the engine process died (exit code {self.proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"the engine process failed:\n{result}")
        return result

    def generate(self, samples, n, temperature, top_p=1.0, max_tokens=2048, seed=None, prefixes=None):
        return self._call("generate", samples, n, temperature, top_p, max_tokens, seed, prefixes)

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send (name, tensor) pairs in the engine's dtype, packed into buckets of at most bucket_mb MiB (a larger
        tensor goes alone) and written to the pipe (no shared memory: containers often cap /dev/shm): this side
        holds one bucket, the engine one bucket plus what its loader keeps until a layer is complete."""
        self._call("update_weights", send=lambda: self._send_buckets(weights))

    def _send_buckets(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        import socket
        buf, entries, used = torch.empty(self.bucket_bytes, dtype=torch.uint8), [], 0
        with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:

            def flush(data: torch.Tensor):      # a header, then the raw bytes on the same socket
                self.conn.send((data.numel(), entries))
                sock.sendall(memoryview(data.numpy()))
                entries.clear()

            for name, t in weights:
                t = t.detach().to(self.dtype if t.is_floating_point() else t.dtype).to("cpu").contiguous()
                n, start = t.numel() * t.element_size(), -(-used // 64) * 64       # 64-byte aligned views
                if start + n > self.bucket_bytes and entries:
                    flush(buf[:used])
                    start = used = 0
                entries.append((name, t.dtype, tuple(t.shape), start))
                if n > self.bucket_bytes:                                          # alone, sent as it is
                    flush(t.reshape(-1).view(torch.uint8))
                    continue
                buf[start:start + n] = t.reshape(-1).view(torch.uint8)
                used = start + n
            if entries:
                flush(buf[:used])
            self.conn.send(None)

    def close(self) -> None:
        with contextlib.suppress(OSError):    # it is gone already (BrokenPipeError)
            self.conn.send("close")
            self.proc.join(30)
        self.proc.kill()          # a no-op once it has exited


# ---- Model, optimizer, processes, checkpoints, logging
@dataclass(frozen=True)
class ModelConfig:
    path: str = "toy/models/qwen2_5_vl-small"
    """HF model folder (Qwen2-VL, Qwen2.5-VL or Qwen3-VL): the policy's start and the frozen reference."""
    freeze_vision: bool = True
    """Freeze the vision tower (MAYE trains the language model only)."""
    freeze_connector: bool = False
    """Also freeze the vision-language connector (the patch merger; Qwen3-VL's DeepStack mergers too)."""
    lora_rank: int = 0
    """LoRA (peft) of this rank on the language model's linear layers instead of training its weights (0 = off). The
    engine and the checkpoints get merged weights; checkpoints also hold the adapters alone (adapter/, peft's format;
    the whole change only with --model.freeze-connector, as the connector trains otherwise)."""
    lora_alpha: float = 16.0
    """LoRA's scale numerator: an adapted layer computes W x + (alpha / rank) B A x."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Trainer compute: bf16 = forward and backward in bf16 with fp32 master weights, gradients reduced in fp32
    (FSDP2's MixedPrecisionPolicy); fp32 = all fp32; auto = bf16 on GPU, fp32 on CPU (bf16 on CPU is opt-in)."""
    activation_checkpointing: bool = False
    """Recompute decoder-layer activations in the backward pass (saves memory, costs ~30% time)."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-6  # AdamW learning rate (MAYE: 5e-6).
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas.
    weight_decay: float = 0.01  # AdamW weight decay.
    eps: float = 1e-5  # AdamW epsilon.
    warmup_ratio: float = 0.1  # Linear warm-up over this fraction of the steps, then cosine decay.
    min_lr_ratio: float = 0.0  # Cosine floor as a fraction of lr.
    grad_clip: float = 1.0  # Gradient-norm clip (0 = off; the norm is logged either way).


def print0(*a, **k):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, **k, flush=True)


def check_model(cfg: ModelConfig) -> None:
    """--model.path is a local Hugging Face folder of a vision-language model, and the LoRA flags can work; or a
    SystemExit that says what is wrong."""
    import importlib.util
    p = Path(cfg.path)
    if not (p / "config.json").is_file():
        raise SystemExit(f"--model.path {p}: {'no config.json in that folder' if p.is_dir() else 'no such folder'} "
                         f"(a local Hugging Face model folder is needed; nothing is downloaded)")
    if "vision_config" not in (config := json.loads((p / "config.json").read_text())):
        raise SystemExit(f"--model.path {p}: a {config.get('model_type', '?')!r} model has no vision tower; vlrl "
                         f"trains vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)")
    if cfg.mixed_precision not in ("auto", "bf16", "fp32"):     # Python callers; tyro refuses other values itself
        raise SystemExit(f"--model.mixed-precision {cfg.mixed_precision!r} must be auto, bf16 or fp32")
    if cfg.lora_rank < 0 or cfg.lora_alpha <= 0:
        raise SystemExit(f"--model.lora-rank {cfg.lora_rank} must be >= 0 (0 = no LoRA) and --model.lora-alpha "
                         f"{cfg.lora_alpha} > 0")
    if cfg.lora_rank and importlib.util.find_spec("peft") is None:
        raise SystemExit(f"--model.lora-rank {cfg.lora_rank} needs peft (in the requirements files): bash run.sh setup")


def prepare_out_dir(out_dir: str, resume: bool, restart: bool) -> None:
    """Never overwrite a run silently: an out_dir that holds metrics or checkpoints needs --resume (continue it) or
    --restart (first move it aside to OUT_DIR.old-TIME). Global rank 0 only (under torchrun every rank calls main)."""
    p = Path(out_dir)
    used = any((x.is_file() and x.stat().st_size) or (x.is_dir() and any(x.iterdir()))
               for x in (p / "metrics.jsonl", p / "checkpoints"))
    if int(os.environ.get("RANK", "0")) == 0 and used and not resume:
        if not restart:
            raise SystemExit(f"--out-dir {out_dir} already holds a run: continue it with --resume, choose another "
                             f"--out-dir, or pass --restart to move it aside first")
        aside = p.with_name(f"{p.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(p, aside)
        print(f"[vlrl] moved the previous run in {p} to {aside}", flush=True)
    p.mkdir(parents=True, exist_ok=True)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG), so that ranks and the engine
    never outlive a launcher killed by an OOM killer or a scheduler. A no-op on other systems."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # 1 = PR_SET_PDEATHSIG


def launch(worker, nproc: int, *args) -> None:
    """Run `worker(*args)` on `nproc` local ranks with torch.multiprocessing.spawn, which stops every rank and raises
    the failing rank's traceback here if one fails. Under torchrun (RANK is set) just call `worker(*args)`."""
    if "RANK" in os.environ:
        return worker(*args)
    import torch.multiprocessing as mp
    from torch.distributed.elastic.utils.distributed import get_free_port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(get_free_port()), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), OMP_WAIT_POLICY="PASSIVE")   # idle ranks must not spin
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # per-shard bars at every load and save
    mp.spawn(_rank_main, args=(worker, *args), nprocs=nproc)


def _rank_main(rank: int, worker, *args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    die_with_parent()
    worker(*args)


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
    # NCCL serves CUDA tensors only, and the step's bookkeeping (gathered log-probs, metric sums, pickled batches)
    # lives on the CPU: on a GPU, CPU tensors go through gloo.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return rank, world, device


def load_model(path: str, cfg: ModelConfig, device: torch.device, trainable: bool = True, resume: Path | None = None):
    """An HF Qwen-VL model in fp32 (master weights) with the configured parts frozen; a trainable model with
    cfg.lora_rank > 0 gets LoRA adapters (B = 0: the model is unchanged) on the language model's linear layers. A
    resumed run loads the checkpoint's weights, a LoRA run its base: its adapters (and whatever else trains) come back
    with the optimizer (load_trainer_state), as the checkpoint's HF weights have them merged in.

    With several ranks only rank 0 reads the weights (one full copy per node at start-up) and keeps them, buffers such
    as rotary inv_freq included, for shard_model to broadcast; every model is left on the meta device. Rank 0 uses
    from_pretrained: its save_pretrained keeps the folder's key layout, a model built from its config would not
    (Qwen2.5-VL). Tied embeddings (Qwen2.5-VL-3B) load in full on every rank: to_empty would untie them."""
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForImageTextToText
    attn = "sdpa"
    with contextlib.suppress(ImportError):                 # flash-attn is optional
        if device.type == "cuda":
            import flash_attn  # noqa: F401
            attn = "flash_attention_2"
    lora = trainable and cfg.lora_rank > 0
    source = resume if resume and not lora else path
    config = AutoConfig.from_pretrained(source)
    meta = dist.is_initialized() and dist.get_world_size() > 1 and not config.get_text_config().tie_word_embeddings
    if meta and dist.get_rank() > 0:
        with torch.device("meta"):                         # no weights read, no memory
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32, attn_implementation=attn)
    else:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32, attn_implementation=attn)
    if lora:
        from peft import LoraConfig, inject_adapter_in_model   # in place: module names and paths stay the model's
        targets = r".*language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
        inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets), model)
    if meta:                                               # rank 0's weights live on in full_weights only
        full = {**model.state_dict(), **dict(model.named_buffers())} if dist.get_rank() == 0 else {}
        model.__dict__["full_weights"] = full              # a plain attribute, for shard_model to pop
        model.to("meta")
    for name, p in model.named_parameters():
        frozen = (not trainable or (cfg.freeze_vision and name.startswith("model.visual.") and "merger" not in name)
                  or (cfg.freeze_connector and "merger" in name)
                  or (lora and name.startswith(("model.language_model.", "lm_head.")) and ".lora_" not in name))
        p.requires_grad_(not frozen)
    if cfg.activation_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def shard_model(model, cfg: ModelConfig, device: torch.device):
    """FSDP2: shard each vision block and decoder layer, then the root; move to `device`. A model left on the meta
    device (load_model) gets its shards from rank 0's full weights, which set_model_state_dict broadcasts tensor by
    tensor, and then the buffers outside the state dict (rotary inv_freq: non-persistent)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (int(os.environ["WORLD_SIZE"]),))
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if bf16 else MixedPrecisionPolicy())
    full = model.__dict__.pop("full_weights", None)
    if full is None:
        model.to(device)
    for block in [*model.model.visual.blocks, *model.model.language_model.layers]:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if full is not None:
        model.to_empty(device=device)
        keys = set(model.state_dict())
        set_model_state_dict(model, {k: v for k, v in full.items() if k in keys},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for name, buf in model.named_buffers():
            if name not in keys:
                if full:
                    buf.copy_(full[name])
                dist.broadcast(buf, src=0)
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


def clip_grad_norm(params: list, max_norm: float, step: int) -> float:
    """Clip to `max_norm` (0 = no clipping) and return the norm before clipping; a non-finite norm raises, so that no
    checkpoint is ever written from a step that produced it."""
    gn = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)     # a DTensor under FSDP2
    if not math.isfinite(gn):
        raise FloatingPointError(f"step {step + 1}: non-finite gradient norm ({gn}); stopping before any checkpoint "
                                 f"is written with it")
    return gn


def merge_lora(named: Iterable[tuple[str, torch.Tensor]], scales: dict[str, float]):
    """(name, tensor) pairs of a model with LoRA layers -> the HF names and weights of the same function: each adapted
    layer's `W0 + (alpha / rank) B @ A` under `<layer>.weight` (peft keeps W0 as `<layer>.base_layer.weight`, A and
    B as `<layer>.lora_A.default.weight`, ...); other pairs unchanged. `scales`: lora_scales(model). Streams, holding
    one layer's tensors at a time. tests/test_rollout.py checks it against peft's own merge_and_unload."""
    held: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in named:
        layer = next((k.split(part)[0] for part in (".base_layer.", ".lora_A.", ".lora_B.") if part in k), None)
        if layer is None:
            yield k, v
        elif k.endswith(".base_layer.bias"):
            yield f"{layer}.bias", v
        else:
            parts = held.setdefault(layer, {})
            parts[k[len(layer) + 1:].split(".")[0]] = v          # base_layer, lora_A or lora_B
            if len(parts) == 3:
                del held[layer]
                w = parts["base_layer"]
                yield f"{layer}.weight", w + (scales[layer] * parts["lora_B"].float() @ parts["lora_A"].float()).to(w)
    if held:
        raise ValueError(f"merge_lora: LoRA layers without all of base_layer, lora_A, lora_B: {sorted(held)}")


def lora_scales(model) -> dict[str, float]:
    """{layer name: alpha / rank} of the LoRA layers ({} without LoRA)."""
    return {name: m.scaling["default"] for name, m in model.named_modules() if hasattr(m, "lora_A")}


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Gather the full (unsharded) weights, LoRA merged in, on rank 0 (CPU); other ranks get {}. A collective: call on
    all ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return dict(merge_lora(full.items(), lora_scales(model)))


def trainer_state(model, optimizer) -> dict:
    """What torch.distributed.checkpoint saves and loads, sharded as each rank holds it: the optimizer's state, and a
    LoRA run's trained weights (its HF weights are merged, so the adapters could not be recovered from them)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    if lora_scales(model):
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        state["trained"] = {k: v for k, v in model.state_dict().items() if k in trained}
    return state


def save_checkpoint(out_dir: str, step: int, epoch: float, kind: str, model, optimizer, scheduler, processor,
                    weights: dict | None = None, keep: int = 0, state: dict | None = None) -> Path:
    """Write out_dir/checkpoints/step_NNNNNN, complete or not at all (written as step_NNNNNN.tmp, then renamed): an HF
    model folder (`save_pretrained` of the full weights, LoRA merged in, the processor), `trainer_state` (resharded when
    a run resumes on another number of ranks), the scheduler and vlrl_state.json (with `state`, such as the step's
    "metrics" line, for a run killed before it logged it). A LoRA run also writes its adapters alone to adapter/,
    peft's format (PeftModel.from_pretrained(base, adapter) loads it; a trained connector is only in the merged
    weights). Then only the newest `keep` checkpoints stay (0 = all). A collective: call on all ranks."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    weights = full_state_dict(model) if weights is None else weights
    adapter = {f"base_model.model.{k.replace('.default.', '.')}": v.full_tensor() if isinstance(v, DTensor) else v
               for k, v in model.state_dict().items() if ".lora_" in k}   # collective: all ranks walk it
    root = Path(out_dir) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(trainer_state(model, optimizer), checkpoint_id=tmp / "optimizer")
    if dist.get_rank() == 0:
        model.save_pretrained(tmp, state_dict=dict(weights))   # it pops what it writes: the caller's dict stays whole
        if adapter:                                            # a LoRA run
            model.peft_config["default"].save_pretrained(tmp / "adapter")
            save_file({k: v.contiguous().cpu() for k, v in adapter.items()}, tmp / "adapter/adapter_model.safetensors")
        processor.save_pretrained(tmp)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        vlrl_state = {"step": step, "epoch": epoch, "kind": kind, **(state or {})}
        (tmp / "vlrl_state.json").write_text(json.dumps(vlrl_state, default=asdict))   # a dataclass as its fields
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
    """Restore optimizer and scheduler from a checkpoint (the weights were loaded with the model; a LoRA run's trained
    weights are restored here); returns its vlrl_state.json. A collective: call on all ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    state = trainer_state(model, optimizer)   # the layout to load into
    dcp.load(state, checkpoint_id=ckpt / "optimizer")
    if "trained" in state:
        set_model_state_dict(model, state["trained"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    return json.loads((ckpt / "vlrl_state.json").read_text())


class MetricsLogger:
    """Rank 0 only: metrics.jsonl (always), one greppable line per step, optional TensorBoard / wandb (lazy)."""

    def __init__(self, out_dir: str, config: dict, resumed: dict | None, tensorboard=False, wandb_project=""):
        """resumed: None for a new run, else the resumed checkpoint's vlrl_state.json ({"step": 0} if none). On resume,
        the lines a killed run logged after its checkpoint are moved aside (to metrics.discarded.jsonl) and redone;
        the checkpoint's own line comes from the checkpoint if the run was killed before logging it."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
        self.path, step = out / "metrics.jsonl", -1 if resumed is None else resumed["step"]   # a new run keeps none
        rows = read_jsonl(self.path) if step >= 0 and self.path.exists() else []
        self.rows = [r for r in rows if r["step"] <= step]             # the run's lines so far (log() adds each)
        if step >= 0 and resumed.get("metrics") and step not in {r["step"] for r in self.rows}:
            self.rows.append(resumed["metrics"])
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        discarded = [json.dumps(r) + "\n" for r in rows if r["step"] > step]
        if discarded:
            with open(out / "metrics.discarded.jsonl", "a") as f:
                f.writelines(discarded)
        self.tb = self.wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tb"))
        if wandb_project:
            import wandb
            self.wandb = wandb.init(project=wandb_project, config=config)

    def log(self, metrics: dict, line: str | None = None) -> None:
        self.rows.append(metrics)
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if line:
            print(line, flush=True)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and self.tb:
                self.tb.add_scalar(k, v, metrics["step"])
        if self.wandb:
            self.wandb.log(metrics, step=metrics["step"])


def format_line(step: int, total: int, metrics: dict, fields) -> str:
    """The step's one greppable console line: `step N/M | epoch 0.50 | score 0.625 | ...` from (template, key) fields,
    skipping keys the step did not log."""
    return " | ".join([f"step {step:5d}/{total}"] + [t.format(metrics[k]) for t, k in fields if k in metrics])


def micro_batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}



def batch_indices(num_items: int, batch_size: int, seed: int, step: int) -> tuple[int, list[int]]:
    """(epoch, indices) of global step `step`: epoch = step // (num_items // batch_size); each epoch is a
    permutation seeded by (seed, epoch); the last partial batch is dropped. A pure function, so resuming at
    step s replays exactly the data a run that never stopped would have seen (EasyR1 #57: resume repeats data)."""
    per_epoch = num_items // batch_size if batch_size > 0 else 0
    if per_epoch == 0:
        raise ValueError(f"batch_size={batch_size} must be in 1..num_items={num_items}")
    epoch, k = divmod(step, per_epoch)
    perm = list(range(num_items))
    random.Random(f"vlrl:{seed}:{epoch}").shuffle(perm)   # str seeds hash with sha512: stable across runs
    return epoch, perm[k * batch_size:(k + 1) * batch_size]


def read_jsonl(path, need: tuple[str, ...] = (), check: Callable[[dict], str] = lambda row: "") -> list[dict]:
    """The rows of one of our own jsonl files (rollouts, metrics, evaluations), each holding the keys `need` and
    passing `check(row) -> error or ''`; the first bad row raises a DataError naming path:line."""
    rows = []
    for source, row in file_rows(Path(path)):
        if isinstance(row, DataError):
            raise row
        missing = [k for k in need if k not in row]
        if why := f"missing field {missing[0]!r}" if missing else check(row):
            raise DataError(f"{source}: {why}")
        rows.append(row)
    return rows

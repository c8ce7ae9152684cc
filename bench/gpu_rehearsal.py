"""bench/gpu_rehearsal.py: one training rank's RL step with CUDA semantics, rehearsed on a machine without a GPU.

It needs a CUDA build of torch (it runs without a GPU); the suite's venv has the CPU-only build, in which a fake
"cuda" tensor cannot even be sliced ("PyTorch is not linked with support for cuda devices"). A side venv, used for
this script only (the suite keeps its CPU stack; requirements-cpu.txt's pins where they apply, no vLLM):

    python3.11 -m venv /tmp/cudavenv
    /tmp/cudavenv/bin/pip install torch==2.14.1 transformers==5.19.0 peft==0.21.2 math-verify==0.9.0 \
        antlr4-python3-runtime==4.13.2 tyro==1.0.17 rich==15.0.0 pillow safetensors
    PYTHONPATH=. /tmp/cudavenv/bin/python bench/gpu_rehearsal.py --size small

The project's own functions run as they would on rank 0 of a CUDA node: `common.init_distributed` (it sees a GPU and
asks for its backends), `common.load_model` and `common.shard_model` (FSDP2 on a "cuda" mesh, bf16 compute with fp32
master weights), `train.old_and_ref_logprobs` (the reference's tiled log-prob pass, `rollout.compute_logprobs`),
`train.ppo_update` (loss, backward, gradient clip, AdamW step, its metric sums) and `train.sync_weights`'
per-tensor gathers. Underneath, no tensor holds data and no rank exists but this one:

- tensors are PyTorch's fake tensors (FakeTensorMode): shapes, dtypes and devices are exact, no memory is used;
- the process group is PyTorch's fake one (fake_pg), registered under stand-in names that keep each real backend's
  device coverage: NCCL serves CUDA tensors only, gloo CPU and CUDA ones. So a CPU tensor in a collective fails here
  as it fails on a GPU node whose group has no CPU backend;
- FSDPMemTracker counts every tensor the step allocates on the GPU, by kind, and its peak is the per-GPU figure.

What fake tensors cannot follow is stood in for (and named in the output):
- weights: `from_pretrained` reads no file; the model is built from its config (the loaded values never matter here),
  and put on the GPU by replacing each tensor: Module.to() cannot move fake parameters (a weak reference stops it);
- the vision tower: its window attention splits by `grid_thw.tolist()` and its outputs are checked against a count
  of image tokens, both data-dependent, so precomputed image embeddings of the right shape (bf16, no gradient) take
  its place, the 3-D M-RoPE positions (a Python loop over token types) are given as a (3, B, L) tensor, and the
  placeholder count check is skipped. The frozen tower's sharded weights are counted; its forward is not;
- a Python number read from a tensor (`.item()`, `float()`): 1.0, 0 or True (finite, so the step goes on);
- the processor: `data.collate`, as train.py imported it, is replaced by a batch of collate's layout and shapes.

    python bench/gpu_rehearsal.py                    # Qwen2.5-VL-7B, 7 ranks, micro-batch 4, 2048-token responses
    python bench/gpu_rehearsal.py --size small       # the same architecture at test size
    python bench/gpu_rehearsal.py --backend nccl     # ask for plain NCCL, as init_distributed did before issue 25
    python bench/gpu_rehearsal.py --collectives-only [--backend nccl]    # only the backends: no driver needed

Without a CUDA driver (this machine), even the CUDA build stops: a view or copy_ of a fake CUDA tensor goes through
the CUDA device guard, which asks the runtime ("CUDA driver version is insufficient"), first in fully_shard; and
autograd asks for the CUDA stream (the process aborts). Any machine with a driver and a GPU, however small, will do.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Literal
from unittest import mock

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import train  # noqa: E402
from rollout import Completion, _head_chunk  # noqa: E402

GIB = 1 << 30
# Qwen2.5-VL-7B-Instruct's config.json (the public values; no hub here)
TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
               tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, hidden_act="silu")
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                 fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, tokens_per_second=2, hidden_act="silu")
IDS_7B = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
# the same architecture at test size (every kind of layer, tiny widths)
TEXT_SMALL = {**TEXT_7B, **dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2,
                                rope_parameters={**TEXT_7B["rope_parameters"], "mrope_section": [4, 6, 6]},
                                bos_token_id=4000, eos_token_id=4001)}
VISION_SMALL = {**VISION_7B, **dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                                    fullatt_block_indexes=[1])}
IDS_SMALL = dict(image_token_id=4002, video_token_id=4003, vision_start_token_id=4004, vision_end_token_id=4005)


@dataclass(frozen=True)
class Args:
    size: Literal["7b", "small"] = "7b"
    """Qwen2.5-VL-7B's shapes, or the same architecture at test size."""
    world: int = 7
    """Training ranks (MAYE on 8 GPUs: 7 FSDP ranks, the 8th runs vLLM)."""
    micro_batch: int = 4
    """Responses per forward/backward on a rank (MAYE: 4); one optimizer step over world x micro_batch."""
    response_tokens: int = 2048
    """Every response this long (MAYE's --rollout.max-tokens): the worst case."""
    prompt_tokens: int = 600
    """Prompt length with its image tokens (MAYE's instruction, a question, one 448 x 448 image)."""
    image_tokens: int = 256
    """Image tokens per prompt (448 x 448 px: 32 x 32 patches of 14 px, merged 2 x 2)."""
    checkpointing: tuple[bool, ...] = (False, True)
    """Rehearse without and with --model.activation-checkpointing."""
    kl: bool = True
    """A frozen reference model and its log-prob pass (MAYE: k3 KL in the loss at 0.001)."""
    update: bool = True
    """Run train.ppo_update and a log-prob tile's backward. Autograd asks the CUDA runtime for the device's stream
    whenever it records an op on a CUDA tensor, so without a CUDA driver these abort the process; --no-update
    rehearses the phases without gradients (the reference's log-prob pass, the weight-sync gathers)."""
    collectives_only: bool = False
    """Only init_distributed and the step's CPU collectives (seconds; no CUDA driver; runs in the suite's venv too)."""
    backend: str = ""
    """Ask for this backend instead of what common.init_distributed asks for ("nccl": the code before issue 25)."""


def model_config(size: str):
    from transformers import Qwen2_5_VLConfig
    text, vision, ids = (TEXT_7B, VISION_7B, IDS_7B) if size == "7b" else (TEXT_SMALL, VISION_SMALL, IDS_SMALL)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


# ---- CUDA semantics without CUDA
def _fake_backend(common_opts, backend_opts):
    from torch._C._distributed_c10d import FakeProcessGroup
    return FakeProcessGroup._create_internal(common_opts.group_rank, common_opts.group_size, backend_opts)


def register_fake_backends() -> None:
    """"fakenccl" serves CUDA tensors only (as NCCL), "fakegloo" CPU and CUDA tensors (as gloo)."""
    import torch.distributed as dist
    for name, devices in (("fakenccl", ["cuda"]), ("fakegloo", ["cpu", "cuda"])):
        if not hasattr(dist.Backend, name.upper()):        # once per process
            dist.Backend.register_backend(name, _fake_backend, extended_api=True, devices=devices)


class FakeStream:
    """torch.cuda.Stream / Event for FSDP2's overlap of communication and compute: fake collectives finish at once,
    so every wait is a no-op (the memory FSDP2 holds for in-flight gathers is still allocated and counted)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *a):
        pass

    def wait_event(self, *a):
        pass

    def wait(self, *a):
        pass

    def record(self, *a):
        pass

    def record_event(self, *a):
        return FakeStream()

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True


@contextlib.contextmanager
def cuda_node(world: int, backend: str = ""):
    """Rank 0 of `world` ranks on a node with world + 1 GPUs, as torchrun/common.launch set it up. Yields the list
    of backends init_distributed asked for. The group is fake: every collective returns at once."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    register_fake_backends()
    asked, real_init = [], dist.init_process_group

    def init(name, **kw):
        asked.append(name)
        fake = (backend or name).replace("nccl", "fakenccl").replace("gloo", "fakegloo")
        real_init(fake, store=FakeStore(), rank=0, world_size=world, timeout=kw.get("timeout"))
    env = dict(RANK="0", WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(world))
    cuda = dict(is_available=lambda: True, device_count=lambda: world + 1, set_device=lambda device: None,
                is_initialized=lambda: True, current_device=lambda: 0, get_device_capability=lambda *a: (9, 0),
                Stream=FakeStream, Event=FakeStream, current_stream=lambda *a: FakeStream(),
                stream=lambda s: contextlib.nullcontext(), synchronize=lambda *a: None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, env))
        for name, value in cuda.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        stack.enter_context(mock.patch.object(torch.accelerator, "current_stream", lambda *a: FakeStream()))
        stack.enter_context(mock.patch.object(dist, "init_process_group", init))
        try:
            yield asked
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


class Scalars(torch.utils._python_dispatch.TorchDispatchMode):
    """A Python number read from a fake tensor (.item(), float(), bool()) is 1.0, 0 or True; real tensors (the device
    mesh's) answer for themselves."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            t = args[0]
            return 1.0 if t.is_floating_point() else True if t.dtype == torch.bool else 0
        return func(*args, **(kwargs or {}))


# ---- the stand-ins for what fake tensors cannot follow
@contextlib.contextmanager
def real_mesh():
    """init_device_mesh outside fake mode: the mesh's rank layout is data (real tensors), not memory."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed import device_mesh
    real = device_mesh.init_device_mesh

    def init(*args, **kwargs):
        with unset_fake_temporarily():
            return real(*args, **kwargs)
    with mock.patch.object(device_mesh, "init_device_mesh", init):
        yield



def from_config(config_dir: str, device):
    """AutoModelForImageTextToText.from_pretrained without reading weights: built from the folder's config on the CPU
    (random init on a fake CUDA tensor asks the CUDA runtime for a generator), then put on `device` by replacing each
    parameter and buffer. Module.to() would swap each fake parameter for a new one (torch.utils.swap_tensors), which
    fails on the weak reference fake mode keeps to it, so shard_model's model.to(device) is made a no-op."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    def build(path, dtype=torch.float32, attn_implementation="sdpa", **kw):
        config = AutoConfig.from_pretrained(config_dir)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        moved = {}
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is not None and id(t) not in moved:
                        moved[id(t)] = (torch.nn.Parameter(t.detach().to(device), requires_grad=t.requires_grad)
                                        if isinstance(t, torch.nn.Parameter) else t.to(device))
                    if t is not None:
                        table[name] = moved[id(t)]
        model.to = lambda *args, **kwargs: model
        return model
    return build


def stand_in_vision(model, device) -> None:
    """Precomputed image embeddings in place of the vision tower, given M-RoPE positions, no placeholder count."""
    inner, hidden = model.model, model.config.text_config.hidden_size

    def image_features(pixel_values, image_grid_thw, **kw):
        n = int(image_grid_thw.shape[0]) * IMAGE_TOKENS[0]
        return SimpleNamespace(pooler_output=(torch.zeros(n, hidden, device=device, dtype=torch.bfloat16),))

    def placeholder_mask(input_ids, inputs_embeds, image_features=None, video_features=None):
        return ((input_ids == model.config.image_token_id).unsqueeze(-1),
                (input_ids == model.config.video_token_id).unsqueeze(-1))

    def positions(input_ids, inputs_embeds, **kw):
        return torch.zeros(3, *input_ids.shape, dtype=torch.long, device=device)
    inner.get_image_features, inner.get_placeholder_mask = image_features, placeholder_mask
    inner.compute_3d_position_ids = positions


IMAGE_TOKENS = [256]    # set by rehearse(): the stand-in's embeddings per image


def efficient_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as a GPU runs it with a mask: the memory-efficient kernel, O(L) memory (its
    output and log-sum-exp), not the (B, heads, L, L) scores of the math fallback. PyTorch's kernel choice for CUDA
    is not in a CPU build, so under fake CUDA tensors it would fall back to math."""
    if key.shape[1] != query.shape[1]:             # grouped-query attention: the kernel takes equal heads
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)   # an additive bias
    out = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p,
                                                                  is_causal, scale=scale)
    return out[0]


def fake_collate(args: Args, vocab: int, image_token_id: int):
    """data.collate's stand-in in train.py: its layout (prompts left-padded to P, responses from column P), shapes."""
    side = int((args.image_tokens * 4) ** 0.5)                     # patches per side of a square image

    def collate(processor, samples, responses, data_cfg=None):
        B, P, R = len(responses), args.prompt_tokens, max(len(r) for r in responses)
        input_ids = torch.zeros(B, P + R, dtype=torch.long)
        input_ids[:, P - args.image_tokens - 20:P - 20] = image_token_id
        response_mask = torch.zeros(B, P + R)
        response_mask[:, P:] = 1.0
        return {"input_ids": input_ids, "attention_mask": torch.ones(B, P + R, dtype=torch.long),
                "mm_token_type_ids": torch.zeros(B, P + R, dtype=torch.long), "response_mask": response_mask,
                "response_start": P, "tokenizer_len": vocab, "blocked_token_ids": torch.arange(vocab - 8, vocab),
                "pixel_values": torch.zeros(B * side * side, 3 * 2 * 14 * 14),
                "image_grid_thw": torch.tensor([[1, side, side]] * B)}
    return collate


# ---- the step
def step_args(args: Args, checkpointing: bool) -> train.Args:
    """train.py's flags for the rehearsed step: MAYE's (run.sh rl), one mini-batch of world x micro_batch."""
    from advantage import AdvantageConfig
    base = train.Args()
    return replace(base, model=replace(base.model, activation_checkpointing=checkpointing),
                   rollout=replace(base.rollout, n=1, temperature=1.0, max_tokens=args.response_tokens),
                   advantage=AdvantageConfig(kl_coef=0.001 if args.kl else 0.0, kl_type="k3"),
                   mini_batch_size=args.world * args.micro_batch, micro_batch_size=args.micro_batch)


def local_bytes(model) -> int:
    """Bytes of this rank's shards of the model's parameters."""
    return sum(getattr(p, "_local_tensor", p).numel() * p.element_size() for p in model.parameters())


def run_step(policy, ref, optimizer, targs: train.Args, world: int, device, tracker,
             update: bool = True) -> dict[str, dict]:
    """The step's phases after generation, as train.rl_worker runs them; returns each phase's peak snapshot (the
    tracker's own peak is reset before each: private attributes, as it keeps only one). Generation and reward are
    the engine's and rank 0's CPU work; every response runs to --rollout.max-tokens."""
    B, R = targs.mini_batch_size, targs.rollout.max_tokens
    comps = [Completion("", [0] * R, [-1.0] * R, "length") for _ in range(B)]
    samples, mask, adv = [None] * B, torch.ones(B, R), torch.ones(B, R)
    snaps = {}

    def phase(name, fn, *args):
        tracker._peak_mem, tracker._peak_mem_snap = {}, {}
        out = fn(*args)
        snaps[name] = tracker.get_tracker_snapshot("peak").get(device, {"Total": 0})
        print(f"  phase done: {name}, peak {snaps[name]['Total'] / GIB:.2f} GiB", flush=True)   # before any abort
        return out
    old_lp, ref_lp, ent = phase("reference log-probs", train.old_and_ref_logprobs, policy, ref, samples, comps, R,
                                None, targs, 0, world, device)
    if update:
        phase("update", train.ppo_update, policy, optimizer, samples, comps, list(range(B)), adv, mask, old_lp,
              ref_lp, ent, torch.Generator().manual_seed(0), None, targs, 0, 0, world, device)   # + its metric sums
    phase("weight sync gathers", train.sync_weights, policy, None)
    return snaps


def rehearse(args: Args, checkpointing: bool) -> dict:
    """One rank's step under CUDA semantics; returns its peak GPU memory by kind, the phases' running peaks and the
    backends init_distributed asked for."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    IMAGE_TOKENS[0] = args.image_tokens
    config, targs = model_config(args.size), step_args(args, checkpointing)
    with tempfile.TemporaryDirectory() as folder, cuda_node(args.world, args.backend) as asked:
        config.save_pretrained(folder)
        _, world, device = common.init_distributed()
        with FakeTensorMode(allow_non_fake_inputs=True), Scalars(), real_mesh(), \
                mock.patch("transformers.AutoModelForImageTextToText.from_pretrained", from_config(folder, device)), \
                mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", efficient_sdpa), \
                mock.patch.object(train, "collate", fake_collate(args, config.text_config.vocab_size,
                                                                 config.image_token_id)):
            policy = common.shard_model(common.load_model(folder, targs.model, device), targs.model, device)
            ref = common.shard_model(common.load_model(folder, targs.model, device, trainable=False), targs.model,
                                     device) if args.kl else None
            for model in (policy, ref):
                if model is not None:
                    stand_in_vision(model, device)
            optimizer, _ = common.build_optimizer(policy, targs.optim, 10)
            tracker = FSDPMemTracker(policy, optimizer)
            if ref is not None:
                tracker.track_external(ref)
            with tracker:      # step 1 creates AdamW's state; step 2's peak is every later step's
                if args.update:
                    run_step(policy, ref, optimizer, targs, world, device, tracker)
                phases = run_step(policy, ref, optimizer, targs, world, device, tracker, args.update)
            snapshot = max(phases.values(), key=lambda snap: snap["Total"])
            tile = tile_bytes(config, device, backward=args.update)
            ref_bytes = local_bytes(ref) if ref is not None else 0
    return {"asked": asked, "device": str(device), "snapshot": snapshot, "phases": phases, "tile": tile,
            "reference": ref_bytes}


def tile_bytes(config, device, chunk: int = 512, backward: bool = True) -> int:
    """Peak bytes of one log-prob tile (rollout._head_chunk, forward and backward, bf16 hidden and lm_head) beyond its
    inputs: what compute_logprobs adds at the head, whatever the response length."""
    from torch.distributed._tools.mem_tracker import MemTracker
    H, V = config.text_config.hidden_size, config.text_config.vocab_size
    hidden = torch.zeros(chunk, H, device=device, dtype=torch.bfloat16, requires_grad=backward)
    weight = torch.zeros(V, H, device=device, dtype=torch.bfloat16, requires_grad=backward)
    targets, blocked = torch.zeros(chunk, dtype=torch.long, device=device), torch.arange(8, device=device)
    tracker = MemTracker()
    tracker.track_external(hidden, weight, targets, blocked)
    with tracker:
        before = tracker.get_tracker_snapshot("current")[device]["Total"]
        out = _head_chunk(hidden, weight, None, targets, blocked, 1.0, True).sum()
        if backward:
            out.backward()
    return tracker.get_tracker_snapshot("peak")[device]["Total"] - before


# ---- the report
PAPER = {False: 48.0, True: 30.0}      # bench/README.md's per-GPU estimate at 7B, without / with checkpointing
ROWS = (("params (policy, fp32 shards)", ("Sharded Param",)), ("grads (fp32 shards, unsharded while reducing)",
        ("Sharded Grad", "Unsharded Grad", "Reduce Scatter")), ("optimizer (AdamW m, v)", ("OptState",)),
        ("gathered layers (bf16, all-gather buffers)", ("Unsharded Param", "All Gather")),
        ("activations and temporaries (log-prob tiles included)", ("Activation", "Temp")),
        ("buffers and inputs", ("Buffer", "Inputs")))


def table(result: dict) -> list[tuple[str, float]]:
    """(component, GiB) at the peak. The tracker counts the reference's shards as sharded params: split out."""
    snap, rows = result["snapshot"], []
    for name, keys in ROWS:
        gib = sum(snap.get(k, 0) for k in keys) / GIB
        if keys == ("Sharded Param",):
            rows += [(name, gib - result["reference"] / GIB), ("reference (fp32 shards)", result["reference"] / GIB)]
        else:
            rows.append((name, gib))
    rows.append(("one log-prob tile, forward + backward (measured alone)", result["tile"] / GIB))
    return rows + [("total at the peak", snap["Total"] / GIB)]


def collectives(args: Args) -> None:
    """Only the backend check: init_distributed on the CUDA node, then the step's CPU collectives (no model, no CUDA
    tensor, so no CUDA driver needed). A group without a CPU backend raises at the first one."""
    with cuda_node(args.world, args.backend) as asked:
        _, world, device = common.init_distributed()
        print(f"rank 0 asked for {asked}, device {device}", flush=True)
        torch.distributed.all_reduce(torch.zeros(args.micro_batch, args.response_tokens))  # old_and_ref_logprobs'
        torch.distributed.all_reduce(torch.zeros(len(train.SUM_KEYS), dtype=torch.float64))  # ppo_update's sums
        print(f"the step's CPU collectives passed on {world} ranks")


def main(args: Args) -> dict:
    if args.collectives_only:
        return collectives(args)
    results = {}
    for ckpt in args.checkpointing:
        t0 = time.perf_counter()
        res = rehearse(args, ckpt)
        res["seconds"] = time.perf_counter() - t0
        results["checkpointing" if ckpt else "no checkpointing"] = res
        print(f"\n== {args.size}: {args.world} ranks, micro-batch {args.micro_batch}, {args.prompt_tokens} + "
              f"{args.response_tokens} tokens, activation checkpointing {'on' if ckpt else 'off'}: rank 0 asked for "
              f"{res['asked']}, device {res['device']}, {res['seconds']:.0f} s")
        for name, gib in table(res):
            print(f"  {name:58s} {gib:8.2f} GiB")
        print("  peak of each phase: " + ", ".join(f"{k} {v['Total'] / GIB:.2f} GiB" for k, v in res["phases"].items()))
        if args.size == "7b":
            print(f"  bench/README.md's paper estimate: ~{PAPER[ckpt]:.0f} GB")
    summary = {k: {"peak_gib": round(v["snapshot"]["Total"] / GIB, 2), "asked": v["asked"],
                   **{name: round(gib, 2) for name, gib in table(v)}} for k, v in results.items()}
    print("RESULT " + json.dumps(summary))
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))

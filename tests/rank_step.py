"""Rank workers for tests that call train.py's and sft.py's step functions directly (tests/test_train.py).

`update_worker` runs on 1 or 2 gloo ranks started by common.launch. It joins the process group through
common.init_distributed as it would on a CUDA machine (with gloo standing in for NCCL), records the device of every
collective the step functions make, and runs train.ppo_update on hand-made completions of the tiny toy model in
float64. The optimizer records the gradient instead of stepping, so every case starts from the same weights and the
tests can compare gradients with an independent float64 computation.
"""
from __future__ import annotations

import functools
from unittest import mock

import torch

import common
import data
import sft
import train

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier",
               "gather_object", "reduce", "scatter_object_list")


class RecordingOptimizer:
    """Stands in for AdamW: step() adds the full (unsharded) gradients to `grads` and leaves the weights alone."""

    def __init__(self, model):
        self.model, self.grads = model, {}

    def step(self):
        for name, p in self.model.named_parameters():
            if p.grad is not None:    # full_tensor() is a collective: every rank walks the same parameters
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                self.grads[name] = self.grads.get(name, 0) + g.detach().clone()

    def zero_grad(self, set_to_none: bool = True):
        for p in self.model.parameters():
            p.grad = None


def join_as_on_cuda(threads: int = 1) -> tuple[int, int, str]:
    """common.init_distributed as on a CUDA machine: returns (rank, world, the backend it asked for). The group is
    really gloo (this machine has no NCCL); the step then runs on the CPU."""
    asked = []
    real_init = torch.distributed.init_process_group

    def init(backend, **kw):
        asked.append(backend)
        real_init("gloo", **kw)
    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "set_device", lambda device: None), \
            mock.patch.object(torch.distributed, "init_process_group", init):
        rank, world, _ = common.init_distributed()
    torch.set_num_threads(threads)
    return rank, world, asked[0]


def record_collectives(log: list) -> None:
    """Wrap torch.distributed's collectives: each call appends (name, the device type of its tensor, or "object")."""
    for name in COLLECTIVES:
        real = getattr(torch.distributed, name)

        @functools.wraps(real)
        def wrapped(*a, _real=real, _name=name, **k):
            tensor = a[0] if a and isinstance(a[0], torch.Tensor) else None
            log.append((_name, tensor.device.type if tensor is not None else "object"))
            return _real(*a, **k)
        setattr(torch.distributed, name, wrapped)


def run_case(policy, processor, samples, case: dict, rank: int, world: int, device) -> dict:
    """One train.ppo_update (rows of all ranks; `case`: args, comps, adv (B, T), and either ref=True (pi_ref = the
    policy, through old_and_ref_logprobs) or ref_lp (B, T)) and its logged metrics."""
    args, comps, adv = case["args"], case["comps"], case["adv"]
    lengths = torch.tensor([len(c.token_ids) for c in comps])
    mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).double()               # (B, T)
    old_lp, ref_lp, ent = train.old_and_ref_logprobs(policy, policy if case.get("ref") else None, samples, comps,
                                                     mask.shape[1], processor, args, rank, world, device)
    if "ref_lp" in case:                                              # a given pi_ref (B, T)
        ref_lp = case["ref_lp"]
    optimizer, B = RecordingOptimizer(policy), len(comps)
    sums = train.ppo_update(policy, optimizer, samples, comps, list(range(B)), adv, mask, old_lp, ref_lp, ent,
                            torch.Generator().manual_seed(0), processor, args, 0, rank, world, device)
    scored = [{"accuracy": 0.0, "format": 0.0}] * B
    metrics = train.step_metrics(comps, scored, torch.zeros(B), mask, old_lp, ref_lp, ent, sums, list(range(B)),
                                 [("start", 0.0), ("update", 1.0)], args)
    return {"grads": optimizer.grads, "metrics": metrics}


def update_worker(model_dir: str, samples: list, cases: list[dict], out_file: str) -> None:
    """Join as on CUDA, then run every case's update; rank 0 saves {backend, collectives, results} to out_file."""
    rank, world, backend = join_as_on_cuda()
    log: list = []
    record_collectives(log)
    device = torch.device("cpu")
    processor = __import__("transformers").AutoProcessor.from_pretrained(model_dir)
    policy = common.load_model(model_dir, common.ModelConfig(path=model_dir), device).double()
    policy = common.shard_model(policy, common.ModelConfig(path=model_dir), device)
    train.broadcast({"step": 0})                                     # train.py step 2 broadcasts the scored batch
    results = [run_case(policy, processor, samples, case, rank, world, device) for case in cases]
    responses = [c.token_ids for c in cases[0]["comps"]]
    sft.validation_loss(policy, processor, samples, responses, data.DataConfig(), 2, rank, world, device)
    train.sync_weights(policy, None)
    if rank == 0:
        torch.save({"backend": backend, "collectives": sorted(set(log)), "results": results}, out_file)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def precision_worker(model_dir: str, samples: list, comps: list, cases: dict, out_file: str) -> None:
    """Per case (name -> train.Args): the policy loaded and sharded as train.py does it under args.model, then pi_old's
    recompute (train.response_logprobs, no grad) and one train.ppo_update's gradient. Rank 0 saves per case the
    log-probs, the gradients, the dtypes the decoder layers' outputs had and the dtypes of the weights and gradients."""
    rank, world, device = common.init_distributed(threads=1)
    processor = __import__("transformers").AutoProcessor.from_pretrained(model_dir)
    results = {}
    for name, args in cases.items():
        policy = common.shard_model(common.load_model(model_dir, args.model, device), args.model, device)
        seen = set()
        for layer in policy.model.language_model.layers:
            layer.register_forward_hook(lambda m, i, o: seen.add((o[0] if isinstance(o, tuple) else o).dtype))
        with torch.no_grad():
            lp = train.response_logprobs(policy, list(range(len(comps))), samples, comps, processor, args, device)
        policy.reshard()
        adv = torch.ones(len(comps), lp.shape[1])
        out = run_case(policy, processor, samples, dict(args=args, comps=comps, adv=adv), rank, world, device)
        results[name] = {"logp": lp.double(), "grads": out["grads"], "compute": sorted(map(str, seen)),
                         "weights": sorted({str(p.dtype) for p in policy.parameters()}),
                         "grad_dtypes": sorted({str(g.dtype) for g in out["grads"].values()})}
    if rank == 0:
        torch.save(results, out_file)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

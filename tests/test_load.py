"""Loading each model once (common.load_model / shard_model): with several ranks the model is built on the meta
device and only rank 0 reads the weights; shard_model broadcasts them into every rank's shards. The shards, the
buffers (rotary inv_freq is not in a state dict) and the frozen flags must equal today's loading bit for bit, where
every rank reads the whole model and shards it. Ranks are started by common.launch on gloo, as in tests/test_train.py.
"""
import json
import os
from unittest import mock

import pytest
import torch

import common


def load_worker(model_dir: str, out: str) -> None:
    """Load the policy and the reference both ways on this rank; rank 0 writes every rank's differences."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    cfg = common.ModelConfig(path=model_dir)
    # today's loading: before the group exists load_model reads the whole model on every rank
    before = [common.load_model(model_dir, cfg, torch.device("cpu"), trainable=t) for t in (True, False)]
    rank, world, device = common.init_distributed(1)
    report = {"rank": rank, "meta": [], "diff": [], "n": 0}
    for trainable, old in zip((True, False), before):
        old = common.shard_model(old, cfg, device)
        new = common.load_model(model_dir, cfg, device, trainable=trainable)
        report["meta"].append(all(p.is_meta for p in new.parameters()))
        new = common.shard_model(new, cfg, device)
        olds, news = dict(old.named_parameters()), dict(new.named_parameters())
        olds.update(old.named_buffers())
        news.update(new.named_buffers())
        for name, a in olds.items():
            b = news.get(name)
            la, lb = getattr(a, "_local_tensor", a), getattr(b, "_local_tensor", b)
            if b is None or la.dtype != lb.dtype or not torch.equal(la, lb) or a.requires_grad != b.requires_grad:
                report["diff"].append(name)
        report["n"] += len(olds)
    rows = [None] * world
    dist.all_gather_object(rows, report)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_meta_loading_equals_every_rank_reading_the_model(toy_world, tmp_path, world):
    model_dir, out = toy_world / "models" / "qwen2_5_vl-tiny", tmp_path / "load.json"
    with mock.patch.dict(os.environ):          # launch sets the rendezvous variables in this process
        common.launch(load_worker, world, str(model_dir), str(out))
    rows = json.loads(out.read_text())
    assert len(rows) == world
    for r in rows:
        assert r["meta"] == [world > 1] * 2, r           # several ranks: built on the meta device
        assert r["n"] > 50 and not r["diff"], f"rank {r['rank']} of {world}: {r['diff'][:10]} differ"


def checkpoint_worker(model_dir: str, out: str) -> None:
    """Load the policy meta-wise on this rank, write a checkpoint as sft.py does (weights gathered first, then saved),
    resume from it and compare the resumed shards with the first ones; rank 0 writes what it saw."""
    import torch.distributed as dist
    from transformers import AutoProcessor
    torch.set_num_threads(1)
    cfg = common.ModelConfig(path=model_dir)
    rank, world, device = common.init_distributed(1)
    model = common.shard_model(common.load_model(model_dir, cfg, device), cfg, device)
    optimizer, scheduler = common.build_optimizer(model, common.OptimConfig(), 1)
    weights = common.full_state_dict(model)
    ckpt = common.save_checkpoint(out, 1, 1.0, "sft", model, optimizer, scheduler,
                                  AutoProcessor.from_pretrained(model_dir), weights)
    resumed = common.shard_model(common.load_model(model_dir, cfg, device, resume=ckpt), cfg, device)
    old, new = model.state_dict(), resumed.state_dict()
    diff = [k for k in old if not torch.equal(old[k].to_local(), new[k].to_local())]
    rows = [None] * world
    dist.all_gather_object(rows, {"rank": rank, "diff": diff, "n": len(old), "weights_after_save": len(weights)})
    if rank == 0:
        with open(f"{out}/load.json", "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def test_two_rank_meta_checkpoint_is_the_model_and_resumes(toy_world, tmp_path):
    """A checkpoint written by 2 meta-loaded ranks holds the model folder's every tensor under its on-disk names
    (Qwen2.5-VL's toy keeps the legacy model.embed_tokens layout), bit for bit (no step was taken), leaves the
    caller's gathered weights whole (sft.py sends them to its engine after saving), and resumes into the same
    shards."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    model_dir = toy_world / "models" / "qwen2_5_vl-tiny"
    with mock.patch.dict(os.environ):
        common.launch(checkpoint_worker, 2, str(model_dir), str(tmp_path))
    ckpt = tmp_path / "checkpoints" / "step_000001"
    source, saved = load_file(model_dir / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert "model.embed_tokens.weight" in source and sorted(saved) == sorted(source)
    assert not [k for k in source if not torch.equal(source[k], saved[k])]
    a = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()
    b = AutoModelForImageTextToText.from_pretrained(ckpt).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = json.loads((tmp_path / "load.json").read_text())
    assert rows[0]["weights_after_save"] == len(source)            # rank 0's gathered dict: 57 tensors, all kept
    for r in rows:
        assert r["n"] == len(source) and not r["diff"], r

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

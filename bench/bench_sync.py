"""Weight-sync transport: seconds per GB and peak memory of common.EngineClient.update_weights (issue 17).

The trainer side streams (name, tensor) pairs into buckets written to the engine process's pipe; here the engine is
a sink that reads every tensor (as vLLM's loader would) and counts the bytes, so the figure is the transport alone
(vLLM's own reload is measured by bench_train.py's sync column). Compared with the previous way, one whole state
dict pickled through the pipe (torch moves its tensors through shared memory). The weights: fp32 matrices with the
widths of Qwen2.5-VL-3B's decoder (2048 x 11008 MLP, 2048 x 2048 attention), ~1 GB in all, sent as bf16 and as fp32.

    python bench/bench_sync.py
"""
import functools
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


class Sink:
    """An engine that reads every weight it is sent, and samples its resident memory after each one."""

    def __init__(self):
        self.bytes, self.extra = 0, 0

    def update_weights(self, weights):
        base = rss()
        for _, t in weights:
            self.bytes += t.numel() * t.element_size()
            t.sum()                                        # read all of it, as a loader copies it
            self.extra = max(self.extra, rss() - base)

    def consume(self, state_dict: dict):                   # the previous protocol: the dict arrives whole
        self.update_weights(state_dict.items())

    def stats(self):
        return self.bytes, self.extra


def make_sink(model_dir, cfg, data_cfg):
    return Sink()


def one(model_dir: str, dtype: str, bucket_mb: int) -> dict:
    """One transfer in this (fresh) process: bucket_mb 0 = the whole dict at once."""
    import torch
    from common import EngineClient
    from data import DataConfig
    from rollout import RolloutConfig, serve_engine
    g = torch.Generator().manual_seed(0)
    weights = {}
    for layer in range(3):                    # 3 x (3 MLP + 4 attention matrices) ~ 1.2 GB fp32
        for k, shape in [("up", (11008, 2048)), ("gate", (11008, 2048)), ("down", (2048, 11008)),
                         *[(p, (2048, 2048)) for p in "qkvo"]]:
            weights[f"layers.{layer}.{k}"] = torch.randn(shape, generator=g)
    serve = functools.partial(serve_engine, make=make_sink)
    client = EngineClient(serve, model_dir, RolloutConfig(dtype=dtype), DataConfig(), bucket_mb=bucket_mb or 64)
    client._call("stats")                                                   # started
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.time()
    if bucket_mb:
        client.update_weights(weights.items())
    else:                                     # as before: cast, gathered into one dict, pickled whole
        client._call("consume", {k: v.to(getattr(torch, dtype)) for k, v in weights.items()})
    seconds = time.time() - t0
    got, engine_extra = client._call("stats")
    client.close()
    assert got == sum(t.numel() for t in weights.values()) * (2 if dtype == "bfloat16" else 4)
    trainer_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"dtype": dtype, "bucket_mb": bucket_mb, "gb_fp32": sum(t.numel() * 4 for t in weights.values()) / 1e9,
            "seconds": seconds, "engine_extra_gb": engine_extra / 1e9, "trainer_extra_gb": trainer_extra / 1e9}


def main() -> None:
    import subprocess
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print("RESULT1 " + json.dumps(one(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    import toy
    out = Path(tempfile.mkdtemp())
    toy.build(toy.Args(out=str(out), sizes=("tiny",), archs=("qwen2_5_vl",), train_size=8, val_size=8, test_size=8))
    model_dir, rows = str(out / "models" / "qwen2_5_vl-tiny"), []
    print(f"{'protocol':<22} {'dtype':>9} {'s':>6} {'s/GB fp32':>10} {'engine extra GB':>16} {'trainer extra GB':>17}")
    for dtype in ("bfloat16", "float32"):
        for bucket_mb in (256, 64, 0):
            p = subprocess.run([sys.executable, __file__, "--one", model_dir, dtype, str(bucket_mb)],
                               capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT1 ")]
            if not line:
                raise SystemExit(p.stderr[-3000:])
            r = json.loads(line[0][8:])
            rows.append(r)
            proto = f"buckets {bucket_mb} MiB" if bucket_mb else "whole dict (before)"
            print(f"{proto:<22} {dtype:>9} {r['seconds']:>6.2f} {r['seconds'] / r['gb_fp32']:>10.2f} "
                  f"{r['engine_extra_gb']:>16.2f} {r['trainer_extra_gb']:>17.2f}", flush=True)
    print(f"(weights: {rows[0]['gb_fp32']:.2f} GB in fp32, already in the trainer's memory before the transfer; extra ="
          f" the trainer's peak RSS during the transfer minus its peak before; the engine's RSS after each tensor"
          f" minus its RSS before the first)")
    print("RESULT " + json.dumps(rows))


if __name__ == "__main__":
    main()

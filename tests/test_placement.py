"""Where the engine goes on a GPU node (common.engine_gpu, checked by train.py and sft.py before start-up).

The engine process takes the last GPU the node sees. With several GPUs no training rank may have it: under
`torchrun --nproc-per-node N` (LOCAL_WORLD_SIZE=N) or `python train.py --nproc N` on N GPUs the scripts refuse
before anything starts, naming the fix. One GPU is shared with one rank only when the engine's memory share is given
(--rollout.gpu-memory-utilization <= 0.5; its default 0.9 is for a GPU of its own). The GPUs are faked
(torch.cuda.is_available / device_count); `launch` is replaced, so an accepted layout starts nothing.
"""
import os
import re
from pathlib import Path

import pytest
import torch
import tyro

import common
import sft
import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpus(monkeypatch):
    """set(n): this machine has n GPUs and no CUDA_VISIBLE_DEVICES; the launcher records instead of starting."""
    launched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for var in ("LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    for module in (train, sft):
        monkeypatch.setattr(module, "launch", lambda worker, nproc, *a: launched.append(nproc))

    def set_count(n: int):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        return launched
    return set_count


def rl_args(toy_world: Path, out: Path, *extra: str) -> train.Args:
    data = toy_world / "data"
    return tyro.cli(train.Args, args=[
        "--model.path", str(toy_world / "models" / "qwen2_5_vl-tiny"), "--data.train", str(data / "train.jsonl"),
        "--data.validation", str(data / "validation.jsonl"), "--out-dir", str(out), "--prompts-per-step", "28",
        "--rollout.n", "2", "--mini-batch-size", "56", "--micro-batch-size", "2", *extra])


def sft_args(toy_world: Path, out: Path, *extra: str) -> sft.Args:
    data = toy_world / "data"
    return tyro.cli(sft.Args, args=[
        "--model.path", str(toy_world / "models" / "qwen2_5_vl-tiny"), "--data.train", str(data / "train.jsonl"),
        "--data.validation", str(data / "validation.jsonl"), "--out-dir", str(out), "--batch-size", "56",
        "--data.skip-invalid", *extra])


def test_torchrun_with_every_gpu_a_rank_is_refused_before_start_up(gpus, monkeypatch, toy_world, tmp_path):
    """torchrun --nproc-per-node 8 on 8 GPUs: every GPU is a rank's, so there is none for the engine."""
    launched = gpus(8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("WORLD_SIZE", "8")
    for main, args in ((train.main, rl_args(toy_world, tmp_path / "rl")),
                       (sft.main, sft_args(toy_world, tmp_path / "sft"))):
        with pytest.raises(SystemExit, match=r"GPU of its own: 8 training rank\(s\) on this node and 8 GPU\(s\); "
                                             r"start 7"):
            main(args)
    assert not launched and not (tmp_path / "rl").exists() and not (tmp_path / "sft").exists()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "7")                     # --nproc-per-node 7: GPU 7 is the engine's
    monkeypatch.setenv("WORLD_SIZE", "7")
    train.main(rl_args(toy_world, tmp_path / "rl"))
    assert launched == [1] and common.engine_gpu(7, 0.9) == "7"     # launch runs in place under torchrun


def test_nproc_equal_to_the_gpus_is_refused_and_one_fewer_leaves_the_last_to_the_engine(gpus, toy_world, tmp_path):
    launched = gpus(8)
    for main, args in ((train.main, rl_args(toy_world, tmp_path / "rl", "--nproc", "8")),
                       (sft.main, sft_args(toy_world, tmp_path / "sft", "--nproc", "8"))):
        with pytest.raises(SystemExit, match=r"GPU of its own: 8 training rank\(s\) .* start 7 \(--nproc"):
            main(args)
    assert not launched and not (tmp_path / "rl").exists()
    train.main(rl_args(toy_world, tmp_path / "rl", "--nproc", "7"))
    sft.main(sft_args(toy_world, tmp_path / "sft", "--nproc", "7"))
    assert launched == [7, 7] and common.engine_gpu(7, 0.9) == "7"
    sft.main(sft_args(toy_world, tmp_path / "sft8", "--nproc", "8", "--val-every", "-1"))   # no validation: no engine
    assert launched[-1] == 8


def test_visible_devices_are_honoured(gpus, monkeypatch):
    """A job given four GPUs (CUDA_VISIBLE_DEVICES=2,3,5,6): three ranks on 2, 3, 5 and the engine on physical 6."""
    gpus(8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,6")
    assert common.engine_gpu(3, 0.9) == "6"
    with pytest.raises(SystemExit, match="start 3"):
        common.engine_gpu(4, 0.9)


def test_one_gpu_is_shared_only_with_an_explicit_memory_split(gpus, toy_world, tmp_path):
    """NGPUS=1: one rank and the engine on GPU 0, with the engine's share given; two ranks on one GPU are refused."""
    launched = gpus(1)
    with pytest.raises(SystemExit, match=r"gpu-memory-utilization 0.9 would leave the rank 10% of it; give the engine "
                                         r"0.5 or less"):
        train.main(rl_args(toy_world, tmp_path / "rl"))
    with pytest.raises(SystemExit, match="2 training ranks on this node and 1 GPU"):
        train.main(rl_args(toy_world, tmp_path / "rl", "--nproc", "2", "--rollout.gpu-memory-utilization", "0.4"))
    assert not launched and not (tmp_path / "rl").exists()
    train.main(rl_args(toy_world, tmp_path / "rl", "--rollout.gpu-memory-utilization", "0.4"))
    assert launched == [1] and common.engine_gpu(1, 0.4) == "0"
    assert common.engine_gpu(0, 0.9) == "0"               # evaluate.py: no training rank, the GPU is the engine's


def test_cpu_only_machine_places_the_engine_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.engine_gpu(8, 0.9) == ""


def test_run_sh_layouts_pass(gpus):
    """run.sh rl: NGPUS=8 -> 7 ranks, engine share 0.90; NGPUS=1 -> 1 rank, share 0.40 (its own arithmetic)."""
    text = (ROOT / "run.sh").read_text()
    assert 'RANKS=$(( NGPUS > 1 ? NGPUS - 1 : 1 )); SHARE=$(( NGPUS > 1 ? 90 : 40 ))' in text
    for ngpus, ranks, share in ((8, 7, 0.9), (2, 1, 0.9), (1, 1, 0.4)):
        gpus(ngpus)
        assert common.engine_gpu(ranks, share) == str(ngpus - 1)


def report_engine_env(conn, model_dir, cfg, data_cfg, env):
    """A stand-in for rollout.serve_engine: answers one call with what the engine process would run under."""
    os.environ.update(env)
    conn.recv()
    conn.send(("ok", {"bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"], "threads": os.environ["OMP_NUM_THREADS"],
                      "cores": sorted(os.sched_getaffinity(0))}))
    conn.recv()   # "close"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to place the engine on the second")
def test_the_users_cpu_binding_places_the_engine(monkeypatch, toy_world):
    """VLLM_CPU_OMP_THREADS_BIND=1 (the trainer on core 0, the engine on core 1): the engine process runs on core 1
    with one OpenMP thread, whatever cores its parent has; unset, it gets all cores as before."""
    from rollout import RolloutConfig
    model, start = str(toy_world / "models" / "qwen2_5_vl-tiny"), os.sched_getaffinity(0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for bind, want in (("1", {"bind": "1", "threads": "1", "cores": [1]}),
                       (None, {"bind": "nobind", "threads": str(os.cpu_count()), "cores": sorted(start)})):
        if bind:
            monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", bind)
        else:
            monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
        client = common.EngineClient(report_engine_env, model, RolloutConfig(), None)
        try:
            assert client.generate([], 1, 1.0) == want
        finally:
            client.close()
        assert os.sched_getaffinity(0) == start                 # the caller's own cores are back
    for bad in ("0|1", str(os.cpu_count()), "1-"):     # one engine rank; a core this machine lacks; a typo
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", bad)
        with pytest.raises(ValueError, match=re.escape(f"VLLM_CPU_OMP_THREADS_BIND='{bad}'")):
            common.EngineClient(report_engine_env, model, RolloutConfig(), None)

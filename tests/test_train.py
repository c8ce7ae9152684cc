"""train.py end to end on the tiny toy model: ranks + engine process, sync, 1 vs 2 ranks, kill-and-resume, faults.

Each run is a real `python train.py` subprocess (its own process group, so a test can SIGKILL all of it).
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import data
import rollout
import train

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("time/", "perf/")


def train_cmd(world: Path, out: Path, *extra: str, train_file: str = "train.jsonl") -> list[str]:
    data = world / "data"
    return [sys.executable, str(ROOT / "train.py"), "--model.path", str(world / "models" / "qwen2_5_vl-tiny"),
            "--data.train", str(data / train_file), "--data.validation", str(data / "validation.jsonl"),
            "--out-dir", str(out), "--prompts-per-step", "4", "--rollout.n", "2", "--rollout.max-tokens", "12",
            "--mini-batch-size", "4", "--micro-batch-size", "2", "--optim.lr", "1e-3", "--optim.warmup-ratio", "0",
            "--val-limit", "4", "--reward.num-workers", "1", "--reward.no-truncation-penalty",
            "--reward.fn", str(ROOT / "tests" / "fixtures" / "length_reward.py") + ":digit_count", "--threads", "1",
            *extra]


def run(cmd, timeout=300, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **kw)
    return p


def run_patched(patch: str, cmd: list[str], timeout=300):
    """`train.main` in ONE process, as under torchrun (RANK set), after `patch` (Python code) has changed the train
    module: test-only behaviour is a monkeypatch, never a user-facing flag. cmd is train_cmd(...) (1 rank)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"import sys, tyro, train\n{patch}\ntrain.main(tyro.cli(train.Args, args=sys.argv[1:]))"
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    return subprocess.run([sys.executable, "-c", code, *cmd[2:]], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def no_timing(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith(TIMING_KEYS)}


EPOCH3 = "train12.jsonl"      # 12 training rows, 4 prompts per step: an epoch is 3 steps


@pytest.fixture(scope="session")
def two_rank_run(toy_world, tmp_path_factory):
    """The reference run: 2 ranks + vLLM, 3 steps (one epoch), a checkpoint after every step. Session-scoped: its users
    share one xdist worker (xdist_group), which may run other modules' tests between them; a module fixture would
    be built again on the way back."""
    rows = (toy_world / "data" / "train.jsonl").read_text().splitlines(keepends=True)[:12]
    (toy_world / "data" / EPOCH3).write_text("".join(rows))
    out = tmp_path_factory.mktemp("rl2")
    p = run(train_cmd(toy_world, out, "--nproc", "2", "--max-steps", "3", "--save-every", "1",
                      "--keep-checkpoints", "0", train_file=EPOCH3))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return out, p


@pytest.mark.slow
@pytest.mark.xdist_group("two_rank_run")
def test_two_ranks_with_vllm_complete_and_sync(two_rank_run):
    out, p = two_rank_run
    ms = metrics(out)
    assert [m["step"] for m in ms] == [1, 2, 3]
    assert "step     3/3" in p.stdout and "val/accuracy" in ms[-1]
    # quiet: none of the known-harmless engine warnings (3 weight syncs happened), nor FSDP2's view-output warning
    log = p.stdout + p.stderr
    assert not [m for ms_ in rollout.HARMLESS_VLLM_WARNINGS.values() for m in ms_ if m in log], log[-3000:]
    assert "returned a view tensor" not in log and "Loading safetensors checkpoint shards" not in log, log[-3000:]
    for key in ("rews/scores", "loss/policy_loss", "training/clipfrac", "training/grad_norm", "training/entropy",
                "response/lengths", "reflection/reflection_ratio", "time/generate", "time/sync"):
        assert key in ms[0], key
    # After each sync, vLLM samples with the trainer's new weights: its sampled-token log-probs equal the
    # trainer's recomputed ones. (lr 1e-3 moves the weights visibly, so a missed sync would show up here.)
    for m in ms:
        assert m["training/rollout_mismatch"] < 1e-4, m
    assert ms[0]["training/grad_norm"] > 0
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_000001", "step_000002", "step_000003"]
    w1, w2 = load_file(ckpts[0] / "model.safetensors"), load_file(ckpts[1] / "model.safetensors")
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)          # the policy moved
    # The checkpoint is a plain HF folder.
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(ckpts[-1])
    on_disk = load_file(ckpts[-1] / "model.safetensors")
    assert torch.equal(model.state_dict()["lm_head.weight"], on_disk["lm_head.weight"])


@pytest.mark.slow
@pytest.mark.xdist_group("two_rank_run")
def test_kill_and_resume_equals_uninterrupted(two_rank_run, toy_world, tmp_path):
    out2, _ = two_rank_run
    cmd = train_cmd(toy_world, tmp_path, "--nproc", "2", "--max-steps", "3", "--save-every", "1",
                    "--keep-checkpoints", "0", train_file=EPOCH3)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while not (tmp_path / "checkpoints" / "step_000001" / "vlrl_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)                 # the launcher, both ranks, the engine: all at once
    proc.wait()
    assert not (tmp_path / "checkpoints" / "step_000003").exists(), "killed too late to test resuming"
    p = run(cmd + ["--resume"])
    assert p.returncode == 0, p.stderr[-5000:]
    resumed, reference = metrics(tmp_path), metrics(out2)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    # resumed mid-epoch: the epoch's accuracy still covers its 3 steps (the mean of their per-step accuracies)
    acc = [m["rews/acc_rewards"] for m in reference]
    assert resumed[-1]["train/epoch_accuracy"] == pytest.approx(sum(acc) / 3, abs=1e-9) and len(set(acc)) > 1
    for r, u in zip(resumed, reference):
        r, u = no_timing(r), no_timing(u)
        assert r.keys() == u.keys()
        for k in r:
            assert r[k] == pytest.approx(u[k], abs=1e-6), (r["step"], k)


@pytest.mark.slow
def test_qwen3_vl_with_lora_syncs_merged_weights_to_vllm(toy_world, tmp_path):
    """RL on the Qwen3-VL toy with LoRA (rank 4) and vLLM: every step's rollout comes from the synced (merged)
    weights, so the engine's log-probs equal the trainer's (peft forward); the KL reference is the base model."""
    cmd = train_cmd(toy_world, tmp_path, "--nproc", "1", "--max-steps", "3", "--model.lora-rank", "4")
    cmd[cmd.index("--model.path") + 1] = str(toy_world / "models" / "qwen3_vl-tiny")
    p = run(cmd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    ms = metrics(tmp_path)
    assert [m["step"] for m in ms] == [1, 2, 3] and "val/accuracy" in ms[-1]
    assert all(m["training/rollout_mismatch"] < 1e-5 and m["training/grad_norm"] > 0 for m in ms), ms
    assert abs(ms[0]["training/kl"]) < 1e-6 < abs(ms[-1]["training/kl"])    # B = 0 at the start: the policy is the base
    ckpt = tmp_path / "checkpoints" / "step_000003"
    w0 = load_file(toy_world / "models" / "qwen3_vl-tiny" / "model.safetensors")
    w3 = load_file(ckpt / "model.safetensors")
    changed = sorted(k for k in w0 if not torch.equal(w0[k], w3[k]))
    assert len([k for k in changed if "language_model" in k]) == 14 and all(
        k.endswith("_proj.weight") or "merger" in k for k in changed), changed   # adapted linears + the connector
    assert (ckpt / "adapter" / "adapter_config.json").is_file()


def engine_pid(launcher: int) -> int:
    """The engine process of a 1-rank run: rank 0 (the launcher's spawned child) spawned it, so its command line
    differs from rank 0's, where rank 0's forked judges repeat rank 0's."""
    ps = subprocess.run(["ps", "-ww", "-o", "pid=,ppid=,args=", "-s", str(launcher)],   # -ww: whole command lines
                        capture_output=True, text=True).stdout
    procs = [line.split(None, 2) for line in ps.splitlines()]
    rank0 = [(pid, args) for pid, ppid, args in procs if int(ppid) == launcher and "spawn_main" in args]
    assert len(rank0) == 1, ps
    rank0 = rank0[0]
    engine = [pid for pid, ppid, args in procs
              if ppid == rank0[0] and args != rank0[1] and "resource_tracker" not in args]
    assert len(engine) == 1, ps
    return int(engine[0])


@pytest.mark.slow
@pytest.mark.xdist_group("two_rank_run")
def test_one_rank_matches_two_ranks_then_engine_death_stops_everything(two_rank_run, toy_world, tmp_path):
    """A 1-rank run takes the same first step as the 2-rank run; then its engine is killed: the run must stop
    within 60 s with a clear message and a non-zero exit code, leaving no process behind."""
    out2, _ = two_rank_run
    cmd = train_cmd(toy_world, tmp_path, "--nproc", "1", "--max-steps", "1000", "--save-every", "1",
                    "--keep-checkpoints", "0", "--val-every", "-1", train_file=EPOCH3)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not (tmp_path / "checkpoints" / "step_000001" / "vlrl_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.kill(engine_pid(proc.pid), signal.SIGKILL)
    try:     # the timeout guards against a hang (not a speed target): the run stops at its next engine call
        _, err = proc.communicate(timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode != 0 and "engine process died" in err, err[-3000:]
    for _ in range(100):     # helpers (reward judges, multiprocessing's resource tracker) exit on their own
        leftovers = subprocess.run(["ps", "-o", "pid,args", "--no-headers", "-s", str(proc.pid)],
                                   capture_output=True, text=True).stdout.strip()
        if not leftovers:
            break
        time.sleep(0.1)
    assert not leftovers, leftovers
    a = load_file(out2 / "checkpoints" / "step_000001" / "model.safetensors")
    b = load_file(tmp_path / "checkpoints" / "step_000001" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


NAN_AT_STEP_2 = """
update, loss, calls = train.ppo_update, train.policy_loss, []
def ppo_update(*a, **k):
    calls.append(1)
    return update(*a, **k)
def policy_loss(*a, **k):
    value, m = loss(*a, **k)
    return (value * float("nan") if len(calls) == 2 else value), m
train.ppo_update, train.policy_loss = ppo_update, policy_loss
"""


@pytest.mark.slow
def test_nan_loss_stops_before_checkpoint(toy_world, tmp_path):
    p = run_patched(NAN_AT_STEP_2, train_cmd(toy_world, tmp_path, "--max-steps", "3", "--save-every", "1",
                                             "--rollout.engine", "hf", "--val-every", "-1"))
    assert p.returncode != 0 and "non-finite gradient norm" in p.stderr
    assert [c.name for c in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]   # step 2 never saved
    assert [m["step"] for m in metrics(tmp_path)] == [1]


@pytest.mark.slow
def test_two_node_rendezvous_on_localhost(toy_world, tmp_path):
    """`torchrun --nnodes 2` (two 'nodes' on this machine) runs one step."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "vlrl-test"]
    args = train_cmd(toy_world, tmp_path, "--max-steps", "1", "--rollout.engine", "hf", "--val-every", "-1")[1:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(torchrun + ["--node-rank", str(r)] + args, cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) for r in range(2)]
    try:
        outs = [n.communicate(timeout=240) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
    assert all(n.returncode == 0 for n in nodes), [o[1][-3000:] for o in outs]
    assert "2 rank(s)" in outs[0][0] + outs[1][0]
    assert [m["step"] for m in metrics(tmp_path)] == [1]


@pytest.mark.slow
def test_fused_old_logprobs_equal_a_separate_pass(toy_world, tmp_path):
    """One on-policy update (mini-batch = the whole batch): taking pi_old from the update's own forward gives the
    same step as a separate no-grad pass."""
    outs = []
    for name, patch in (("fused", "assert train.fuse_old_logprobs(train.Args(mini_batch_size=8, prompts_per_step=4,"
                                  " rollout=train.RolloutConfig(n=2)), 8, 1)"),
                        ("separate", "train.fuse_old_logprobs = lambda *a: False")):
        out = tmp_path / name
        p = run_patched(patch, train_cmd(toy_world, out, "--max-steps", "1", "--mini-batch-size", "8",
                                         "--rollout.engine", "hf", "--val-every", "-1"))
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append((metrics(out)[0], load_file(out / "checkpoints" / "step_000001" / "model.safetensors")))
    (m1, w1), (m2, w2) = outs
    assert m1["training/grad_norm"] > 0
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-6
    for k in ("loss/policy_loss", "training/entropy", "training/rollout_mismatch", "training/clipfrac"):
        assert m1[k] == pytest.approx(m2[k], abs=1e-6), k


@pytest.mark.slow
def test_async_batches_are_one_update_stale_and_resume_exactly(toy_world, tmp_path):
    """--async-steps 1 on 1 rank: step 2's batch is sampled while step 1 updates, so its engine log-probs are those of
    the weights before that update (the model folder), not the trainer's (checkpoint 1); checkpoint 1 keeps that
    batch, and a run cut back to it (a kill during step 2) resumes to the same metrics."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from test_rollout import max_engine_vs_trainer
    rows = (toy_world / "data" / "train.jsonl").read_text().splitlines(keepends=True)[:12]
    (toy_world / "data" / EPOCH3).write_text("".join(rows))
    out, flags = tmp_path / "run", ("--max-steps", "2", "--save-every", "1", "--keep-checkpoints", "0",
                                    "--rollout.engine", "hf", "--val-every", "-1", "--async-steps", "1")
    p = run(train_cmd(toy_world, out, *flags, train_file=EPOCH3))
    assert p.returncode == 0, p.stderr[-3000:]
    ms = metrics(out)
    assert [m["rollout/staleness"] for m in ms] == [0, 1]
    assert ms[0]["training/rollout_mismatch"] < 1e-4 < ms[1]["training/rollout_mismatch"], ms
    # step 2's batch, kept by checkpoint 1, came from the weights before step 1's update (an independent HF forward)
    ckpt = out / "checkpoints" / "step_000001"
    comps = [rollout.Completion(**c) for c in json.loads((ckpt / "vlrl_state.json").read_text())["ahead"][0]]
    args = train.Args(prompts_per_step=4, rollout=train.RolloutConfig(n=2))
    prompts = train.step_samples(data.load_dataset(str(toy_world / "data" / EPOCH3)), args, 1)[::2]
    groups = [comps[2 * i:2 * i + 2] for i in range(4)]                 # --rollout.n 2: each prompt's 2 adjacent
    gaps = [max_engine_vs_trainer(AutoModelForImageTextToText.from_pretrained(folder).eval(),
                                  AutoProcessor.from_pretrained(folder), prompts, groups, 1.0)
            for folder in (toy_world / "models" / "qwen2_5_vl-tiny", ckpt)]
    assert gaps[0] < 1e-4 < gaps[1], gaps
    # resume from checkpoint 1 as a kill during step 2 would leave the run: the same metrics as the uninterrupted one
    cut = tmp_path / "cut"
    shutil.copytree(out, cut, ignore=lambda d, names: [n for n in names if n == "step_000002"])
    p = run(train_cmd(toy_world, cut, *flags, "--resume", train_file=EPOCH3))
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = metrics(cut)
    assert [m["step"] for m in resumed] == [1, 2]
    for r, u in zip(resumed, ms):
        r, u = no_timing(r), no_timing(u)
        assert r.keys() == u.keys() and all(r[k] == pytest.approx(u[k], abs=1e-6) for k in r), (r, u)


@pytest.mark.slow
def test_forced_rethinking_in_an_rl_batch(toy_world, tmp_path):
    """--rollout.rethink-fraction 1 in train.py: responses that stopped are continued after a trigger, kept when the
    judge accepts the new text (here: any digit), scored and trained on; the engine's log-probs of the sampled tokens
    still equal the trainer's (the forced trigger tokens are left out of that check)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from test_rollout import stop_prone_copy
    src = toy_world / "models" / "qwen2_5_vl-tiny"
    model, processor = AutoModelForImageTextToText.from_pretrained(src).eval(), AutoProcessor.from_pretrained(src)
    stop_prone = tmp_path / "stop_prone"
    val = data.load_dataset(str(toy_world / "data" / "validation.jsonl"))
    stop_prone_copy(model, processor, val).save_pretrained(stop_prone)
    processor.save_pretrained(stop_prone)
    cmd = train_cmd(toy_world, tmp_path / "run", "--nproc", "1", "--max-steps", "2", "--rollout.engine", "hf",
                    "--val-every", "-1", "--rollout.rethink-fraction", "1", "--rollout.rethink-min-new-tokens", "1",
                    "--rollout.rethink-max-new-tokens", "12", "--rollout.max-tokens", "32", "--prompts-per-step", "8",
                    "--mini-batch-size", "16", "--rollout.temperature", "1.0", "--advantage.tis",
                    "sequence")
    cmd[cmd.index("--model.path") + 1] = str(stop_prone)
    p = run(cmd)
    assert p.returncode == 0, p.stderr[-3000:]
    ms = metrics(tmp_path / "run")
    assert sum(m["rethink/tried"] for m in ms) > 0 and sum(m["rethink/kept"] for m in ms) > 0, ms
    assert all(m["rethink/kept"] <= m["rethink/tried"] for m in ms)
    assert all(m["training/rollout_mismatch"] < 1e-4 and m["training/grad_norm"] > 0 for m in ms)
    # --advantage.tis sequence (forced tokens count as ratio 1): in fp32 engine and trainer agree, so every weight is ~1
    assert all(abs(m["training/tis_weight"] - 1) < 1e-3 and m["training/tis_capped"] == 0 for m in ms), ms


def test_weighting_advantages_weights_the_clipped_loss():
    """train.py applies the weights w > 0 as advantage.policy_loss(A * w): both PPO branches and the dual clip are
    linear in A, so that equals the w-weighted clipped loss, computed here by hand in float64."""
    from advantage import AdvantageConfig, policy_loss
    g = torch.Generator().manual_seed(0)
    logp, old = -torch.rand(3, 5, generator=g, dtype=torch.float64), -torch.rand(3, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    w = 0.5 + torch.rand(3, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.float64)
    mask[2, 3:] = 0
    cfg = AdvantageConfig(kl_coef=0.0, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    r = (logp - old).exp()
    per_token = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.28))
    per_token = torch.where(adv < 0, torch.minimum(per_token, -3.0 * adv), per_token)   # dual clip
    expected = (w * per_token * mask).sum() / mask.sum()                                 # token-mean
    loss, _ = policy_loss(logp, old, adv * w, mask, cfg)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# The step's functions called directly (tests/rank_step.py) on 1 and 2 ranks, in float64, against independent values
# ---------------------------------------------------------------------------------------------------------------------
LENGTHS = [3, 7, 1, 5, 8, 2, 6, 4]     # B = 4 prompts x 2 responses; --rollout.max-tokens 12 exceeds every length
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def step_args(model_dir, micro: int, mini: int = 8, **advantage) -> "train.Args":
    import train
    from advantage import AdvantageConfig
    return train.Args(model=common.ModelConfig(path=str(model_dir)), prompts_per_step=4,
                      rollout=train.RolloutConfig(n=2, max_tokens=12), mini_batch_size=mini, micro_batch_size=micro,
                      optim=common.OptimConfig(grad_clip=0.0),
                      advantage=AdvantageConfig(**{"kl_coef": 0.0, **advantage}))


def make_comps(tokenizer, engine_lp: list[list[float]] | None = None) -> list:
    from rollout import Completion
    words = tokenizer.encode("the sum of 3 and 4 is 7 so the answer is 7 and we check it", add_special_tokens=False)
    ids = [[words[(i + t) % len(words)] for t in range(n)] for i, n in enumerate(LENGTHS)]
    lps = engine_lp or [[0.0] * n for n in LENGTHS]
    return [Completion(tokenizer.decode(x), x, lp, "stop") for x, lp in zip(ids, lps)]


def reference_logp(model, processor, samples, comps) -> torch.Tensor:
    """(B, R) log pi of each response token from a plain HF forward of the whole batch: full logits, the engines'
    blocked tokens at -inf, log-softmax (no tiles, no FSDP, no micro-batches)."""
    from rollout import MODEL_INPUTS
    batch = data.collate(processor, samples, [c.token_ids for c in comps])
    P = batch["response_start"]
    logits = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits[:, P - 1:-1]        # (B, R, V)
    blocked = torch.cat([batch["blocked_token_ids"], torch.arange(batch["tokenizer_len"], logits.shape[-1])])
    logp = logits.index_fill(-1, blocked, float("-inf")).log_softmax(-1)
    return logp.gather(-1, batch["input_ids"][:, P:, None])[..., 0] * batch["response_mask"][:, P:]


def expected_grads(model, logp, coef) -> dict[str, torch.Tensor]:
    """Gradient of -sum_{i,t} coef_it log pi_it: the PPO loss's gradient at ratio 1 (pi = pi_old)."""
    model.zero_grad()
    (-(coef * logp).sum()).backward(retain_graph=True)
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def agg_coef(mode: str, adv: torch.Tensor, mask: torch.Tensor, L: int) -> torch.Tensor:
    """(B, T) the weight of each token's -A log pi in each aggregation, worked out per mode (S responses, N tokens)."""
    n_tok, S = mask.sum(1, keepdim=True), mask.any(1).sum()
    per_mode = {"token-mean": mask.sum(), "seq-mean-token-mean": n_tok * S, "seq-mean-token-sum": S,
                "seq-mean-token-sum-norm": L * S}
    return adv * mask / per_mode[mode]


@pytest.fixture(scope="session")
def direct_runs(toy_world, tmp_path_factory):
    """One update per case on 1 and on 2 ranks (rank_step.update_worker), and the float64 reference pieces (session
    scope, as two_rank_run)."""
    from unittest import mock

    from transformers import AutoModelForImageTextToText, AutoProcessor

    import rank_step
    model_dir = toy_world / "models" / "qwen2_5_vl-tiny"
    processor = AutoProcessor.from_pretrained(model_dir)
    prompts = data.load_dataset(str(toy_world / "data" / "train.jsonl"))[:4]
    samples = [s for s in prompts for _ in range(2)]
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float64)
    for name, p in model.named_parameters():     # as common.load_model: the vision tower frozen, its merger not
        p.requires_grad_(not (name.startswith("model.visual.") and "merger" not in name))
    comps = make_comps(processor.tokenizer)
    logp = reference_logp(model, processor, samples, comps)                                           # (B, T)
    mask = (torch.arange(logp.shape[1])[None, :] < torch.tensor(LENGTHS)[:, None]).double()         # (B, T)
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(len(LENGTHS), mask.shape[1], generator=g, dtype=torch.float64) * mask          # (B, T)
    noise = 0.5 * torch.randn(logp.shape, generator=g, dtype=torch.float64)                         # engine - trainer
    engine_lp = [(logp[i, :n] + noise[i, :n]).tolist() for i, n in enumerate(LENGTHS)]
    cases = [dict(args=step_args(model_dir, micro, loss_agg=mode), comps=comps, adv=adv)
             for mode in MODES for micro in (1, 4)]
    cases.append(dict(args=step_args(model_dir, 2, tis="token", tis_cap=2.0),
                      comps=make_comps(processor.tokenizer, engine_lp), adv=adv))
    half = torch.full_like(adv, 0.5) * mask
    ref_lp = (logp.detach() - 0.3) * mask                            # log pi - log pi_ref = 0.3 on every token
    cases += [dict(args=step_args(model_dir, 2, mini, kl_coef=0.1, kl_type="k1"), comps=comps, adv=half,
                   ref_lp=ref_lp) for mini in (8, 4)]
    cases.append(dict(args=step_args(model_dir, 2, kl_coef=0.001), comps=comps, adv=adv, ref=True))   # fused pi_old
    cases.append(dict(args=step_args(model_dir, 2, tis="token", tis_cap=1.2, rollout_mask="token",
                                     rollout_mask_low=0.5, rollout_mask_high=1.5),
                      comps=make_comps(processor.tokenizer, engine_lp), adv=adv))
    runs = {}
    for world in (1, 2):
        out = tmp_path_factory.mktemp(f"direct{world}") / "out.pt"
        with mock.patch.dict(os.environ):          # launch sets the rendezvous variables in this process
            common.launch(rank_step.update_worker, world, str(model_dir), samples, cases, str(out))
        runs[world] = torch.load(out, weights_only=False)
    return runs, dict(model=model, logp=logp, mask=mask, adv=adv, noise=noise)


def test_engine_gpu_is_never_a_training_ranks(monkeypatch, toy_world, tmp_path):
    """The engine process takes the last GPU this node sees; with several GPUs no training rank may have it. Under
    torchrun --nproc-per-node 8 on 8 GPUs the ranks hold all 8, and train.py says so before start-up."""
    import tyro

    import train
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert common.engine_gpu(7) == "7"                            # python train.py --nproc 7: ranks on 0..6
    with pytest.raises(SystemExit, match="GPU of its own"):
        common.engine_gpu(8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,6")          # a job given four GPUs: the engine gets physical 6
    assert common.engine_gpu(3) == "6"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert common.engine_gpu(1) == "0"                            # one GPU: shared, by memory fraction
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")                   # as torchrun --nproc-per-node 8 sets it
    with pytest.raises(SystemExit, match="GPU of its own"):
        train.main(tyro.cli(train.Args, args=train_cmd(toy_world, tmp_path / "run")[2:]))
    assert not (tmp_path / "run").exists()                         # refused before anything started


@pytest.mark.slow
@pytest.mark.xdist_group("direct_runs")
def test_every_collective_is_served_on_a_gpu_machine(direct_runs):
    """On a CUDA machine common.init_distributed's process group must serve every collective the step makes: the
    step's bookkeeping (gathered log-probs, metric sums, validation totals, pickled batches) is on the CPU, and NCCL
    alone serves only CUDA tensors ("No backend type associated with device type cpu" at step 1). The group is joined
    as on CUDA (rank_step.join_as_on_cuda) and each collective's device is checked against its backends."""
    from torch.distributed.distributed_c10d import Backend, BackendConfig
    runs, _ = direct_runs
    for world, run_ in runs.items():
        served = BackendConfig(Backend(run_["backend"])).get_device_backend_map()
        assert ("all_reduce", "cpu") in run_["collectives"] and "cuda" in served
        unserved = [(name, dev) for name, dev in run_["collectives"] if dev != "object" and dev not in served]
        assert not unserved, f"{world} rank(s), backend {run_['backend']!r} ({served}): {unserved} not served"


@pytest.mark.slow
@pytest.mark.xdist_group("direct_runs")
def test_update_gradient_is_independent_of_micro_batches_and_ranks(direct_runs):
    """In every loss aggregation the update's gradient is the same for micro-batch 1 and 4, on 1 and 2 ranks, and
    equals the gradient of the aggregated loss worked out per mode from a plain float64 forward. Dr.GRPO's L is the
    constant --rollout.max-tokens (12 here), not a micro-batch's own padded length."""
    runs, ref = direct_runs
    for k, mode in enumerate(MODES):
        want = expected_grads(ref["model"], ref["logp"], agg_coef(mode, ref["adv"], ref["mask"], L=12))
        for world in (1, 2):
            for j, micro in enumerate((1, 4)):
                got = runs[world]["results"][2 * k + j]["grads"]
                assert got.keys() == want.keys()
                errs = {n: ((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want}
                assert max(errs.values()) < 1e-6, (mode, world, micro, max(errs.items(), key=lambda e: e[1]))


@pytest.mark.slow
@pytest.mark.xdist_group("direct_runs")
def test_truncated_importance_weights_scale_the_update_gradient(direct_runs):
    """--advantage.tis token, cap 2, engine log-probs = the trainer's + noise: the update's gradient is that of
    -sum w_t A_t log pi_t / N with w_t = min(pi_old / pi_engine, 2), worked out here from the noise alone."""
    runs, ref = direct_runs
    eng = torch.tensor((ref["logp"] + ref["noise"]).float().tolist(), dtype=torch.float64)   # as the engine sent them
    w = (ref["logp"].detach() - eng).exp().clamp(max=2.0)                                    # (B, T), no gradient
    assert (w * ref["mask"]).max() == 2.0 and (w * ref["mask"]).min() < 0.5      # capped and far from 1
    want = expected_grads(ref["model"], ref["logp"], agg_coef("token-mean", ref["adv"] * w, ref["mask"], L=12))
    for world in (1, 2):
        got = runs[world]["results"][8]["grads"]
        errs = {n: ((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want}
        assert max(errs.values()) < 1e-6, (world, max(errs.items(), key=lambda e: e[1]))


@pytest.mark.slow
@pytest.mark.xdist_group("direct_runs")
def test_rollout_mask_drops_tokens_from_the_update_gradient(direct_runs):
    """--advantage.tis token (cap 1.2) with --advantage.rollout-mask token (IcePop), band [0.5, 1.5], engine log-probs
    = the trainer's + noise, pi_old from the update's own forward (fused): the gradient is that of
    -sum w_t A_t log pi_t / N with w_t = min(rho_t, 1.2) inside the band, 0 outside, and N = every valid token (masked
    ones stay in the normaliser); training/rollout_masked is the fraction outside. Worked out here from the noise
    alone, on 1 and 2 ranks."""
    runs, ref = direct_runs
    eng = torch.tensor((ref["logp"] + ref["noise"]).float().tolist(), dtype=torch.float64)   # as the engine sent them
    rho, valid = (ref["logp"].detach() - eng).exp(), ref["mask"].bool()                      # (B, T), no gradient
    inside = valid & (rho >= 0.5) & (rho <= 1.5)
    w = rho.clamp(max=1.2) * inside
    masked = (valid & ~inside).sum().item() / valid.sum().item()
    assert 0.1 < masked < 0.9 and ((rho > 1.2) & inside).any()              # both the mask and the cap are at work
    want = expected_grads(ref["model"], ref["logp"], agg_coef("token-mean", ref["adv"] * w, ref["mask"], L=12))
    for world in (1, 2):
        got = runs[world]["results"][12]["grads"]
        errs = {n: ((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want}
        assert max(errs.values()) < 1e-6, (world, max(errs.items(), key=lambda e: e[1]))
        assert runs[world]["results"][12]["metrics"]["training/rollout_masked"] == pytest.approx(masked, abs=1e-9)


@pytest.mark.slow
@pytest.mark.xdist_group("direct_runs")
def test_logged_losses_are_means_over_optimizer_steps(direct_runs):
    """Every advantage 0.5 and log pi - log pi_ref = 0.3 on every token (k1): each mini-batch's policy loss is -0.5
    and its KL 0.3, so the logged values are -0.5 and 0.3 with 1 or 2 mini-batches (a sum would give -1.0 and 0.6)."""
    runs, _ = direct_runs
    for world in (1, 2):
        for case in (9, 10):
            m = runs[world]["results"][case]["metrics"]
            assert m["loss/policy_loss"] == pytest.approx(-0.5, abs=1e-6), (world, case)   # pi_old is kept in fp32
            assert m["loss/kl_loss"] == pytest.approx(0.3, abs=1e-6), (world, case)


def test_bf16_trainer_is_an_opt_in_on_cpu(toy_world, tmp_path):
    """--model.mixed-precision bf16 on the CPU (gloo, 1 rank) computes as FSDP2's MixedPrecisionPolicy does on a GPU:
    the decoder layers' outputs are bf16 while the weights and the gradients stay fp32, and pi_old's recompute and the
    update's gradient are off a plain float64 forward by a bf16-sized amount (8 significant bits: ~1e-3), 10^3 times
    fp32's. auto, the default, is fp32 on the CPU, bit for bit."""
    from unittest import mock

    from transformers import AutoModelForImageTextToText, AutoProcessor

    import rank_step
    model_dir = toy_world / "models" / "qwen2_5_vl-tiny"
    processor = AutoProcessor.from_pretrained(model_dir)
    samples = [s for s in data.load_dataset(str(toy_world / "data" / "train.jsonl"))[:4] for _ in range(2)]
    comps = make_comps(processor.tokenizer)
    cases = {m: replace(step_args(model_dir, 4), model=common.ModelConfig(path=str(model_dir), mixed_precision=m))
             for m in ("auto", "fp32", "bf16")}
    with mock.patch.dict(os.environ):              # launch sets the rendezvous variables in this process
        common.launch(rank_step.precision_worker, 1, str(model_dir), samples, comps, cases, str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float64)
    for name, p in model.named_parameters():     # as common.load_model: the vision tower frozen, its merger not
        p.requires_grad_(not (name.startswith("model.visual.") and "merger" not in name))
    logp = reference_logp(model, processor, samples, comps)                                           # (B, T)
    mask = (torch.arange(logp.shape[1])[None, :] < torch.tensor(LENGTHS)[:, None]).double()         # (B, T)
    want = expected_grads(model, logp, agg_coef("token-mean", torch.ones_like(mask), mask, L=12))
    err = {}
    for m, r in got.items():
        grad_err = max(((r["grads"][n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want)
        err[m] = (((r["logp"][:, :logp.shape[1]] - logp) * mask).abs().max().item(), grad_err)
        assert r["weights"] == r["grad_dtypes"] == ["torch.float32"], (m, r["weights"], r["grad_dtypes"])
    assert got["auto"]["compute"] == got["fp32"]["compute"] == ["torch.float32"] and got["bf16"]["compute"] == [
        "torch.bfloat16"], {m: r["compute"] for m, r in got.items()}
    assert torch.equal(got["auto"]["logp"], got["fp32"]["logp"]), "auto on the CPU must be today's fp32"
    assert all(got["auto"]["grads"][n].equal(got["fp32"]["grads"][n]) for n in want)
    assert err["fp32"][0] < 1e-5 and err["fp32"][1] < 1e-5, err
    assert 1e-4 < err["bf16"][0] < 3e-2 and 1e-3 < err["bf16"][1] < 1e-1, err


def test_mismatch_kl_metrics_hand_worked():
    """training/mismatch_k1, _k3: means over the tokens the engine sampled of k1 = log pi_engine - log pi_old and
    k3 = rho - 1 - log rho, rho = pi_old / pi_engine. Row 0: rho 0.5/0.25 = 2, 0.2/0.4 = 0.5, 1 (padding after);
    row 1: rho 1, 1, a forced token (NaN, left out), 1, 0.4/0.2 = 2. 7 sampled tokens: k1 = (-ln 2 + ln 2 - ln 2) / 7
    = -0.0990210; k3 = (2 (1 - ln 2) + (ln 2 - 0.5)) / 7 = (0.6137056 + 0.1931472) / 7 = 0.1152647;
    rollout_mismatch = 3 ln 2 / 7 = 0.2970631."""
    import train
    from rollout import Completion
    ln = math.log
    comps = [Completion("a", [5, 6, 7], [ln(0.25), ln(0.4), ln(0.5)], "stop"),
             Completion("b", [5, 6, 8, 9, 10], [ln(0.5), ln(0.5), float("nan"), ln(0.5), ln(0.2)], "stop")]
    old_lp = torch.tensor([[ln(0.5), ln(0.2), ln(0.5), 0.0, 0.0], [ln(0.5), ln(0.5), ln(0.9), ln(0.5), ln(0.4)]])
    mask, zeros = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), torch.zeros(2, 5)
    m = train.step_metrics(comps, [{"accuracy": 1.0, "format": 0.0}] * 2, torch.ones(2), mask, old_lp, zeros, zeros,
                           dict.fromkeys(train.SUM_KEYS, 0.0), [0, 1], [("start", 0.0), ("update", 1.0)], train.Args())
    assert m["training/mismatch_k1"] == pytest.approx(-0.0990210, abs=1e-6)
    assert m["training/mismatch_k3"] == pytest.approx(0.1152647, abs=1e-6)
    assert m["training/rollout_mismatch"] == pytest.approx(0.2970631, abs=1e-6)


def test_reflection_metrics_leave_out_the_forced_trigger():
    """A rethought response holds the forced trigger ("Wait") in its text; MAYE's reflection ratios count the model's
    own reflection words only, so here (one plain response, one rethought without a word of its own) they are 0."""
    import train
    from rollout import Completion
    comps = [Completion("so it is 7", [5, 6, 7], [-1.0] * 3, "stop"),
             Completion("so it is 7\n\nWait, so it is 7", [5, 6, 8, 9, 10], [-1.0, -1.0, float("nan"), -1.0, -1.0],
                        "stop", trigger_span=(2, 3), own_text="so it is 7 so it is 7")]
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    zeros, sums = torch.zeros(2, 5), dict.fromkeys(train.SUM_KEYS, 0.0)
    m = train.step_metrics(comps, [{"accuracy": 1.0, "format": 0.0}] * 2, torch.ones(2), mask, zeros, zeros, zeros,
                           sums, [0, 1], [("start", 0.0), ("update", 1.0)], train.Args())
    assert m["reflection/reflection_ratio"] == 0.0 and m["reflection/words/wait"] == 0, m

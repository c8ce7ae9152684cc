"""train.py end to end on the tiny toy model: ranks + engine process, sync, 1 vs 2 ranks, kill-and-resume, faults.

Each run is a real `python train.py` subprocess (its own process group, so a test can SIGKILL all of it).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("time/", "perf/")


def train_cmd(world: Path, out: Path, *extra: str) -> list[str]:
    data = world / "data"
    return [sys.executable, str(ROOT / "train.py"), "--model.path", str(world / "models" / "qwen2_5_vl-tiny"),
            "--data.train", str(data / "train.jsonl"), "--data.validation", str(data / "validation.jsonl"),
            "--out-dir", str(out), "--prompts-per-step", "4", "--rollout.n", "2", "--rollout.max-tokens", "12",
            "--mini-batch-size", "4", "--micro-batch-size", "2", "--optim.lr", "1e-3", "--optim.warmup-ratio", "0",
            "--val-limit", "4", "--reward.num-workers", "1", "--reward.no-truncation-penalty",
            "--reward.fn", str(ROOT / "tests" / "fixtures" / "length_reward.py") + ":digit_count", *extra]


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


@pytest.fixture(scope="module")
def two_rank_run(toy_world, tmp_path_factory):
    """The reference run: 2 ranks + vLLM, 3 steps, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("rl2")
    p = run(train_cmd(toy_world, out, "--nproc", "2", "--max-steps", "3", "--save-every", "1",
                      "--keep-checkpoints", "0"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return out, p


def test_two_ranks_with_vllm_complete_and_sync(two_rank_run):
    out, p = two_rank_run
    ms = metrics(out)
    assert [m["step"] for m in ms] == [1, 2, 3]
    assert "step     3/3" in p.stdout and "val/accuracy" in ms[-1]
    # quiet: none of the known-harmless engine warnings (3 weight syncs happened), nor FSDP2's view-output warning
    log = p.stdout + p.stderr
    assert not [m for ms_ in common.HARMLESS_VLLM_WARNINGS.values() for m in ms_ if m in log], log[-3000:]
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
    assert torch.equal(model.state_dict()["lm_head.weight"], load_file(ckpts[-1] / "model.safetensors")["lm_head.weight"])


def test_kill_and_resume_equals_uninterrupted(two_rank_run, toy_world, tmp_path):
    out2, _ = two_rank_run
    cmd = train_cmd(toy_world, tmp_path, "--nproc", "2", "--max-steps", "3", "--save-every", "1",
                    "--keep-checkpoints", "0")
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
    for r, u in zip(resumed, reference):
        r, u = no_timing(r), no_timing(u)
        assert r.keys() == u.keys()
        for k in r:
            assert r[k] == pytest.approx(u[k], abs=1e-6), (r["step"], k)


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


def test_one_rank_matches_two_ranks_then_engine_death_stops_everything(two_rank_run, toy_world, tmp_path):
    """A 1-rank run takes the same first step as the 2-rank run; then its engine is killed: the run must stop
    within 60 s with a clear message and a non-zero exit code, leaving no process behind."""
    out2, _ = two_rank_run
    cmd = train_cmd(toy_world, tmp_path, "--nproc", "1", "--max-steps", "1000", "--save-every", "1",
                    "--keep-checkpoints", "0", "--val-every", "-1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not (tmp_path / "checkpoints" / "step_000001" / "vlrl_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.kill(int((tmp_path / "engine.pid").read_text()), signal.SIGKILL)
    t0 = time.time()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert time.time() - t0 < 60
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


def test_nan_loss_stops_before_checkpoint(toy_world, tmp_path):
    p = run_patched(NAN_AT_STEP_2, train_cmd(toy_world, tmp_path, "--max-steps", "3", "--save-every", "1",
                                             "--rollout.engine", "hf", "--val-every", "-1"))
    assert p.returncode != 0 and "non-finite gradient norm" in p.stderr
    assert [c.name for c in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]   # step 2 never saved
    assert [m["step"] for m in metrics(tmp_path)] == [1]


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


def test_forced_rethinking_in_an_rl_batch(toy_world, tmp_path):
    """--rollout.rethink-fraction 1 in train.py: responses that stopped are continued after a trigger, kept when the
    judge accepts the new text (here: any digit), scored and trained on; the engine's log-probs of the sampled tokens
    still equal the trainer's (the forced trigger tokens are left out of that check)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import common
    from test_rollout import stop_prone_copy
    src = toy_world / "models" / "qwen2_5_vl-tiny"
    model, processor = AutoModelForImageTextToText.from_pretrained(src).eval(), AutoProcessor.from_pretrained(src)
    stop_prone = tmp_path / "stop_prone"
    stop_prone_copy(model, processor, common.load_dataset(str(toy_world / "data" / "validation.jsonl"))).save_pretrained(stop_prone)
    processor.save_pretrained(stop_prone)
    cmd = train_cmd(toy_world, tmp_path / "run", "--nproc", "1", "--max-steps", "2", "--rollout.engine", "hf",
                    "--val-every", "-1", "--rollout.rethink-fraction", "1", "--rollout.rethink-min-new-tokens", "1",
                    "--rollout.rethink-max-new-tokens", "12", "--rollout.max-tokens", "32", "--prompts-per-step", "8",
                    "--mini-batch-size", "16", "--rollout.temperature", "1.0", "--tis", "sequence")
    cmd[cmd.index("--model.path") + 1] = str(stop_prone)
    p = run(cmd)
    assert p.returncode == 0, p.stderr[-3000:]
    ms = metrics(tmp_path / "run")
    assert sum(m["rethink/tried"] for m in ms) > 0 and sum(m["rethink/kept"] for m in ms) > 0, ms
    assert all(m["rethink/kept"] <= m["rethink/tried"] for m in ms)
    assert all(m["training/rollout_mismatch"] < 1e-4 and m["training/grad_norm"] > 0 for m in ms)
    # --tis sequence (forced tokens count as ratio 1): in fp32 engine and trainer agree, so every weight is ~1
    assert all(abs(m["training/tis_weight"] - 1) < 1e-3 and m["training/tis_capped"] == 0 for m in ms), ms


def test_rollout_correction_hand_worked():
    """Truncated importance weights: pi_old / pi_engine = 0.5 / 0.25 = 2 and 0.2 / 0.4 = 0.5; a token the engine did
    not sample (NaN) counts as 1; padding is ignored."""
    import train
    old = torch.log(torch.tensor([[0.5, 0.2, 0.3, 0.9], [0.5, 0.4, 0.3, 0.9]]))
    eng = torch.log(torch.tensor([[0.25, 0.4, float("nan"), 0.1], [0.25, 0.4, 0.3, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])      # the 4th token is padding
    w = lambda kind, cap=1.5: train.rollout_correction(old, eng, mask, train.Args(tis=kind, tis_cap=cap))
    assert torch.allclose(w("token"), torch.tensor([[1.5, 0.5, 1.0, 1.0], [1.5, 1.0, 1.0, 1.0]]))  # 2 capped at 1.5
    # sequence: row 0: 2 * 0.5 * 1 = 1; row 1: 2 * 1 * 1 = 2 -> capped at 1.5 (padding: 1, and masked in the loss)
    assert torch.allclose(w("sequence"), torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.5, 1.5, 1.5, 1.0]]))
    assert torch.allclose(w("sequence", cap=4.0)[1, :3], torch.tensor([2.0, 2.0, 2.0]))
    assert torch.equal(w("off"), torch.ones(2, 4))


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

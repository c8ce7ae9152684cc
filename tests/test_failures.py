"""What careless users, OOM killers and schedulers do: every failure is named early, nothing is lost or left behind.

- kill -9 of the launcher: the ranks, the engine and the reward workers die with it (PR_SET_PDEATHSIG).
- a reused out-dir is refused (its files untouched) unless --resume or --restart (which moves it aside).
- bad rows (over-long prompts, non-UTF-8 bytes, decompression bombs) are named by file:line before anything starts;
  oversized images are downscaled at load to what the model sees.
- bad flags and model folders fail before start-up, naming the flag.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parents[1]


def train_args(world: Path, out: Path, data: Path | None = None) -> list[str]:
    d = world / "data"
    return [sys.executable, str(ROOT / "train.py"), "--model.path", str(world / "models" / "qwen2_5_vl-tiny"),
            "--data.train", str(data or d / "train.jsonl"), "--data.validation", str(d / "validation.jsonl"),
            "--out-dir", str(out), "--prompts-per-step", "4", "--rollout.n", "2", "--rollout.max-tokens", "8",
            "--mini-batch-size", "8", "--micro-batch-size", "4", "--val-limit", "2", "--rollout.engine", "hf"]


def run(cmd, timeout=120):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def session_processes(sid: int) -> str:
    return subprocess.run(["ps", "-o", "pid,args", "--no-headers", "-s", str(sid)], capture_output=True,
                          text=True).stdout.strip()


def test_kill_9_of_the_launcher_leaves_no_process(toy_world, tmp_path):
    cmd = train_args(toy_world, tmp_path / "run") + ["--nproc", "2", "--max-steps", "1000", "--val-every", "-1",
                                                     "--reward.num-workers", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first step"
            time.sleep(0.2)
        assert len(session_processes(proc.pid).splitlines()) >= 4      # launcher, 2 ranks, engine (+ judges)
        os.kill(proc.pid, signal.SIGKILL)                               # the launcher only
        proc.wait()
        for _ in range(600):
            if not (left := session_processes(proc.pid)):
                break
            time.sleep(0.1)
        assert not left, left
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if session_processes(proc.pid) else None


def test_a_used_out_dir_is_refused_then_moved_aside(toy_world, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000001").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    p = run(train_args(toy_world, out) + ["--max-steps", "1"])
    assert p.returncode != 0 and "already holds a run" in p.stderr and "--resume" in p.stderr, p.stderr[-2000:]
    assert {q: q.read_bytes() for q in out.rglob("*") if q.is_file()} == before      # untouched
    common.prepare_out_dir(str(out), resume=False, restart=True)
    aside = [q for q in tmp_path.iterdir() if q.name.startswith("run.old-")]
    assert not any(out.iterdir()) and len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == '{"step": 1}\n'
    common.prepare_out_dir(str(aside[0]), resume=True, restart=False)                 # --resume: no objection


def test_resume_keeps_every_line_up_to_its_checkpoint_and_moves_later_ones_aside(tmp_path):
    """Killed after checkpoint 2 was written but before its line was logged, with a stray line 3 from an older
    attempt: the resumed log is lines 1 and 2 (2 from the checkpoint), and line 3 is kept aside."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n{"step": 3, "a": 3}\n')
    common.MetricsLogger(str(tmp_path), {}, {"step": 2, "metrics": {"step": 2, "a": 2}})
    rows = lambda name: [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]
    assert rows("metrics.jsonl") == [{"step": 1, "a": 1}, {"step": 2, "a": 2}]
    assert rows("metrics.discarded.jsonl") == [{"step": 3, "a": 3}]
    common.MetricsLogger(str(tmp_path), {}, {"step": 2, "metrics": {"step": 2, "a": -1}})   # logged: kept as it is
    assert rows("metrics.jsonl") == [{"step": 1, "a": 1}, {"step": 2, "a": 2}]
    common.MetricsLogger(str(tmp_path), {}, None)                                            # a new run
    assert rows("metrics.jsonl") == []


def test_an_over_long_prompt_fails_fast_naming_its_row(toy_world, tmp_path):
    rows = [json.loads(x) for x in (toy_world / "data" / "train.jsonl").read_text().splitlines()[:8]]
    rows[5]["question"] = "<image>" + "How many? " * 300
    rows = [{**r, "image": str(toy_world / "data" / r["image"])} for r in rows]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t0 = time.time()
    p = run(train_args(toy_world, tmp_path / "run", data) + ["--rollout.max-model-len", "512"])
    assert p.returncode != 0 and f"{data}:6: the prompt is" in p.stderr and "max_model_len 512" in p.stderr, \
        p.stderr[-2000:]
    assert time.time() - t0 < 30 and not (tmp_path / "run" / "engine.pid").exists()   # no rank, no engine
    kept = common.load_dataset(str(data), common.DataConfig(skip_invalid=True), verbose=False,
                               check=common.fits_model(str(toy_world / "models" / "qwen2_5_vl-tiny"), common.DataConfig(), 8, 512))
    assert [s.source.rsplit(":", 1)[1] for s in kept] == ["1", "2", "3", "4", "5", "7", "8"]


def _processor(world, arch="qwen2_5_vl"):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(world / "models" / f"{arch}-tiny")


def test_non_utf8_and_bomb_rows_are_named_and_skippable(toy_world, tmp_path):
    from PIL import Image
    Image.new("1", (15000, 15000)).save(tmp_path / "bomb.png")          # 225M pixels: PIL refuses to decode it
    good = {"question": "<image>What is 3?", "answer": "3", "image": str(toy_world / "data" / "images" /
                                                                         "train_00000.png")}
    lines = [json.dumps(good).encode(), b'{"question": "<image>caf\xe9", "answer": "3", "image": "x.png"}',
             json.dumps({**good, "image": "bomb.png"}).encode(), json.dumps(good).encode()]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(common.DataError, match=r"d\.jsonl:2: not valid UTF-8"):
        common.load_dataset(str(path))
    samples, skipped = common.read_dataset(str(path), common.DataConfig(skip_invalid=True))
    assert [s.source.rsplit(":", 1)[1] for s in samples] == ["1", "4"]
    assert "d.jsonl:3: field 'image': cannot decode image (DecompressionBombError" in skipped[1], skipped


def test_images_are_downscaled_at_load_to_what_the_model_sees(toy_world, tmp_path):
    from PIL import Image
    Image.new("RGB", (700, 500), "white").save(tmp_path / "big.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "<image>What is 3?", "answer": "3", "image": "big.png"}) + "\n")
    cfg = common.DataConfig(max_pixels=112 * 112)
    [s] = common.load_dataset(str(path), cfg, check=common.fits_model(str(toy_world / "models" / "qwen2_5_vl-tiny"), cfg))
    # smart_resize(500, 700): beta = sqrt(350000 / 12544) = 5.28; floor(500 / beta / 28) * 28 = 84, 700 -> 112
    assert s.images[0].size == (112, 84)
    processor = _processor(toy_world)
    original = processor(text=["<|image_pad|>"], images=[Image.open(tmp_path / "big.png")], max_pixels=112 * 112)
    batch = common.collate(processor, [s], [[5]], cfg)
    assert batch["image_grid_thw"].tolist() == original["image_grid_thw"].tolist() == [[1, 6, 8]]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_prompt_length_check_counts_what_the_processor_counts(toy_world, tmp_path, arch):
    """fits_model counts tokens without transformers (tokenizers + jinja2 + our smart_resize copy); the independent
    count is the real processor's input_ids, image tokens expanded, at the same pixel limits."""
    import re
    from PIL import Image
    Image.new("RGB", (700, 500), "white").save(tmp_path / "big.png")
    Image.new("RGB", (30, 90), "black").save(tmp_path / "thin.png")
    rows = (toy_world / "data" / "train.jsonl").read_text().splitlines()[:6]
    rows = [{**json.loads(r), "image": str(toy_world / "data" / json.loads(r)["image"])} for r in rows] + [
        {"messages": [{"role": "system", "content": "Be brief, {{ not jinja }}."},
                      {"role": "user", "content": "<image> left, <image> right: which is 3?"}],
         "images": ["big.png", "thin.png"], "answer": "3"}]
    (path := tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = str(toy_world / "models" / f"{arch}-tiny")
    processor = _processor(toy_world, arch)
    for cfg in (common.DataConfig(), common.DataConfig(min_pixels=56 * 56, max_pixels=112 * 112)):
        check, ours, theirs = common.fits_model(model, cfg, 0, 0), [], []   # max_model_len 0: every row "too long"
        for s in common.load_dataset(str(path), cfg, verbose=False):
            theirs.append(len(processor(text=[common.prompt_text(processor, s)], images=s.images or None,
                                        **common.mm_kwargs(cfg))["input_ids"][0]))
            with pytest.raises(common.DataError) as e:
                check(s)
            ours.append(int(re.search(r"the prompt is (\d+) tokens", str(e.value)).group(1)))
        assert ours == theirs and len(set(theirs)) > 1, (ours, theirs)


@pytest.mark.parametrize("flags,words", [
    (["--rollout.n", "0"], "--rollout.n"),
    (["--mini-batch-size", "3"], "--mini-batch-size 3 must divide the 8 responses"),
    (["--model.path", "/no/such/model"], "--model.path /no/such/model: no such folder"),
    (["--model.lora-rank", "-1"], "--model.lora-rank -1 must be >= 0"),
])
def test_bad_flags_fail_before_start_up_naming_the_flag(toy_world, tmp_path, flags, words):
    p = run(train_args(toy_world, tmp_path / "run") + flags)
    assert p.returncode != 0 and words in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run" / "engine.pid").exists()


@pytest.mark.parametrize("changes,world,words", [
    ({"prompts_per_step": 100}, 1, "--prompts-per-step 100 > the 64 training rows"),
    ({"advantage": "grpo", "n": 1, "mini_batch_size": 4}, 1, "--rollout.n >= 2"),
    ({"mini_batch_size": 8}, 3, "--mini-batch-size 8 must be a positive multiple of the 3 ranks"),
    ({"resume": True, "restart": True}, 1, "--restart"),
    ({"ppo_epochs": 0}, 1, "--ppo-epochs"),
    ({"tis": "token", "tis_cap": 0.5}, 1, "--tis-cap 0.5 must be >= 1"),
])
def test_check_args(changes, world, words):
    import dataclasses

    import train
    base = train.Args(prompts_per_step=4, mini_batch_size=8, rollout=train.RolloutConfig(n=2))
    train.check_args(base, 1, train_size=64)                             # the flags before the change are fine
    changes = dict(changes)
    bad = dataclasses.replace(base, rollout=train.RolloutConfig(n=changes.pop("n", 2)))
    if "advantage" in changes:
        bad = dataclasses.replace(bad, advantage=train.AdvantageConfig(estimator=changes.pop("advantage")))
    with pytest.raises(SystemExit, match=words):
        train.check_args(dataclasses.replace(bad, **changes), world, train_size=64)


def test_a_text_only_model_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(SystemExit, match="'qwen2' model has no vision tower"):
        common.check_model_dir(str(tmp_path))

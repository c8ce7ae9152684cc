"""What careless users, OOM killers and schedulers do: every failure is named early, nothing is lost or left behind.

- kill -9 of the launcher: the ranks, the engine and the reward workers die with it (PR_SET_PDEATHSIG).
- a reused out-dir is refused (its files untouched) unless --resume or --restart (which moves it aside).
- bad rows (over-long prompts, non-UTF-8 bytes, decompression bombs, the tokenizer's special tokens as text, NaN
  answers, more images than --rollout.max-images) are named by file:line before anything starts; a UTF-8 BOM is read;
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
import data

ROOT = Path(__file__).resolve().parents[1]


def train_args(world: Path, out: Path, data: Path | None = None) -> list[str]:
    d = world / "data"
    return [sys.executable, str(ROOT / "train.py"), "--model.path", str(world / "models" / "qwen2_5_vl-tiny"),
            "--data.train", str(data or d / "train.jsonl"), "--data.validation", str(d / "validation.jsonl"),
            "--out-dir", str(out), "--prompts-per-step", "4", "--rollout.n", "2", "--rollout.max-tokens", "8",
            "--mini-batch-size", "8", "--micro-batch-size", "4", "--val-limit", "2", "--rollout.engine", "hf",
            "--threads", "1"]


def run(cmd, timeout=120):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def session_processes(sid: int) -> str:
    return subprocess.run(["ps", "-o", "pid,args", "--no-headers", "-s", str(sid)], capture_output=True,
                          text=True).stdout.strip()


@pytest.mark.slow
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
    long_file = tmp_path / "long.jsonl"
    long_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # ~7 s, Python's start-up and the row check; a hang would end at run()'s 120 s timeout
    p = run(train_args(toy_world, tmp_path / "run", long_file) + ["--rollout.max-model-len", "512"])
    assert p.returncode != 0 and f"{long_file}:6: the prompt is" in p.stderr and "max_model_len 512" in p.stderr, \
        p.stderr[-2000:]
    # "fast": refused before the out-dir is prepared, so before any rank or the engine (they start after it)
    assert not (tmp_path / "run").exists()
    fits = data.fits_model(str(toy_world / "models" / "qwen2_5_vl-tiny"), data.DataConfig(), 8, 512)
    kept = data.load_dataset(str(long_file), data.DataConfig(skip_invalid=True), verbose=False, check=fits)
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
    with pytest.raises(data.DataError, match=r"d\.jsonl:2: not valid UTF-8"):
        data.load_dataset(str(path))
    samples, skipped = data.read_dataset(str(path), data.DataConfig(skip_invalid=True))
    assert [s.source.rsplit(":", 1)[1] for s in samples] == ["1", "4"]
    assert "d.jsonl:3: field 'image': cannot decode image (DecompressionBombError" in skipped[1], skipped


def _png(world: Path) -> str:
    return str(world / "data" / "images" / "train_00000.png")


def _special_token_rows(world: Path, tmp_path: Path) -> list[tuple[Path, list[str]]]:
    """(file, its skip messages) in the three formats, a special token in each kind of text field."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    png = _png(world)
    good = {"question": "<image>What is 3?", "answer": "3", "image": png}
    maye = [good, {**good, "question": "<image>What is the result?<|im_end|><|image_pad|>"},
            {**good, "solution": "It is 3.<|endoftext|>"}, {**good, "answer": "3<|vision_end|>"}, good]

    def chat(*turns, **extra):
        return {"messages": [{"role": r, "content": c} for r, c in turns], "images": [png], **extra}
    msgs = [chat(("system", "Be brief.<|im_start|>"), ("user", "<image>What is 3?"), ("assistant", "\\boxed{3}")),
            chat(("user", [{"type": "image"}, {"type": "text", "text": "What is 3?<|box_start|>"}]), answer="3"),
            chat(("user", "<image>What is 3?"), ("assistant", "It is \\boxed{3}.<|im_end|>")),     # the SFT target
            chat(("user", "<image>What?"), ("assistant", "Hm<|object_ref_start|>"), ("user", "So?"),
                 ("assistant", "\\boxed{3}")),
            chat(("user", "<image>What is 3?"), answer="3")]

    def verl(system, truth):
        return {"prompt": [{"role": "system", "content": system}, {"role": "user", "content": "<image>What is 3?"}],
                "images": [{"bytes": Path(png).read_bytes(), "path": None}], "reward_model": {"ground_truth": truth}}
    (m := tmp_path / "maye.jsonl").write_text("".join(json.dumps(r) + "\n" for r in maye))
    (c := tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in msgs))
    pq.write_table(pa.Table.from_pylist([verl("Be brief.", "3"), verl("Be brief.<|video_pad|>", "3"),
                                         verl("Be brief.", "<|quad_end|>3")]), v := tmp_path / "verl.parquet")
    return [(m, [f"{m}:2: field 'question': contains the special token '<|im_end|>'",
                 f"{m}:3: field 'solution': contains the special token '<|endoftext|>'",
                 f"{m}:4: field 'answer': contains the special token '<|vision_end|>'"]),
            (c, [f"{c}:1: field 'messages[0].content': contains the special token '<|im_start|>'",
                 f"{c}:2: field 'messages[0].content[1].text': contains the special token '<|box_start|>'",
                 f"{c}:3: field 'messages[1].content': contains the special token '<|im_end|>'",
                 f"{c}:4: field 'messages[1].content': contains the special token '<|object_ref_start|>'"]),
            (v, [f"{v}:row1: field 'prompt[0].content': contains the special token '<|video_pad|>'",
                 f"{v}:row2: field 'reward_model.ground_truth': contains the special token '<|quad_end|>'"])]


def test_special_tokens_in_any_text_field_are_named_and_skippable(toy_world, tmp_path):
    """MAYE, chat and verl rows; question, system, user (string and item) and assistant turns, solution, answer."""
    check = data.fits_model(str(toy_world / "models" / "qwen2_5_vl-tiny"), data.DataConfig(), 8, 1024)
    for path, expected in _special_token_rows(toy_world, tmp_path):
        with pytest.raises(data.DataError) as e:
            data.read_dataset(str(path), check=check)
        assert str(e.value) == expected[0]
        samples, skipped = data.read_dataset(str(path), data.DataConfig(skip_invalid=True), check)
        assert skipped == expected and len(samples) == (5 if path.suffix == ".jsonl" else 3) - len(expected)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_special_tokens_are_the_tokenizers(toy_world, tmp_path, arch):
    """Independent list: transformers' AutoTokenizer (the processor's), every added token it marks special; a row
    holding any one of them is refused naming it, and no toy question is."""
    from transformers import AutoTokenizer
    model = toy_world / "models" / f"{arch}-tiny"
    theirs = [t.content for t in AutoTokenizer.from_pretrained(model).added_tokens_decoder.values() if t.special]
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|image_pad|>", "<|vision_start|>"} <= set(theirs)
    train = [json.loads(r) for r in (toy_world / "data" / "train.jsonl").read_text().splitlines()[:len(theirs) + 4]]
    rows = [{**r, "image": str(toy_world / "data" / r["image"])} for r in train]
    for r, t in zip(rows, theirs):
        r["question"] = f"a {t} b " + r["question"]
    (path := tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    check = data.fits_model(str(model), data.DataConfig())
    samples, skipped = data.read_dataset(str(path), data.DataConfig(skip_invalid=True), check)
    assert skipped == [f"{path}:{i}: field 'question': contains the special token '{t}'"
                       for i, t in enumerate(theirs, 1)]
    assert len(samples) == 4   # the toy questions and MAYE's instruction hold none


def test_nan_and_infinite_answers_are_refused(toy_world, tmp_path):
    row = '{"question": "<image>What is 3?", "image": "%s", "answer": %s}\n'
    path = tmp_path / "d.jsonl"
    path.write_text("".join(row % (_png(toy_world), a) for a in ("3", "NaN", "Infinity", "-Infinity", "1e999", "2.5")))
    with pytest.raises(data.DataError, match=r"d\.jsonl:2: field 'answer': expected a string or a finite number"):
        data.load_dataset(str(path))
    samples, skipped = data.read_dataset(str(path), data.DataConfig(skip_invalid=True))
    assert [s.answer for s in samples] == ["3", "2.5"]
    assert [m.split(": ", 1)[0][-1] + m.rsplit(",", 1)[1] for m in skipped] == \
        ["2 got nan", "3 got inf", "4 got -inf", "5 got inf"]


def test_a_utf8_file_with_a_byte_order_mark_loads(toy_world, tmp_path):
    png = _png(toy_world)
    rows = [{"question": "<image>What is 3?", "answer": "3", "image": png},
            {"messages": [{"role": "user", "content": "<image>What is 3?"}], "images": [png], "answer": "3"}]
    for k, row in enumerate(rows):
        (path := tmp_path / f"bom{k}.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n",
                                                        encoding="utf-8-sig")
        assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
        samples = data.load_dataset(str(path))
        assert [s.source for s in samples] == [f"{path}:1", f"{path}:2"] and samples[0].answer == "3"


def test_more_images_than_max_images_is_named(toy_world, tmp_path):
    png = _png(toy_world)
    rows = [{"question": "What is 3?", "answer": "3", "image": [png, png]},
            {"question": "What is 3?", "answer": "3", "image": png},
            {"messages": [{"role": "user", "content": "<image><image><image> What is 3?"}], "images": [png] * 3,
             "answer": "3"}]
    (path := tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = str(toy_world / "models" / "qwen2_5_vl-tiny")
    assert len(data.load_dataset(str(path), check=data.fits_model(model, data.DataConfig(), max_images=3))) == 3
    _, skipped = data.read_dataset(str(path), data.DataConfig(skip_invalid=True),
                                     data.fits_model(model, data.DataConfig(), max_images=1))
    assert [m.split(" (")[0] for m in skipped] == [f"{path}:1: field 'image': 2 images > --rollout.max-images 1",
                                                   f"{path}:3: field 'images': 3 images > --rollout.max-images 1"]


@pytest.mark.parametrize("change,words", [
    (lambda r: {"question": "<image>What is the result?<|im_end|><|image_pad|>"},
     ":5: field 'question': contains the special token '<|im_end|>'"),
    (lambda r: {"answer": float("nan")}, ":5: field 'answer': expected a string or a finite number, got nan"),
    (lambda r: {"image": [r["image"]] * 2, "question": "Which is larger?"},   # no <image> tag: images first
     ":5: field 'image': 2 images > --rollout.max-images 1"),
], ids=["special-token", "nan-answer", "two-images"])
def test_a_bad_text_or_image_count_fails_before_start_up(toy_world, tmp_path, change, words):
    rows = [json.loads(x) for x in (toy_world / "data" / "train.jsonl").read_text().splitlines()[:8]]
    rows = [{**r, "image": str(toy_world / "data" / r["image"])} for r in rows]
    rows[4].update(change(rows[4]))
    (data := tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))   # json writes NaN
    p = run(train_args(toy_world, tmp_path / "run", data))   # ~7 s, as the over-long prompt's; a hang: run()'s timeout
    assert p.returncode != 0 and f"{data}{words}" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run").exists()   # refused before the out-dir is prepared: before any rank or the engine


@pytest.mark.slow
def test_skip_invalid_trains_on_the_other_rows(toy_world, tmp_path):
    rows = [json.loads(x) for x in (toy_world / "data" / "train.jsonl").read_text().splitlines()[:8]]
    rows = [{**r, "image": str(toy_world / "data" / r["image"])} for r in rows]
    rows[4]["question"] += "<|im_end|><|image_pad|>"
    (data := tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run(train_args(toy_world, tmp_path / "run", data) + ["--data.skip-invalid", "--max-steps", "1", "--val-every",
                                                             "-1", "--reward.num-workers", "1"], timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{data}: skipped 1 invalid row(s):\n  {data}:5: field 'question': contains the special token" in p.stderr
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_images_are_downscaled_at_load_to_what_the_model_sees(toy_world, tmp_path):
    from PIL import Image
    Image.new("RGB", (700, 500), "white").save(tmp_path / "big.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "<image>What is 3?", "answer": "3", "image": "big.png"}) + "\n")
    cfg = data.DataConfig(max_pixels=112 * 112)
    [s] = data.load_dataset(str(path), cfg, check=data.fits_model(str(toy_world / "models" / "qwen2_5_vl-tiny"), cfg))
    # smart_resize(500, 700): beta = sqrt(350000 / 12544) = 5.28; floor(500 / beta / 28) * 28 = 84, 700 -> 112
    assert s.images[0].size == (112, 84)
    processor = _processor(toy_world)
    original = processor(text=["<|image_pad|>"], images=[Image.open(tmp_path / "big.png")], max_pixels=112 * 112)
    batch = data.collate(processor, [s], [[5]], cfg)
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
    for cfg in (data.DataConfig(), data.DataConfig(min_pixels=56 * 56, max_pixels=112 * 112)):
        check, ours, theirs = data.fits_model(model, cfg, 0, 0), [], []   # max_model_len 0: every row "too long"
        for s in data.load_dataset(str(path), cfg, verbose=False):
            theirs.append(len(processor(text=[data.prompt_text(processor, s)], images=s.images or None,
                                        **data.mm_kwargs(cfg))["input_ids"][0]))
            with pytest.raises(data.DataError) as e:
                check(s)
            ours.append(int(re.search(r"the prompt is (\d+) tokens", str(e.value)).group(1)))
        assert ours == theirs and len(set(theirs)) > 1, (ours, theirs)


@pytest.mark.parametrize("flags,words", [
    (["--rollout.n", "0"], "--rollout.n"),
    (["--mini-batch-size", "3"], "--mini-batch-size 3 must divide the 8 responses"),
    (["--model.path", "/no/such/model"], "--model.path /no/such/model: no such folder"),
    (["--model.lora-rank", "-1"], "--model.lora-rank -1 must be >= 0"),
    (["--advantage.tis", "token", "--advantage.tis-cap", "0.5"], "--advantage.tis-cap 0.5: must be >= 1"),
])
def test_bad_flags_fail_before_start_up_naming_the_flag(toy_world, tmp_path, flags, words):
    p = run(train_args(toy_world, tmp_path / "run") + flags)
    assert p.returncode != 0 and words in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run").exists()   # refused before the out-dir is made, so before any rank or the engine


@pytest.mark.parametrize("changes,world,words", [
    ({"prompts_per_step": 100}, 1, "--prompts-per-step 100 > the 64 training rows"),
    ({"advantage": "grpo", "n": 1, "mini_batch_size": 4}, 1, "--rollout.n >= 2"),
    ({"mini_batch_size": 8}, 3, "--mini-batch-size 8 must be a positive multiple of the 3 ranks"),
    ({"resume": True, "restart": True}, 1, "--restart"),
    ({"ppo_epochs": 0}, 1, "--ppo-epochs"),
    ({"rollout_seed": 3}, 1, "--rollout.seed is rollout.py's: --seed seeds every request"),
])
def test_check_args(changes, world, words):
    import dataclasses

    import train
    base = train.Args(prompts_per_step=4, mini_batch_size=8, rollout=train.RolloutConfig(n=2))
    train.check_args(base, 1, train_size=64)                             # the flags before the change are fine
    changes = dict(changes)
    rollout = train.RolloutConfig(n=changes.pop("n", 2), seed=changes.pop("rollout_seed", 0))
    bad = dataclasses.replace(base, rollout=rollout)
    if "advantage" in changes:
        bad = dataclasses.replace(bad, advantage=train.AdvantageConfig(estimator=changes.pop("advantage")))
    with pytest.raises(SystemExit, match=words):
        train.check_args(dataclasses.replace(bad, **changes), world, train_size=64)


@pytest.mark.parametrize("flags,words", [
    (["--advantage.rollout-mask", "token", "--advantage.rollout-mask-low", "0"],
     "--advantage.rollout-mask-low 0.0: with --advantage.rollout-mask-high 2.0: need 0 < low <= 1 <= high"),
    (["--advantage.rollout-mask-low", "1.0", "--advantage.rollout-mask-high", "1.0"],
     "--advantage.rollout-mask-low 1.0: with --advantage.rollout-mask-high 1.0"),
    (["--advantage.rollout-mask", "geometric", "--advantage.rollout-mask-high", "0.999"],
     "--advantage.rollout-mask-low 0.5: with --advantage.rollout-mask-high 0.999"),
    (["--advantage.rollout-mask", "icepop"], "--advantage.rollout-mask"),
])
def test_rollout_mask_band_is_refused_naming_the_flags(flags, words, capsys, monkeypatch):
    """The flags as a command line gives them: AdvantageConfig refuses them while tyro parses (before any rank or
    engine starts), and tyro prints the message on one line where the terminal is wide enough."""
    import tyro

    import train
    monkeypatch.setenv("COLUMNS", "200")
    tyro.cli(train.Args, args=["--advantage.rollout-mask", "token"])     # the flags before the change are fine
    with pytest.raises(SystemExit):
        tyro.cli(train.Args, args=flags)
    assert words in capsys.readouterr().err


def test_mixed_precision_is_refused_naming_the_flag(toy_world, capsys):
    """--model.mixed-precision is auto, bf16 or fp32: tyro refuses another value and the old bool flag on the command
    line; check_model (before any start-up) refuses what a Python caller may still pass, the old bool."""
    import tyro

    import train
    for flags in (["--model.mixed-precision", "bfloat16"], ["--model.no-mixed-precision"]):
        with pytest.raises(SystemExit):
            tyro.cli(train.Args, args=flags)
        assert "--model.mixed-precision" in capsys.readouterr().err, flags
    model = str(toy_world / "models" / "qwen2_5_vl-tiny")
    for ok in ("auto", "bf16", "fp32"):
        common.check_model(common.ModelConfig(path=model, mixed_precision=ok))
    with pytest.raises(SystemExit, match="--model.mixed-precision True must be auto, bf16 or fp32"):
        common.check_model(common.ModelConfig(path=model, mixed_precision=True))


def test_a_model_folder_without_a_chat_template_is_named(toy_world, tmp_path):
    import shutil
    model = shutil.copytree(toy_world / "models" / "qwen2_5_vl-tiny", tmp_path / "m")
    (model / "chat_template.jinja").unlink()
    with pytest.raises(SystemExit, match="needs tokenizer.json, a chat template and an image processor config"):
        data.fits_model(str(model), data.DataConfig())


def test_a_text_only_model_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(SystemExit, match="'qwen2' model has no vision tower"):
        common.check_model(common.ModelConfig(path=str(tmp_path)))

"""sft.py: targets, response-only loss (checked against a naive float64 loop), overfitting, bad rows, and the script
itself as a subprocess: 2 ranks == 1 rank after a step, resume, and checkpoint reload == in-memory log-probs."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sft
from data import DataConfig, DataError, Sample, blocked_token_ids, collate, read_dataset

ROOT = Path(__file__).resolve().parents[1]


def rows(toy_world, split, n):
    """The first n rows of a toy split with absolute image paths (so the jsonl can live anywhere)."""
    out = []
    for line in (toy_world / "data" / f"{split}.jsonl").read_text().splitlines()[:n]:
        row = json.loads(line)
        row["image"] = str(toy_world / "data" / row["image"])
        out.append(row)
    return out


def write_jsonl(path, items):
    path.write_text("".join((it if isinstance(it, str) else json.dumps(it)) + "\n" for it in items))
    return str(path)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in-process (and --threads 1 for the script): on a shared 2-core machine a second busy
    process makes 2 OpenMP threads spin-wait, measured 15x slower (notes/cpu-stack.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(toy_world):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    d = toy_world / "models" / "qwen2_5_vl-tiny"
    return AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32), AutoProcessor.from_pretrained(d)


# ---------------------------------------------------------------------------------------------------------------
# targets and bad rows
# ---------------------------------------------------------------------------------------------------------------
def test_response_ids_solution_then_end_of_turn(tiny):
    _, proc = tiny
    tok = proc.tokenizer
    s = Sample("a", [], [], "12", "The image shows 6. 6 + 6 = 12. \\boxed{12}", "f:1")
    ids = sft.response_ids(tok, s, 2048)
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(ids[:-1]) == s.solution
    # no solution (verl rows): the target is \boxed{answer}
    ids = sft.response_ids(tok, Sample("b", [], [], "7", None, "f:2"), 2048)
    assert tok.decode(ids[:-1]) == "\\boxed{7}" and ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_bad_rows_name_file_line_and_field(tiny, toy_world, tmp_path):
    _, proc = tiny
    good = rows(toy_world, "train", 3)
    bad = [good[0], {**good[1], "answer": None}, good[2], "{not json",
           {**good[0], "solution": "6 + 6 = 12<|im_end|> \\boxed{12}"}, {**good[1], "solution": "  "},
           {**good[2], "solution": " + ".join(str(i) for i in range(100)) + " \\boxed{9}"},
           {**good[0], "solution": "<|image_pad|>"}]
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    # Loader errors (rollout.py) and target errors (sft.py) look the same: file:line + field.
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'answer'"):
        sft.load_sft_data(path, DataConfig(), proc.tokenizer, 64)
    only_targets = write_jsonl(tmp_path / "targets.jsonl", [good[0], bad[4]])
    with pytest.raises(DataError, match=r"targets\.jsonl:2: field 'solution': contains special token.*im_end"):
        sft.load_sft_data(only_targets, DataConfig(), proc.tokenizer, 64)
    samples, skipped = read_dataset(path, DataConfig(skip_invalid=True),
                                    check=lambda s: sft.response_ids(proc.tokenizer, s, 64))
    _, responses = sft.load_sft_data(path, DataConfig(skip_invalid=True), proc.tokenizer, 64, verbose=False)
    assert [s.source.rsplit(":", 1)[1] for s in samples] == ["1", "3"]
    assert len(responses) == 2 and len(skipped) == 6
    expected = {"2": "'answer'", "4": "invalid JSON", "5": "special token", "6": "'solution': empty",
                "7": "> --max-response-tokens 64", "8": "<|image_pad|>"}
    for line, what in expected.items():
        assert sum(f"bad.jsonl:{line}:" in e and what in e for e in skipped) == 1, (line, what, skipped)
    with pytest.raises(DataError, match="no valid rows"):
        sft.load_sft_data(write_jsonl(tmp_path / "none.jsonl", bad[4:6]), DataConfig(skip_invalid=True),
                          proc.tokenizer, 64, verbose=False)


# ---------------------------------------------------------------------------------------------------------------
# the loss: response tokens only, exact value
# ---------------------------------------------------------------------------------------------------------------
def test_loss_is_response_only_and_matches_naive_float64(tiny, toy_world):
    model, proc = tiny
    tok = proc.tokenizer
    samples, _ = read_dataset(str(toy_world / "data" / "train.jsonl"))
    samples = samples[:3]
    responses = [sft.response_ids(tok, s, 2048) for s in samples]
    responses[1] = responses[1][:4]                      # a shorter response: padding after it must not count
    batch = collate(proc, samples, responses)
    seen = {}                                            # the final norm's output: lm_head's input at EVERY position

    def keep(module, inputs, output):
        output.retain_grad()
        seen["h"] = output                                                                  # (B, T, H)
    hook = model.model.language_model.norm.register_forward_hook(keep)
    try:
        nll = sft.response_nll(model, batch)
    finally:
        hook.remove()
    N = sum(len(r) for r in responses)
    (nll / N).backward()
    grad = seen["h"].grad                                                                   # (B, T, H)
    P, ids = batch["response_start"], batch["input_ids"]
    image_id = model.config.image_token_id
    assert (ids[:, :P] == image_id).sum() == 4 * 3       # the prompts do hold image tokens
    for i, r in enumerate(responses):
        # position t predicts token t+1: prompt and image tokens (t+1 < P) and padding (t+1 >= P+len) get
        # exactly zero gradient; every response token's predicting position gets some.
        assert grad[i, :P - 1].abs().max() == 0
        assert grad[i, P - 1 + len(r):].abs().max() == 0
        assert (grad[i, P - 1:P - 1 + len(r)].abs().amax(-1) > 0).all()
    # Independent value: naive float64 loop over the full logits with the engines' blocked tokens removed.
    with torch.no_grad():
        full = model.lm_head(seen["h"]).double()                                            # (B, T, V)
    blocked = set(blocked_token_ids(tok, full.shape[-1]))
    allowed = torch.tensor([v for v in range(full.shape[-1]) if v not in blocked])
    total = 0.0
    for i, r in enumerate(responses):
        for k, y in enumerate(r):
            row = full[i, P - 1 + k]
            total += -(row[y] - torch.logsumexp(row[allowed], 0)).item()
    assert abs(nll.item() - total) < 1e-4 * max(1.0, abs(total))


def test_overfits_a_fixed_batch(tiny, toy_world):
    from transformers import AutoModelForImageTextToText
    _, proc = tiny
    model = AutoModelForImageTextToText.from_pretrained(toy_world / "models" / "qwen2_5_vl-tiny", dtype=torch.float32)
    samples, _ = read_dataset(str(toy_world / "data" / "train.jsonl"))
    samples = samples[:4]
    responses = [sft.response_ids(proc.tokenizer, s, 2048) for s in samples]
    batch = collate(proc, samples, responses)
    N = sum(len(r) for r in responses)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = sft.response_nll(model, batch) / N
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # random init: ~log(vocab) = log(1038) ~ 6.9 nats per token at the start
    assert 6.0 < losses[0] < 7.5
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses      # monotone on a fixed batch at this lr


# ---------------------------------------------------------------------------------------------------------------
# the script: 1 rank vs 2 ranks, resume, checkpoint reload
# ---------------------------------------------------------------------------------------------------------------
def run_sft(out, *flags, nproc=1):
    cmd = [sys.executable, str(ROOT / "sft.py"), "--out-dir", str(out), "--nproc", str(nproc), "--optim.lr", "1e-3",
           "--optim.warmup-ratio", "0", "--batch-size", "4", "--rollout.engine", "hf", "--rollout.max-tokens", "4",
           "--reward.num-workers", "0", "--data.skip-invalid", "--threads", "1", "--model.no-freeze-vision", *flags]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p, [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(ckpt):
    """A checkpoint's weights by their in-memory names (save_pretrained writes the on-disk HF layout)."""
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(ckpt).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("arch,lora", [("qwen2_5_vl", False), ("qwen3_vl", True)])
def test_two_ranks_equal_one_rank_resume_and_reload(toy_world, tmp_path, arch, lora):
    """Run a: 1 rank, 2 steps (one micro-batch of 4), checkpoints at steps 1 and 2. Run b: a's step-1 checkpoint,
    resumed on 2 ranks with micro-batches of 1 (2 per rank): its step 2 must equal a's step 2 -- the same step
    taken by 1 rank and by 2 ranks with a different accumulation, from a resumed optimizer/scheduler state.
    Also with LoRA on Qwen3-VL: the adapters come back on resume, and the checkpoint's merged weights and its
    adapter/ (loaded by peft onto the base) agree."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    base = toy_world / "models" / f"{arch}-tiny"
    train = rows(toy_world, "train", 8)
    train.insert(3, {**train[0], "solution": ""})                 # a bad row: skipped and reported
    data = ["--model.path", str(base), *(["--model.lora-rank", "4"] if lora else []),
            "--data.train", write_jsonl(tmp_path / "train.jsonl", train),
            "--data.validation", write_jsonl(tmp_path / "val.jsonl", rows(toy_world, "validation", 3))]
    a, one = run_sft(tmp_path / "a", *data, "--micro-batch-size", "4", "--max-steps", "2", "--save-every", "1")
    assert "skipped 1 invalid row" in a.stderr and "train.jsonl:4: field 'solution': empty" in a.stderr
    assert [m["step"] for m in one] == [1, 2] and [m["epoch"] for m in one] == [0.5, 1.0]
    assert {"step", "epoch", "train/loss", "training/lr", "training/grad_norm", "time/step"} <= one[0].keys()
    assert {"val/loss", "val/accuracy", "val/mean_length"} <= one[1].keys()     # validated at the epoch's end
    assert one[0]["training/lr"] == 1e-3 and one[1]["training/lr"] == pytest.approx(0.5e-3)  # cosine over 2 steps
    w0 = AutoModelForImageTextToText.from_pretrained(base).state_dict()
    w1 = weights(tmp_path / "a/checkpoints/step_000001")
    assert w0.keys() == w1.keys()
    changed = [k for k in w1 if not torch.equal(w0[k], w1[k])]
    assert any(k.startswith("model.visual.") for k in changed)                                   # vision trained
    lm = [k for k in changed if not k.startswith("model.visual.")]
    if lora:   # the language model changed only where LoRA adapts it: 7 linears x 2 layers
        assert len(lm) == 14 and all(k.endswith("_proj.weight") for k in lm)
    else:
        assert len(changed) > 0.9 * len(w1)

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b/checkpoints/step_000002")
    _, two = run_sft(tmp_path / "b", *data, "--micro-batch-size", "1", "--max-steps", "2", "--resume",
                     "--cache-prompts", nproc=2)
    assert [m["step"] for m in two] == [1, 2] and two[0] == one[0]           # the pre-resume line is kept as is
    wa, wb = weights(tmp_path / "a/checkpoints/step_000002"), weights(tmp_path / "b/checkpoints/step_000002")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert max((wa[k] - w1[k]).abs().max().item() for k in wa) > 1e-4       # step 2 did move the weights
    for key in ("train/loss", "val/loss", "training/lr"):                    # val: 3 rows on 2 ranks (a dummy row)
        assert abs(one[1][key] - two[1][key]) < 1e-5, key

    # reload: the checkpoint, loaded as a plain HF model, gives the validation loss the in-memory FSDP model logged
    ckpt = tmp_path / "a/checkpoints/step_000002"
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(ckpt)
    val, resp = sft.load_sft_data(str(tmp_path / "val.jsonl"), DataConfig(), proc.tokenizer, 2048)
    with torch.no_grad():
        batch = collate(proc, val, resp)
        nll = sft.response_nll(model, batch).item() / batch["response_mask"].sum().item()
    assert abs(nll - one[1]["val/loss"]) < 1e-6
    # The checkpoint carries its step's line as it stood before validation (a resume restores it if it was not logged).
    before_val = {k: v for k, v in one[1].items() if not k.startswith(("val/", "time/val"))}
    assert json.loads((ckpt / "vlrl_state.json").read_text()) == {"step": 2, "epoch": 1.0, "kind": "sft",
                                                                 "metrics": before_val}
    if lora:   # peft's own loading and merge of the adapter, on the base model, gives the checkpoint's LM weights
        from peft import PeftModel
        merged = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), ckpt / "adapter")
        merged = merged.merge_and_unload().state_dict()
        w2 = weights(ckpt)
        assert max((merged[k] - w2[k]).abs().max().item() for k in w2 if not k.startswith("model.visual.")) < 1e-6
        assert max((merged[k] - w0[k]).abs().max().item() for k in lm) > 1e-4


def test_help_runs():
    p = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "--max-response-tokens" in p.stdout and "--rollout.engine" in p.stdout

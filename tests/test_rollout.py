"""rollout.py: data loading and validation, prompts, vLLM/HF generation, and the trainer-side log-probs.

The central checks compare independent computations: vLLM's sampled-token log-probs vs an HF forward
(compute_logprobs), padded batches vs one sequence at a time, and compute_logprobs vs a naive float64 log-softmax
over a plain full-sequence forward. vLLM engines come from conftest's `vllm_engine` (one per architecture).
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rollout as R

ARCHS = ["qwen2_5_vl", "qwen2_vl"]


@pytest.fixture(scope="module")
def hf(toy_world):
    """get(arch) -> (fp32 HF model, processor) for the tiny model, loaded once per module."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    cache = {}

    def get(arch):
        if arch not in cache:
            d = toy_world / "models" / f"{arch}-tiny"
            model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
            cache[arch] = (model, AutoProcessor.from_pretrained(d))
        return cache[arch]
    return get


@pytest.fixture(scope="module")
def val(toy_world):
    return R.load_dataset(str(toy_world / "data" / "validation.jsonl"))


def flat(groups):
    return [c for g in groups for c in g]


def max_engine_vs_trainer(model, processor, samples, groups, temperature, data_cfg=R.DataConfig()):
    """max |engine log-prob - compute_logprobs| over all response tokens (prompt i repeated per sample)."""
    ss = [s for s, g in zip(samples, groups) for _ in g]
    comps = flat(groups)
    batch = R.collate(processor, ss, [c.token_ids for c in comps], data_cfg)
    with torch.no_grad():
        lp = R.compute_logprobs(model, batch, temperature)
    P = batch["response_start"]
    worst = 0.0
    for i, c in enumerate(comps):
        assert len(c.logprobs) == len(c.token_ids) > 0
        assert batch["response_mask"][i].sum().item() == len(c.token_ids)
        worst = max(worst, (lp[i, P:P + len(c.token_ids)] - torch.tensor(c.logprobs)).abs().max().item())
    return worst


# ---------------------------------------------------------------------------------------------------------------
# data and prompts
# ---------------------------------------------------------------------------------------------------------------
def test_load_maye_jsonl(toy_world, val):
    rows = [json.loads(line) for line in open(toy_world / "data" / "validation.jsonl")]
    assert len(val) == len(rows)
    s, row = val[3], rows[3]
    assert (s.id, s.answer, s.solution) == (row["id"], row["answer"], row["solution"])
    assert s.source.endswith("validation.jsonl:4")
    assert s.images[0].mode == "RGB" and s.images[0].size == (56, 56)
    # MAYE: image first, then the question (its <image> tag removed) + the CoT instruction
    question = row["question"].replace("<image>", "")
    assert s.messages == [{"role": "user", "content": [{"type": "image"},
                                                       {"type": "text", "text": question + R.MAYE_INSTRUCTION}]}]


def test_prompt_text(val, hf):
    _, processor = hf("qwen2_5_vl")
    text = R.prompt_text(processor, val[0])
    assert text.count("<|image_pad|>") == 1       # one placeholder per image; the processor expands it
    assert text.index("<|vision_end|>") < text.index("Solve the above mathematics problem")
    assert text.endswith("<|im_start|>assistant\n")
    assert "You are a helpful assistant." in text   # the model's default system prompt applies (MAYE)
    text2 = R.prompt_text(processor, R.Sample("x", [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]}], [], "1", None, "s"))
    assert "a<|vision_start|><|image_pad|><|vision_end|>b" in text2


def test_batch_indices():
    # 10 items, batch 3 -> 3 batches per epoch (item 10 of each permutation dropped)
    got = [R.batch_indices(10, 3, seed=7, step=s) for s in range(7)]
    assert [e for e, _ in got] == [0, 0, 0, 1, 1, 1, 2]
    epoch0 = sum((ix for e, ix in got if e == 0), [])
    assert len(epoch0) == 9 and len(set(epoch0)) == 9 and set(epoch0) <= set(range(10))
    assert all(len(ix) == 3 for _, ix in got)
    assert got[0][1] != got[3][1] or got[1][1] != got[4][1]        # a new permutation each epoch
    assert R.batch_indices(10, 3, seed=7, step=5) == got[5]          # pure: resuming at step 5 = same batch
    assert R.batch_indices(10, 3, seed=8, step=0) != got[0]
    with pytest.raises(ValueError, match="batch_size"):
        R.batch_indices(2, 3, seed=0, step=0)


# ---------------------------------------------------------------------------------------------------------------
# trainer-side log-probs
# ---------------------------------------------------------------------------------------------------------------
def naive_logprobs(model, processor, sample, response, temperature, blocked):
    """Independent reference: one unpadded sequence, full logits, float64 log-softmax with the blocked tokens
    removed by hand, read token by token."""
    enc = processor(text=[R.prompt_text(processor, sample)], images=sample.images, return_tensors="pt")
    L = enc["input_ids"].shape[1]
    ids = torch.cat([enc["input_ids"], torch.tensor([response])], 1)
    mm = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, len(response), dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                       pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).logits[0].double()
    out, ent = [], []
    keep = [v for v in range(logits.shape[-1]) if v not in blocked]
    for k, tok in enumerate(response):
        z = logits[L - 1 + k, keep] / temperature
        logz = math.log(sum(math.exp(x) for x in (z - z.max()).tolist())) + z.max().item()
        out.append(logits[L - 1 + k, tok].item() / temperature - logz)
        p = (z - logz).exp()
        ent.append(-(p * (z - logz)).sum().item())
    return out, ent


@pytest.mark.parametrize("arch", ARCHS)
def test_compute_logprobs_padded_equals_single_and_naive(arch, val, hf):
    model, processor = hf(arch)
    g = torch.Generator().manual_seed(0)
    by_len = sorted(val[:20], key=lambda s: len(processor.tokenizer(R.prompt_text(processor, s))["input_ids"]))
    samples = [by_len[0], by_len[-1], by_len[10], by_len[0]]   # prompts of different token lengths (templates)
    assert len({len(processor.tokenizer(R.prompt_text(processor, s))["input_ids"]) for s in samples}) == 3
    responses = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 1, 9, 3)]
    responses[1] = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    T = 0.7
    batch = R.collate(processor, samples, responses)
    lp, ent = R.compute_logprobs(model, batch, T, return_entropy=True)
    assert lp.shape == ent.shape == batch["input_ids"].shape == batch["response_mask"].shape
    assert (lp[batch["response_mask"] == 0] == 0).all() and (ent[batch["response_mask"] == 0] == 0).all()
    P = batch["response_start"]
    blocked = set(batch["blocked_token_ids"].tolist())
    assert len(blocked) == 5
    for i, (s, r) in enumerate(zip(samples, responses)):
        one = R.collate(processor, [s], [r])
        lp1 = R.compute_logprobs(model, one, T)[0, one["response_start"]:]
        assert (lp[i, P:P + len(r)] - lp1).abs().max().item() <= 1e-5          # padded == one at a time
        ref_lp, ref_ent = naive_logprobs(model, processor, s, r, T, blocked)
        assert (lp[i, P:P + len(r)].double() - torch.tensor(ref_lp)).abs().max().item() <= 1e-5
        assert (ent[i, P:P + len(r)].double() - torch.tensor(ref_ent)).abs().max().item() <= 1e-4


def test_compute_logprobs_autograd_and_mrope(val, hf):
    model, processor = hf("qwen2_5_vl")
    batch = R.collate(processor, [val[0], val[1]], [[5, 6, 7], [8, 9]])
    lp = R.compute_logprobs(model, batch)
    lp.sum().backward()
    grad = model.lm_head.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    # M-RoPE matters: dropping mm_token_type_ids makes Qwen2.5-VL fall back to 1-D positions -> different values
    no_types = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        diff = (R.compute_logprobs(model, no_types) - lp.detach()).abs().max().item()
    assert diff > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# engines vs trainer
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_vllm_logprobs_equal_trainer(arch, val, hf, vllm_engine):
    model, processor = hf(arch)
    engine = vllm_engine(arch)
    samples = val[:3]
    for T in (1.0, 0.6):
        groups = engine.generate(samples, n=2, temperature=T, max_tokens=16, seed=3)
        assert [len(g) for g in groups] == [2, 2, 2]
        blocked = set(R.blocked_token_ids(processor.tokenizer, 10**6)) - set(range(len(processor.tokenizer), 10**6))
        for c in flat(groups):
            assert c.finish_reason in ("stop", "length") and not blocked & set(c.token_ids)
            assert (c.finish_reason == "length") == (len(c.token_ids) == 16)
        assert max_engine_vs_trainer(model, processor, samples, groups, T) <= 1e-4
    again = engine.generate(samples, n=2, temperature=0.6, max_tokens=16, seed=3)
    assert [c.token_ids for c in flat(again)] == [c.token_ids for c in flat(groups)]    # seeded
    # the seed of prompt i does not depend on its batch: generating prompt 2 alone gives the same samples
    alone = engine.generate(samples[2:], n=2, temperature=0.6, max_tokens=16, seed=3 + 2 * 2)
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in groups[2]]


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_engine_logprobs_equal_trainer(arch, val, hf):
    model, processor = hf(arch)
    engine = R.HFEngine(model, processor, R.RolloutConfig(engine="hf"))
    groups = engine.generate(val[:3], n=2, temperature=0.8, max_tokens=12, seed=1)
    assert max_engine_vs_trainer(model, processor, val[:3], groups, 0.8) <= 1e-4
    assert [c.token_ids for c in flat(engine.generate(val[:3], 2, 0.8, max_tokens=12, seed=1))] == \
        [c.token_ids for c in flat(groups)]


def test_completion_stop_handling():
    from transformers import PreTrainedTokenizerFast

    class Tok:   # minimal stand-in: decode only
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))
    c = R._completion(Tok(), [4, 5, 9, 6], [-1.0, -2.0, -3.0, -4.0], stops={9})
    assert (c.token_ids, c.logprobs, c.finish_reason) == ([4, 5, 9], [-1.0, -2.0, -3.0], "stop")  # stop kept
    c = R._completion(Tok(), [4, 5], [-1.0, -2.0], stops={9})
    assert (c.token_ids, c.finish_reason) == ([4, 5], "length")

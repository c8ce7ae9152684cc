"""toy.py: build the offline toy world (tiny Qwen-VL models + a visual-math dataset) in seconds.

Nothing can be downloaded in CI, so every stage runs on this embedded default:

1. Models: random-init Qwen2.5-VL, Qwen2-VL and Qwen3-VL in HF format (config, safetensors, tokenizer, processor,
   chat template) that both `transformers` and vLLM load. Sizes: `tiny` (~1M params, tests and the `run.sh` demo) and
   `small` (~10M params, benchmarks). Each has its own byte-level BPE tokenizer trained on the task's text, with
   Qwen's special tokens, so any string tokenizes.
2. Data: MAYE's jsonl format (`question` with `<image>`, `answer`, `solution` ending in `\\boxed{}`, `id`, `image`
   relative to the jsonl). Each image shows one seven-segment digit d (0-9); the question asks for d plus a number b
   given in the text. Without the image the best guess is ~10% (tests/test_toy.py checks this).
   - `train` and `validation`: digit colours from TRAIN_COLOURS, on a white background (in distribution).
   - `test`: out of distribution on purpose, like MAYE's MathVerse test set: digit colours from TEST_COLOURS (never
     seen in training) on a light-grey background, meant to measure *generalisation*, the paper's RL-vs-SFT question
     (measured: it is no harder than validation for these models, whose frozen random vision features carry over).
   - `instruct`: related but different data for the *vanilla instruct model* (the analogue of Qwen2.5-VL-Instruct,
     made by `run.sh` with sft.py in about two minutes): reading the digit, adding two numbers given in the text, and
     the task under a phrasing the other splits never use. Both arms of the demo start from that model.
3. Solutions are a short chain ("The image shows 3. 3 + 7 = 10. \\boxed{10}"). A fraction `--reflect` of them
   reflects with MAYE's words: half misread the digit as a look-alike (one segment apart), doubt and correct it
   ("The image shows 9. Wait, let me re-check the image. It shows 3. ..."), half verify the sum ("Let me verify:
   10 - 7 = 3."). So responses vary in length, and reflection ratios and words have something to show.

Simplifications: fixed digit position and size (random jitter made SFT unreliable at this model size); one question
template family.

Run alone:
    python toy.py --help
    python toy.py --out toy                       # everything, ~10 s
    python toy.py --out toy --sizes tiny --train-size 64 --val-size 16 --test-size 16
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

# Qwen's special tokens, in Qwen's order (ids 0.. after the learned vocabulary are assigned below).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's chat template (default system prompt, image placeholder per image item), trimmed of tool calls.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or "
    "'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or "
    "'video' in content %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# MAYE's CoT instruction (data.py appends it to every MAYE-format question; the tokenizer should know its words).
MAYE_INSTRUCTION = ("\nSolve the above mathematics problem, write out the solution process according to the question, "
                    "and use the same LaTeX format as the question in the solution process. Please display the final "
                    "answer in the format \\boxed{}.")

TRAIN_COLOURS = {"red": (200, 30, 30), "green": (30, 150, 40), "blue": (30, 60, 200), "black": (10, 10, 10),
                 "orange": (230, 120, 0), "purple": (120, 40, 160)}
TEST_COLOURS = {"teal": (0, 128, 128), "brown": (120, 70, 20), "magenta": (210, 0, 150), "navy": (0, 0, 110)}
IMAGE_SIZE = 56  # 56x56 -> a 4x4 patch grid of 14 px -> 4 image tokens after the 2x2 merge

# Seven segments a..g as (x0, y0, x1, y1) boxes: a bold digit filling most of the 56x56 image (thin strokes in a
# few pixels of a 14-px patch were too weak a signal for a random-init vision tower to pick up quickly).
_L, _R, _T, _M, _B, _W = 12, 44, 5, 28, 51, 7     # left, right, top, middle, bottom, stroke width
_SEGMENTS = {"a": (_L, _T, _R, _T + _W), "b": (_R - _W, _T, _R, _M), "c": (_R - _W, _M, _R, _B),
             "d": (_L, _B - _W, _R, _B), "e": (_L, _M, _L + _W, _B), "f": (_L, _T, _L + _W, _M),
             "g": (_L, _M - _W // 2, _R, _M + _W - _W // 2)}
_DIGITS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc",
           8: "abcdefg", 9: "abcdfg"}

# The instruct split's three tasks: read the digit; add two numbers in the text; the task in an unseen phrasing.
INSTRUCT_TEMPLATES = ["<image>Which digit is shown in the image?", "<image>Ignore the image. What is {a} plus {b}?",
                      "<image>Compute the number in the image plus {b}."]
QUESTION_TEMPLATES = ["<image>What is the number in the image plus {b}?",
                      "<image>Add {b} to the number shown in the image. What is the result?",
                      "<image>The image shows a digit. What is that digit plus {b}?"]

SIZES = {
    # name: (text hidden, text layers, heads, kv heads, intermediate, vision hidden, vision depth, vision heads)
    "tiny": (128, 2, 2, 1, 256, 64, 2, 2),
    "small": (256, 5, 4, 2, 768, 256, 4, 4),
    "mid": (768, 12, 12, 2, 2048, 384, 4, 6),      # ~90M: benchmarks and the GPU smoke run, not built by default
}


@dataclass(frozen=True)
class Args:
    out: str = "toy"
    """Output folder: models go to OUT/models/<arch>-<size>, data to OUT/data/{train,validation,test}.jsonl."""
    seed: int = 0
    """Seed for the model weights, the tokenizer corpus and the dataset."""
    archs: tuple[Literal["qwen2_5_vl", "qwen2_vl", "qwen3_vl"], ...] = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
    """Architectures to build."""
    sizes: tuple[Literal["tiny", "small", "mid"], ...] = ("tiny", "small")
    """Model sizes to build (tiny ~1M params for tests, small ~10M for the demo, mid ~90M for benchmarks)."""
    vocab_size: int = 1024
    """BPE vocabulary size (before the special tokens)."""
    train_size: int = 2000
    """Training problems."""
    val_size: int = 200
    """Validation problems (in distribution)."""
    test_size: int = 200
    """Test problems (out of distribution: unseen colours and background)."""
    instruct_size: int = 2000
    """Problems of the instruct split (the vanilla model's data: related to the task, not the task)."""
    max_b: int = 9
    """The number in the text is drawn from 0..max_b."""
    reflect: float = 0.3
    """Fraction of solutions that reflect (misread-then-re-check, or verify the sum)."""
    skip_models: bool = False
    """Build only the data."""
    skip_data: bool = False
    """Build only the models."""


def draw_digit(digit: int, colour: tuple[int, int, int], background: tuple[int, int, int] = (255, 255, 255)):
    """A 56x56 RGB PIL image of a seven-segment `digit` in `colour`."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(img)
    for seg in _DIGITS[digit]:
        draw.rectangle(_SEGMENTS[seg], fill=colour)
    return img


# Seven-segment look-alikes: the digits whose segments differ least from each digit's (a plausible misreading).
LOOK_ALIKES = {d: [e for e in range(10) if e != d and len(set(_DIGITS[d]) ^ set(_DIGITS[e])) == min(
    len(set(_DIGITS[d]) ^ set(_DIGITS[f])) for f in range(10) if f != d)] for d in range(10)}


def solution(rng: random.Random, digit: int, b: int, reflect: float) -> str:
    """The worked solution of `digit + b`; with probability `reflect` it reflects (see the module docstring)."""
    answer, r = digit + b, rng.random()
    read, check = f"The image shows {digit}.", ""
    if r < reflect / 2:
        read = f"The image shows {rng.choice(LOOK_ALIKES[digit])}. Wait, let me re-check the image. It shows {digit}."
    elif r < reflect:
        check = f" Let me verify: {answer} - {b} = {digit}."
    return f"{read} {digit} + {b} = {answer}.{check} \\boxed{{{answer}}}"


def make_problem(rng: random.Random, split: str, index: int, max_b: int, reflect: float = 0.3) -> tuple[dict, object]:
    """One MAYE-format row (image path filled in by the caller) and its PIL image."""
    colours = TEST_COLOURS if split == "test" else TRAIN_COLOURS
    background = (225, 225, 225) if split == "test" else (255, 255, 255)
    digit, b = rng.randrange(10), rng.randint(0, max_b)
    name = rng.choice(sorted(colours))
    task = rng.randrange(3) if split == "instruct" else -1
    if task == 0:    # read the digit
        question, answer, sol = INSTRUCT_TEMPLATES[0], digit, f"The image shows {digit}. \\boxed{{{digit}}}"
    elif task == 1:  # add two numbers given in the text (the image is a distractor)
        a = rng.randint(0, 9)
        question, answer = INSTRUCT_TEMPLATES[1].format(a=a, b=b), a + b
        sol = f"{a} + {b} = {a + b}. \\boxed{{{a + b}}}"
    else:            # the task (instruct: in a phrasing the task splits never use)
        question = (INSTRUCT_TEMPLATES[2] if task == 2 else rng.choice(QUESTION_TEMPLATES)).format(b=b)
        answer, sol = digit + b, solution(rng, digit, b, reflect)
    row = {"question": question, "answer": str(answer), "solution": sol,
           "id": f"toy_{split}_{index:05d}", "image": f"images/{split}_{index:05d}.png",
           "digit": digit, "b": b, "colour": name, **({"task": task} if task >= 0 else {})}
    return row, draw_digit(digit, colours[name], background)


def build_data(out: Path, seed: int, sizes: dict[str, int], max_b: int, reflect: float = 0.3) -> dict[str, Path]:
    """Write OUT/{split}.jsonl and OUT/images/*.png; returns the jsonl paths. Deterministic for `seed`."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split_index, (split, n) in enumerate(sizes.items()):
        rng = random.Random(seed * 1000 + split_index)
        rows = []
        for i in range(n):
            row, img = make_problem(rng, split, i, max_b, reflect)
            img.save(out / row["image"])
            rows.append(row)
        paths[split] = out / f"{split}.jsonl"
        tmp = paths[split].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, paths[split])
    return paths


def tokenizer_corpus(seed: int, max_b: int, n: int = 3000) -> list[str]:
    """Text the BPE tokenizer is trained on: questions, solutions, the instruction, chat scaffolding, numbers."""
    rng = random.Random(seed)
    lines = [MAYE_INSTRUCTION, "You are a helpful assistant.", "system", "user", "assistant",
             "Wait, does it seem right? Wait, let's double check. Wait, there might be a mistake.",
             "Let me verify: recheck, re-evaluate, think again, try again, yet."]
    for _ in range(n):
        d, b = rng.randrange(10), rng.randint(0, max_b)
        lines.append(rng.choice(QUESTION_TEMPLATES).format(b=b).replace("<image>", ""))
        lines.append(solution(rng, d, b, 0.5))
        lines.append(rng.choice(INSTRUCT_TEMPLATES).format(a=d, b=b).replace("<image>", ""))
    lines += [str(i) for i in range(1000)] + ["\\frac{1}{2} \\sqrt{3} 30^\\circ x = 5 (A) (B) (C) (D) 50\\%"]
    return lines


def build_tokenizer(seed: int, max_b: int, vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` with Qwen's special tokens and the Qwen-VL chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(seed, max_b), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:], clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    fast.padding_side = "left"
    return fast


def model_config(arch: str, size: str, tokenizer):
    """A Qwen2.5-VL / Qwen2-VL / Qwen3-VL config with the toy sizes and the tokenizer's special-token ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig
    hidden, layers, heads, kv_heads, inter, v_hidden, v_depth, v_heads = SIZES[size]
    head_dim = hidden // heads
    section = [head_dim // 8, (head_dim // 2 - head_dim // 8) // 2]
    mrope = [section[0], section[1], head_dim // 2 - section[0] - section[1]]  # sums to head_dim/2
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                rope_parameters=rope, tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=False)
    if arch == "qwen3_vl":   # Qwen3 text (q/k norms, explicit head_dim, interleaved M-RoPE); 16-px patches, DeepStack
        text.update(head_dim=head_dim, rope_parameters={**rope, "mrope_interleaved": True})
        text.pop("bos_token_id"), text.pop("eos_token_id")   # Qwen3VLTextConfig has no such fields
        vision = dict(depth=v_depth, hidden_size=v_hidden, intermediate_size=2 * v_hidden, num_heads=v_heads,
                      out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=256, deepstack_visual_indexes=[v_depth // 3, 2 * v_depth // 3],
                      in_channels=3)
        return Qwen3VLConfig(text_config=text, vision_config=vision, **common)
    if arch == "qwen2_5_vl":
        vision = dict(depth=v_depth, hidden_size=v_hidden, intermediate_size=2 * v_hidden, num_heads=v_heads,
                      out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=112, fullatt_block_indexes=[v_depth - 1], in_channels=3)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    vision = dict(depth=v_depth, embed_dim=v_hidden, hidden_size=hidden, num_heads=v_heads, mlp_ratio=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **common)


def build_model(out: Path, arch: str, size: str, tokenizer, seed: int) -> int:
    """Write a random-init HF model folder (weights, config, processor, tokenizer); returns its parameter count."""
    import torch
    from transformers.utils.logging import disable_progress_bar
    disable_progress_bar()  # a per-shard bar for each 3 MB model
    import transformers as tf
    config = model_config(arch, size, tokenizer)
    torch.manual_seed(seed)
    model_cls, proc_cls, video_cls = {
        "qwen2_vl": (tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor, tf.Qwen2VLVideoProcessor),
        "qwen2_5_vl": (tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor, tf.Qwen2VLVideoProcessor),
        "qwen3_vl": (tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor, tf.Qwen3VLVideoProcessor)}[arch]
    model = model_cls(config).to(torch.float32)
    # Images are tiny: allow 56x56 (one 4x4 grid) up to 448x448 (1024 patches) so the processor never upscales.
    pixels = dict(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=448 * 448)
    patch = config.vision_config.patch_size   # 14 (Qwen2/2.5-VL) or 16 (Qwen3-VL): 56 px -> 64 px, 4 image tokens
    image_processor = tf.Qwen2VLImageProcessor(patch_size=patch, **pixels)
    video_processor = video_cls(patch_size=patch, **pixels)
    processor = proc_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                         chat_template=CHAT_TEMPLATE)
    tmp = out.with_name(out.name + ".tmp")
    model.generation_config = tf.GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                  pad_token_id=tokenizer.pad_token_id,
                                                  bos_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    return sum(p.numel() for p in model.parameters())


def build(args: Args) -> dict:
    """Build the whole toy world under args.out; returns {'models': {name: params}, 'data': {split: path}}."""
    out = Path(args.out)
    result: dict = {"models": {}, "data": {}}
    if not args.skip_data:
        sizes = {"train": args.train_size, "validation": args.val_size, "test": args.test_size,
                 "instruct": args.instruct_size}
        result["data"] = {k: str(v) for k, v in build_data(out / "data", args.seed, sizes, args.max_b,
                                                           args.reflect).items()}
    if not args.skip_models:
        tokenizer = build_tokenizer(args.seed, args.max_b, args.vocab_size)
        for arch in args.archs:
            for size in args.sizes:
                name = f"{arch}-{size}"
                result["models"][name] = build_model(out / "models" / name, arch, size, tokenizer, args.seed)
    return result


def main(args: Args) -> None:
    import time
    t0 = time.time()
    result = build(args)
    for name, params in result["models"].items():
        print(f"model {name:18s} {params / 1e6:6.2f}M params -> {Path(args.out) / 'models' / name}")
    for split, path in result["data"].items():
        print(f"data  {split:18s} -> {path}")
    print(f"toy world built in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main(tyro.cli(Args))

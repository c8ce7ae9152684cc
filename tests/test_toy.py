"""The toy world: models load and run with images, the dataset is well-formed, deterministic and needs the image."""
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

import toy


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_model_forward_with_image(toy_world, arch):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    d = toy_world / "models" / f"{arch}-tiny"
    processor = AutoProcessor.from_pretrained(d)
    model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    assert model.config.model_type == arch
    row = read_jsonl(toy_world / "data" / "train.jsonl")[0]
    image = Image.open(toy_world / "data" / row["image"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and text.count("<|image_pad|>") == 1
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]    # 56x56 px -> 4x4 patches of 14 px (Qwen3-VL: 64 px, 16)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4   # 2x2 merge -> 4 tokens
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()
    # The image matters: another digit gives other logits.
    inputs2 = processor(text=[text], images=[toy.draw_digit(8, (0, 0, 0))], return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(model(**inputs2).logits, logits)


def test_tokenizer_round_trips_any_text(toy_world):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(toy_world / "models" / "qwen2_5_vl-tiny")
    for text in ["The image shows 3. 3 + 7 = 10. \\boxed{10}", "ünïcødé 数学 ∑ 🙂", "Wait, let's double check"]:
        assert tok.decode(tok.encode(text)) == text
    for special in toy.SPECIAL_TOKENS:
        assert len(tok.encode(special)) == 1, special
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_dataset_well_formed(toy_world):
    for split in ("train", "validation", "test"):
        rows = read_jsonl(toy_world / "data" / f"{split}.jsonl")
        assert len(rows) == {"train": 2000, "validation": 200, "test": 200}[split]
        assert len({r["id"] for r in rows}) == len(rows)
        for r in rows[:50]:
            assert {"question", "answer", "solution", "id", "image"} <= set(r)
            assert r["question"].startswith("<image>") and r["question"].count("<image>") == 1
            assert r["solution"].endswith(f"\\boxed{{{r['answer']}}}")
            assert int(r["answer"]) == r["digit"] + r["b"]
            assert (toy_world / "data" / r["image"]).is_file()
    test_colours = {r["colour"] for r in read_jsonl(toy_world / "data" / "test.jsonl")}
    train_colours = {r["colour"] for r in read_jsonl(toy_world / "data" / "train.jsonl")}
    assert test_colours and not test_colours & train_colours        # the test split is out of distribution


def test_instruct_split_and_reflective_solutions(toy_world):
    """The instruct split is related to the task but not the task; a fraction of solutions reflect, and correct."""
    instruct = read_jsonl(toy_world / "data" / "instruct.jsonl")
    task_questions = {t.split("{")[0] for t in toy.QUESTION_TEMPLATES}
    assert not any(r["question"].startswith(q) for r in instruct for q in task_questions)
    assert Counter(r["task"] for r in instruct).keys() == {0, 1, 2}
    for r in instruct:
        assert r["solution"].endswith(f"\\boxed{{{r['answer']}}}")
        if r["task"] == 0:
            assert r["answer"] == str(r["digit"])
    train = read_jsonl(toy_world / "data" / "train.jsonl")
    misread = [r for r in train if "Wait, let me re-check the image." in r["solution"]]
    verified = [r for r in train if "Let me verify:" in r["solution"]]
    assert 0.1 < len(misread) / len(train) < 0.2 and 0.1 < len(verified) / len(train) < 0.2   # reflect 0.3, half each
    for r in misread:  # a look-alike digit (one segment apart, or two for 2 and 4), then the right one
        first = int(r["solution"].split("The image shows ")[1][0])
        assert first != r["digit"] and first in toy.LOOK_ALIKES[r["digit"]]
        assert f"It shows {r['digit']}. {r['digit']} + {r['b']} = {r['answer']}." in r["solution"]
    assert toy.LOOK_ALIKES[1] == [7] and toy.LOOK_ALIKES[8] == [0, 6, 9] and toy.LOOK_ALIKES[4] == [1, 9]
    lengths = {len(r["solution"]) for r in train}
    assert max(lengths) - min(lengths) > 40


def test_dataset_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sizes = {"train": 20, "validation": 5, "test": 5}
    toy.build_data(a, 3, sizes, 9), toy.build_data(b, 3, sizes, 9), toy.build_data(c, 4, sizes, 9)
    assert (a / "train.jsonl").read_text() == (b / "train.jsonl").read_text()
    assert (a / "images" / "train_00007.png").read_bytes() == (b / "images" / "train_00007.png").read_bytes()
    assert (a / "train.jsonl").read_text() != (c / "train.jsonl").read_text()


def test_answer_needs_the_image(toy_world):
    """The best text-only guess (majority answer per question text, learned on train) is near chance on test."""
    train = read_jsonl(toy_world / "data" / "train.jsonl")
    test = read_jsonl(toy_world / "data" / "test.jsonl")
    by_text = defaultdict(Counter)
    for r in train:
        by_text[r["question"]][r["answer"]] += 1
    overall = Counter(r["answer"] for r in train).most_common(1)[0][0]
    guess = [by_text[r["question"]].most_common(1)[0][0] if r["question"] in by_text else overall for r in test]
    text_only_acc = sum(g == r["answer"] for g, r in zip(guess, test)) / len(test)
    assert text_only_acc <= 0.20, text_only_acc
    # ... while the image alone determines the digit exactly: the pixels differ for every digit.
    images = {d: toy.draw_digit(d, (0, 0, 0)).tobytes() for d in range(10)}
    assert len(set(images.values())) == 10

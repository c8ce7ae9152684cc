"""evaluate.py: pass@k, MAYE metrics on a fake engine, aggregation, figures/report, evaluate_run resume and errors.

Expected numbers are worked by hand (arithmetic in the comments) or by brute force (all k-subsets), never by
calling the code under test twice. A fake engine returns chosen completions; one test uses the HF engine on the tiny
toy model trained briefly to answer (so that it is right on some problems), one the session's vLLM engine (a run's
checkpoints share one engine).
"""
import itertools
import json
import math
import random
from pathlib import Path

import pytest

import evaluate as ev
import report
from reward import RewardConfig
from data import Sample
from rollout import Completion

RCFG = RewardConfig(num_workers=0)  # in-process judging: no worker start-up in unit tests


def sample(i, answer):
    return Sample(id=f"p{i}", messages=[], images=[], answer=answer, solution="", source="test")


def comp(text, n_tokens=5, finish="stop"):
    return Completion(text=text, token_ids=list(range(n_tokens)), logprobs=None, finish_reason=finish)


class FakeEngine:
    """generate() returns the completions scripted per sample id (cycled to n) and records its calls."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, samples, n, temperature, top_p=1.0, max_tokens=16, seed=None):
        self.calls.append(dict(ids=[s.id for s in samples], n=n, temperature=temperature, top_p=top_p,
                               max_tokens=max_tokens, seed=seed))
        return [[self.script[s.id][j % len(self.script[s.id])] for j in range(n)] for s in samples]


# ------------------------------------------------------------------------------------------------------------
def test_parse_setting():
    assert ev.parse_setting("pass@1_t0.01") == ("pass@1_t0.01", 1, 1, 0.01, 0.001)  # MAYE near-greedy top_p
    assert ev.parse_setting("pass@1_t0.6") == ("pass@1_t0.6", 1, 1, 0.6, 1.0)
    assert ev.parse_setting("pass@8_t1.0") == ("pass@8_t1.0", 8, 8, 1.0, 1.0)
    assert ev.parse_setting("pass@4_t0.7_p0.9_n16") == ("pass@4_t0.7_p0.9_n16", 4, 16, 0.7, 0.9)
    for bad in ("pass8_t1.0", "pass@8", "pass@0_t1", "pass@8_t1.0_n4", "pass@1_t1_p0", "pass@1_t1_p2"):
        with pytest.raises(ValueError, match="eval setting"):
            ev.parse_setting(bad)


def test_pass_at_k_hand():
    T, F = True, False
    outcomes = [[T, F, F], [F, F, F], [F, T, T], [F, F, T]]
    assert ev.pass_at_k(outcomes, 1) == 0.25   # first column T,F,F,F -> 1/4
    assert ev.pass_at_k(outcomes, 2) == 0.5    # any of first 2: T,F,T,F -> 2/4
    assert ev.pass_at_k(outcomes, 3) == 0.75   # any of 3: T,F,T,T -> 3/4
    # unbiased, n=3: k=1 is the mean correct rate: (1/3 + 0 + 2/3 + 1/3) / 4 = 1/3
    assert ev.pass_at_k(outcomes, 1, unbiased=True) == pytest.approx(1 / 3)
    # k=2: 1 - C(n-c,2)/C(3,2) per problem: c=1 -> 1-1/3 = 2/3; c=0 -> 0; c=2 -> 1-0 = 1; c=1 -> 2/3; mean 7/12
    assert ev.pass_at_k(outcomes, 2, unbiased=True) == pytest.approx(7 / 12)
    assert ev.pass_at_k(outcomes, 3, unbiased=True) == 0.75  # n == k: same as 'any'
    with pytest.raises(ValueError, match="fewer than k=4"):
        ev.pass_at_k(outcomes, 4)
    with pytest.raises(ValueError, match="no problems"):
        ev.pass_at_k([], 1)


def test_pass_at_k_unbiased_vs_brute_force():
    """Chen et al.'s estimator = the probability that a random k-subset of the n samples has a correct one."""
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        c = [rng.random() < 0.3 for _ in range(n)]
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(c[i] for i in s) for s in subsets) / len(subsets)
        assert ev.pass_at_k([c], k, unbiased=True) == pytest.approx(brute, abs=1e-12)


def test_evaluate_model_fake_engine():
    right = lambda a: comp(f"The image shows it. \\boxed{{{a}}}", 6)
    wrong = comp("Wait, let me verify. \\boxed{0}", 8)
    samples = [sample(0, "3"), sample(1, "5"), sample(2, "7")]
    script = {"p0": [right(3)],                                # always right
              "p1": [wrong, wrong, comp("Wait. \\boxed{5}", 4)],  # 3rd of each 3 right (and reflective)
              "p2": [comp("\\boxed{7", 10, "length")]}          # truncated, unclosed box -> wrong
    eng = FakeEngine(script)
    cfg = ev.EvalConfig(settings=("pass@1_t0.01", "pass@3_t1.0"), max_tokens=10, seed=7, batch_size=2)
    done = []
    res = ev.evaluate_model(eng, samples, cfg, RCFG, on_batch=done.append)
    assert done == [2, 1, 2, 1]  # two settings x batches of 2 + 1
    assert eng.calls[0] == dict(ids=["p0", "p1"], n=1, temperature=0.01, top_p=0.001, max_tokens=10, seed=7)
    assert eng.calls[1]["seed"] == 7 + 2 * 1  # prompt i gets seed + i*n, however the prompts are batched
    assert eng.calls[2]["n"] == 3 and eng.calls[2]["temperature"] == 1.0 and eng.calls[2]["top_p"] == 1.0
    assert eng.calls[3]["seed"] == 7 + 2 * 3
    g = res["pass@1_t0.01"]
    # responses: p0 right (6 tok), p1 wrong (8 tok, reflective), p2 truncated wrong (10 tok)
    assert g["accuracy"] == pytest.approx(1 / 3) and g["response_accuracy"] == pytest.approx(1 / 3)
    assert g["mean_length"] == pytest.approx((6 + 8 + 10) / 3)
    assert g["length_clip_ratio"] == pytest.approx(1 / 3)
    assert (g["n_problems"], g["n_responses"], len(g["records"])) == (3, 3, 3)
    p = res["pass@3_t1.0"]
    # p0: 3 right; p1: wrong, wrong, right -> solved; p2: 3 wrong -> pass@3 = 2/3; responses right 4/9
    assert p["accuracy"] == pytest.approx(2 / 3) and p["response_accuracy"] == pytest.approx(4 / 9)
    assert p["mean_length"] == pytest.approx((3 * 6 + 8 + 8 + 4 + 3 * 10) / 9)  # 68 / 9
    # reflection: 9 responses, reflective = p1's three ("wait" in all), correct = 4 (p0 x3 + p1's third),
    # both = 1 -> ratio 3/9; in correct 1/4; in incorrect (3-1)/(9-4) = 2/5; correct among reflective 1/3;
    # correct among non-reflective (4-1)/(9-3) = 1/2; "wait" occurs 3 times, "verify" twice
    assert p["reflection/reflection_ratio"] == pytest.approx(3 / 9)
    assert p["reflection/reflection_ratio_in_correct_answers"] == pytest.approx(1 / 4)
    assert p["reflection/reflection_ratio_in_incorrect_answers"] == pytest.approx(2 / 5)
    assert p["reflection/correct_ratio_in_reflection_texts"] == pytest.approx(1 / 3)
    assert p["reflection/correct_ratio_in_no_reflection_texts"] == pytest.approx(1 / 2)
    assert p["reflection/words/wait"] == 3 and p["reflection/words/verify"] == 2
    recs = p["records"]
    assert [(r["id"], r["sample"], r["correct"]) for r in recs[3:6]] == [("p1", 0, False), ("p1", 1, False),
                                                                        ("p1", 2, True)]
    assert recs[6]["finish_reason"] == "length" and recs[6]["length"] == 10


def test_evaluate_model_bad_input():
    eng = FakeEngine({"p0": [comp("\\boxed{1}")], "p1": [comp("\\boxed{1}")]})
    res = ev.evaluate_model(eng, [sample(0, "1"), sample(1, "")], ev.EvalConfig(settings=("pass@1_t0.6",)), RCFG)
    assert [r["reason"] for r in res["pass@1_t0.6"]["records"]] == ["", "bad_input: answer is empty"]  # named, not lost

    class Short(FakeEngine):
        def generate(self, samples, n, **kw):
            return [[comp("x")] for _ in samples]  # ignores n
    with pytest.raises(RuntimeError, match="n=2"):
        ev.evaluate_model(Short({}), [sample(0, "1")], ev.EvalConfig(settings=("pass@2_t1.0",)), RCFG)


def test_validate_is_greedy_pass_at_1():
    """The trainers' validation: one near-greedy sample per prompt (T=0.01, top_p=0.001) at their max_tokens."""
    eng = FakeEngine({"p0": [comp("\\boxed{3}", 6)], "p1": [comp("\\boxed{4}", 8)],
                      "p2": [comp("\\boxed{7", 4, "length")]})
    out = ev.validate(eng, [sample(0, "3"), sample(1, "5"), sample(2, "7")], RCFG, max_tokens=12)
    # p0 right (6 tokens), p1 wrong (8), p2 truncated with an unclosed box, wrong (4) -> 1/3, (6 + 8 + 4) / 3 = 6
    assert out == {"val/accuracy": pytest.approx(1 / 3), "val/mean_length": pytest.approx(6.0)}
    assert eng.calls == [dict(ids=["p0", "p1", "p2"], n=1, temperature=0.01, top_p=0.001, max_tokens=12, seed=0)]


# ------------------------------------------------------------------------------------------------------------
# aggregation and report
# ------------------------------------------------------------------------------------------------------------
def rows_for(accs, split="test", setting="pass@1_t0.01", kind="rl", start_epoch=1):
    return [dict(checkpoint=f"step_{e}", step=10 * e, epoch=float(e), kind=kind, split=split, setting=setting,
                 accuracy=a, mean_length=20.0 + e) for e, a in enumerate(accs, start_epoch)]


def fake_runs():
    runs = {"rl0": rows_for([0.3, 0.5, 0.4]),
            "rl1": rows_for([0.2, 0.6, 0.7]),
            "sft0": rows_for([0.1, 0.2], kind="sft"),
            "sft1": rows_for([0.3, 0.2], kind="sft"),
            "base": rows_for([0.25], kind="vanilla", start_epoch=0)}
    runs["rl0"] += rows_for([0.9], start_epoch=0)  # an epoch-0 checkpoint: excluded from mean and max
    return runs


def test_aggregate_hand():
    runs = fake_runs()
    arms = {"rl0": "rl", "rl1": "rl", "sft0": "sft", "sft1": "sft", "base": "vanilla"}
    agg = report.aggregate(runs, arms, "test", "pass@1_t0.01")
    # rl0: mean (0.3+0.5+0.4)/3 = 0.4, max 0.5;  rl1: mean (0.2+0.6+0.7)/3 = 0.5, max 0.7
    # means 0.4, 0.5 -> mean 0.45, sample std sqrt(((-.05)^2 + .05^2)/1) = 0.0707107
    # maxes 0.5, 0.7 -> mean 0.6, std sqrt(0.01 + 0.01) = 0.1414214
    assert agg["rl"]["n"] == 2
    assert agg["rl"]["mean"] == pytest.approx((0.45, math.sqrt(0.005)))
    assert agg["rl"]["max"] == pytest.approx((0.6, math.sqrt(0.02)))
    # sft0: mean 0.15 max 0.2; sft1: mean 0.25 max 0.3 -> means (0.2, sqrt(0.005)), maxes (0.25, sqrt(0.005))
    assert agg["sft"]["mean"] == pytest.approx((0.2, math.sqrt(0.005)))
    assert agg["sft"]["max"] == pytest.approx((0.25, math.sqrt(0.005)))
    assert agg["vanilla"]["mean"] == (0.25, 0.0) and agg["vanilla"]["per_run"]["base"]["epochs"] == 1
    assert report.aggregate(runs, arms, "validation", "pass@1_t0.01") == {}
    lengths = report.aggregate(runs, arms, "test", "pass@1_t0.01", metric="mean_length")
    assert lengths["sft"]["mean"] == pytest.approx((21.5, 0.0))  # both runs: (21 + 22) / 2
    table = report.table_markdown(runs, arms, ["test"], ["pass@1_t0.01"])
    lines = [line for line in table.splitlines() if line.startswith("| ") and "run" in line]
    assert [line.split("|")[1].strip() for line in lines] == [
        "Vanilla (1 run)", "SFT mean (2 runs)", "RL mean (2 runs)", "SFT max (2 runs)", "RL max (2 runs)"]
    assert "| 45.0 ± 7.1 |" in table and "| 60.0 ± 14.1 |" in table and "| 25.0 |" in table


def test_findings_written_from_the_numbers():
    runs, arms = fake_runs(), {"rl0": "rl", "rl1": "rl", "sft0": "sft", "sft1": "sft", "base": "vanilla"}
    for rows in runs.values():  # the same rows on validation, with a reflection ratio; and an untried decoding
        rows += [dict(r, split="validation", **{"reflection/reflection_ratio": 0.01 * r["step"]}) for r in rows]
        rows += [dict(r, setting="pass@1_t0.6", accuracy=1 - r["accuracy"]) for r in rows]
    metrics = {run: [] for run in runs}
    metrics["rl0"] = [{"step": s, "response/lengths": L, "reflection/reflection_ratio": f}
                      for s, L, f in [(1, 10, 0.1), (2, 12, 0.3), (3, 11, 0.2), (4, 13, 0.2)]]
    metrics["rl1"] = [{"step": s, "response/lengths": 10 + s, "reflection/reflection_ratio": 0.0} for s in (1, 2, 3)]
    text = "\n".join(report.findings(runs, metrics, arms, ("validation", "test"), ("pass@1_t0.01", "pass@1_t0.6")))
    # Table 3 means (test_aggregate_hand): RL 45.0 ± 7.1, SFT 20.0 ± 7.1, vanilla 25.0: a 25-point gap > 7.1
    assert ("- **test** (out of distribution), pass@1_t0.01, mean over epochs: vanilla 25.0, sft 20.0 ± 7.1, "
            "rl 45.0 ± 7.1, so RL leads by 25.0 points: more than the spread across runs.") in text
    assert "- On test, RL's mean beats SFT's in 1 of 2 decodings (pass@1_t0.01)." in text  # 1-acc flips it at T=0.6
    # last checkpoints (pass@1_t0.6, validation): rl0 step 30 (length 20+3=23), rl1 step 30 (23); sft0/1 step 20 (22)
    assert "- Response length at the last checkpoint (validation, pass@1_t0.6): vanilla 20.0 tokens, sft 22.0 " \
           "tokens, rl 23.0 tokens." in text
    assert "- Reflection ratio at the last checkpoint (validation, pass@1_t0.6): vanilla 0.0%, sft 20.0%, rl 30.0%." \
        in text
    # rl0: Pearson r of (10, 12, 11, 13) and (.1, .3, .2, .2): dx = (-1.5, .5, -.5, 1.5), dy = (-.1, .1, 0, 0)
    # r = (.15 + .05) / sqrt(5 * .02) = 0.632; rl1's reflection is constant: no r
    assert "correlate at +0.63 (Pearson, one figure per run" in text
    one = {"rl0": "rl", "sft0": "sft"}
    assert "no spread to judge it by" in "\n".join(report.findings({r: runs[r] for r in one}, {}, one, ("test",),
                                                              ("pass@1_t0.01",)))


def write_fake_run(root: Path, name, kind, seed):
    """metrics.jsonl of a 2-epoch run, 3 steps per epoch, with known values."""
    run = root / name
    run.mkdir()
    lines = []
    for step in range(1, 7):
        line = {"step": step, "epoch": step / 3}
        if kind == "rl":
            line.update({"response/lengths": 10 + step + seed, "reflection/reflection_ratio": 0.1 * step,
                         "reflection/reflection_ratio_in_correct_answers": 0.05 * step,
                         "reflection/reflection_ratio_in_incorrect_answers": 0.02 * step,
                         "reflection/words/wait": step + seed, "reflection/words/verify": 1,
                         "reflection/words/yet": 0})
        else:
            line["train/loss"] = 1.0 / step
        lines.append(line)
        if step % 3 == 0:
            lines.append({"step": step, "epoch": step / 3, "val/accuracy": 0.1 * step + 0.01 * seed,
                          **({"train/epoch_accuracy": 0.2 * step / 3 + 0.05 * seed} if kind == "rl" else {})})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(run)


def test_report_and_figures(tmp_path):
    runs_dirs = [write_fake_run(tmp_path, f"rl{s}", "rl", s) for s in range(2)] + [
        write_fake_run(tmp_path, "sft0", "sft", 0)]
    metrics = {r: ev.read_jsonl(Path(r) / "metrics.jsonl") for r in runs_dirs}
    runs = {}
    for r, kind, seed in zip(runs_dirs, ["rl", "rl", "sft"], [0, 1, 0]):
        runs[r] = [dict(row, split=sp, step=int(row["epoch"]) * 3) for sp in ("validation", "test")
                   for row in rows_for([0.3 + 0.01 * seed, 0.6 + 0.01 * seed], kind=kind, setting="pass@1_t0.01")]
    runs["base"], metrics["base"] = rows_for([0.2], kind="vanilla", start_epoch=0, split="validation"), []
    arms = {r: rows[0]["kind"] for r, rows in runs.items()}
    out = tmp_path / "report"
    path = report.write_report(runs, metrics, arms, out, ("validation", "test"), ("pass@1_t0.01", "pass@1_t0.6"))
    for png in ("training_curves.png", "accuracy_per_epoch.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
        assert f"]({png})" in path.read_text()
    text = path.read_text()
    assert "RL mean (2 runs)" in text and "(table.md)" not in text and (out / "table.md").exists()
    # consistency check: rl0 step 3 log 0.3 vs eval 0.3, rl1 step 6 log 0.61 vs eval 0.61 -> difference 0.0
    assert "largest accuracy difference 0.0 points" in text
    assert f"| `{runs_dirs[1]}` | 6 | 61.0 | 61.0 | nan | 22.00 |" in text  # no val/mean_length logged


def test_series_and_jsonl_errors(tmp_path):
    rows = [{"step": 1, "acc": 0.5}, {"step": 2}, {"step": 2, "acc": 1}, {"step": 2, "acc": 0.75}]
    assert report.series(rows, "acc", "step") == {1.0: 0.5, 2.0: 0.75}  # a later line at the same step wins
    with pytest.raises(ValueError, match="'response/lengths' at step=4 is 'x'"):
        report.series([{"step": 4, "response/lengths": "x"}], "response/lengths", "step", "run/metrics.jsonl")
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "epoch": 0.5}\n\n{"epoch": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: missing field 'step'"):
        ev.read_jsonl(path, ("step", "epoch"))
    path.write_text('{"step": 1, "epoch": 0.5}\n{"step": 2, "ep')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: invalid JSON"):
        ev.read_jsonl(path)


def test_main_report_only(tmp_path):
    """--runs ... --report-only: eval.jsonl from each run dir, or from OUT/models/<path> for a plain model dir; the
    default arm is the kind of a run's last evaluated checkpoint (this rl run starts from a vanilla step 0)."""
    rl, base, out = make_run(tmp_path, [2]), tmp_path / "base", tmp_path / "report"
    rows = rows_for([0.9], kind="vanilla", start_epoch=0) + rows_for([0.4, 0.6])  # steps 0, 10, 20
    (rl / "eval.jsonl").write_text("".join(json.dumps(dict(r, max_tokens=8, limit=0)) + "\n" for r in rows))
    (rl / "metrics.jsonl").write_text(json.dumps({"step": 10, "epoch": 1.0, "response/lengths": 7}) + "\n")
    base_dir = out / "models" / str(base.resolve()).strip("/").replace("/", "_")
    base_dir.mkdir(parents=True)
    (base_dir / "eval.jsonl").write_text(json.dumps(dict(rows[0], accuracy=0.25, max_tokens=8, limit=0)) + "\n")
    ev.main(ev.Args(runs=(str(rl), str(base)), out=str(out), report_only=True, eval=ev.EvalConfig(splits=("test",))))
    text = (out / "report.md").read_text()
    assert f"| `{rl}` | rl | 3 | 1 |" in text and f"| `{base}` | vanilla | 1 | 0 |" in text
    assert "| Vanilla (1 run) | 25.0 |" in text and "| RL mean (1 run) | 50.0 |" in text  # (0.4 + 0.6) / 2
    assert "| RL max (1 run) | 60.0 |" in text and (out / "training_curves.png").exists()


# ------------------------------------------------------------------------------------------------------------
# whole runs: resume, every_k, errors
# ------------------------------------------------------------------------------------------------------------
def make_split(root: Path, name, answers):
    import toy
    (root / "images").mkdir(exist_ok=True)
    rows = []
    for i, a in enumerate(answers):
        toy.draw_digit(i % 10, (0, 0, 0)).save(root / "images" / f"{name}_{i}.png")
        rows.append({"question": "<image>What is the number in the image plus 0?", "answer": a,
                     "solution": f"\\boxed{{{a}}}", "id": f"{name}{i}", "image": f"images/{name}_{i}.png"})
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / f"{name}.jsonl")


def make_run(root: Path, steps, kind="rl"):
    run = root / "run"
    for s in steps:
        d = run / "checkpoints" / f"step_{s:06d}"
        d.mkdir(parents=True)
        (d / "vlrl_state.json").write_text(json.dumps({"step": s, "epoch": s / 2, "kind": kind}))
    return run


class ScriptedEngines:
    """engine_fn: checkpoint step s answers every problem right iff s >= 2; records which models were loaded."""

    def __init__(self, fail_on=()):
        self.loaded, self.fail_on = [], fail_on

    def __call__(self, model_dir):
        self.loaded.append(Path(model_dir).name)
        if Path(model_dir).name in self.fail_on:
            raise OSError("safetensors header is corrupt")
        good = int(Path(model_dir).name.split("_")[1]) >= 2

        class E:
            def generate(self, samples, n, temperature, top_p=1.0, max_tokens=16, seed=None):
                return [[comp(f"\\boxed{{{s.answer if good else 'no'}}}") for _ in range(n)] for s in samples]
        return E()


def test_evaluate_run_resume_and_every_k(tmp_path):
    from data import DataConfig
    data = DataConfig(validation=make_split(tmp_path, "val", ["1", "2", "3"]),
                      test=make_split(tmp_path, "test", ["4", "5"]))
    run = make_run(tmp_path, [1, 2, 3])
    cfg = ev.EvalConfig(settings=("pass@1_t0.01", "pass@2_t1.0"), max_tokens=8, every_k=2)
    # first attempt dies loading step 3: step 1's four lines must be kept
    eng = ScriptedEngines(fail_on=("step_000003",))
    with pytest.raises(RuntimeError, match=r"checkpoint .*step_000003 failed to load: OSError: safetensors"):
        ev.evaluate_run(run, data, cfg=cfg, reward_cfg=RCFG, engine_fn=eng)
    assert eng.loaded == ["step_000001", "step_000003"]  # every_k=2 -> steps 1 and 3 (the last); 2 skipped
    kept = ev.read_jsonl(run / "eval.jsonl")
    assert [(r["checkpoint"], r["split"], r["setting"]) for r in kept] == [
        ("step_000001", sp, st) for sp in ("validation", "test") for st in ("pass@1_t0.01", "pass@2_t1.0")]
    assert all(r["accuracy"] == 0.0 for r in kept) and kept[0]["n_problems"] == 3 and kept[1]["n_responses"] == 6
    # resume: only step 3 is loaded, its four lines appended
    eng = ScriptedEngines()
    rows = ev.evaluate_run(run, data, cfg=cfg, reward_cfg=RCFG, engine_fn=eng)
    assert eng.loaded == ["step_000003"] and len(rows) == 8
    assert [r["accuracy"] for r in rows[4:]] == [1.0] * 4 and rows[4]["epoch"] == 1.5 and rows[4]["kind"] == "rl"
    saved = ev.read_jsonl(run / "eval_responses" / "step_000003" / "test_pass@2_t1.0.jsonl")
    assert len(saved) == 4 and all(r["correct"] for r in saved)
    # all done: nothing is loaded; a different max_tokens is refused rather than mixed in
    eng = ScriptedEngines()
    assert ev.evaluate_run(run, data, cfg=cfg, reward_cfg=RCFG, engine_fn=eng) == rows and eng.loaded == []
    with pytest.raises(ValueError, match="max_tokens=8"):
        ev.evaluate_run(run, data, cfg=ev.EvalConfig(settings=cfg.settings, max_tokens=9, every_k=2),
                        reward_cfg=RCFG, engine_fn=eng)


def test_evaluate_run_errors(tmp_path):
    from data import DataConfig
    run = make_run(tmp_path, [1])
    no_answers = make_split(tmp_path, "val", ["1", ""])
    eng = ScriptedEngines()
    with pytest.raises(ValueError, match="answer"):  # data.load_dataset or our own check, before any model
        ev.evaluate_run(run, DataConfig(validation=no_answers), cfg=ev.EvalConfig(splits=("validation",)),
                        reward_cfg=RCFG, engine_fn=eng)
    assert eng.loaded == []
    with pytest.raises(AttributeError, match="'nope'"):  # --eval.splits names a DataConfig field
        ev.evaluate_run(run, DataConfig(), cfg=ev.EvalConfig(splits=("nope",)), reward_cfg=RCFG, engine_fn=eng)
    (run / "eval.jsonl").write_text('{"checkpoint": "step_000001", "split": "validation"}\n')
    with pytest.raises(ValueError, match=r"eval.jsonl:1: missing field 'step'"):
        ev.evaluate_run(run, DataConfig(), reward_cfg=RCFG, engine_fn=eng)
    (run / "checkpoints" / "step_000002").mkdir()
    with pytest.raises(FileNotFoundError, match="step_000002/vlrl_state.json"):
        ev.list_checkpoints(run)
    with pytest.raises(ValueError, match="neither a run dir"):
        ev.list_checkpoints(tmp_path / "images")


def test_plain_model_dir_is_vanilla(toy_world):
    ck = ev.list_checkpoints(toy_world / "models" / "qwen2_5_vl-tiny")
    assert ck == [{"name": "model", "path": str(toy_world / "models" / "qwen2_5_vl-tiny"), "step": 0,
                   "epoch": 0.0, "kind": "vanilla"}]


def answering_copy(toy_world: Path, out: Path, samples) -> Path:
    """The tiny model after 100 Adam steps (~6 s) on two targets, saved to `out`: the right answer to samples[0], a
    wrong one to samples[1]. Its greedy answer then depends on the prompt, and it is right on some problems (the
    random-init model never is, and runs every response to max_tokens)."""
    import shutil

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from data import collate
    from rollout import compute_logprobs
    src = toy_world / "models" / "qwen2_5_vl-tiny"
    processor = AutoProcessor.from_pretrained(src)
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    tok, end = processor.tokenizer, processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    targets = [f"\\boxed{{{samples[0].answer}}}", f"\\boxed{{{int(samples[1].answer) + 1}}}"]
    batch = collate(processor, samples[:2], [tok.encode(t, add_special_tokens=False) + [end] for t in targets])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(100):
        loss = -(compute_logprobs(model, batch) * batch["response_mask"]).sum() / batch["response_mask"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    shutil.copytree(src, out)
    model.save_pretrained(out)
    return out


def texts(records: list[dict]) -> list[tuple]:
    return [(r["id"], r["sample"], r["response"]) for r in records]


def test_hf_engine_on_toy_model(toy_world, tmp_path):
    """The real chain on a toy model that is right on some problems: HF engine -> evaluate_model, and evaluate_run on
    a run dir whose one checkpoint is that model gives the same responses, problem by problem and sample by sample
    (same seeds, same prompts), hence the same numbers. At T=2 the responses change with the seed, so a seed that
    differs between the two paths shows."""
    from dataclasses import replace

    from data import DataConfig, load_dataset
    from rollout import RolloutConfig, make_engine
    data = DataConfig(validation=str(toy_world / "data" / "validation.jsonl"))
    rcfg = RolloutConfig(engine="hf", max_tokens=8)
    cfg = ev.EvalConfig(settings=("pass@1_t0.01", "pass@3_t2.0"), splits=("validation",), max_tokens=8, limit=4,
                        seed=7)   # not the engine's default seed 0, which an unseeded call would fall back to
    samples = load_dataset(data.validation, data)[:4]
    ck = answering_copy(toy_world, tmp_path / "run" / "checkpoints" / "step_000005", samples)
    (ck / "vlrl_state.json").write_text(json.dumps({"step": 5, "epoch": 1.0, "kind": "rl"}))
    engine = make_engine(str(ck), rcfg, data)
    res = ev.evaluate_model(engine, samples, cfg, RCFG)
    for name, n in (("pass@1_t0.01", 1), ("pass@3_t2.0", 3)):
        r, recs = res[name], res[name]["records"]
        assert len(recs) == 4 * n and all(0 < x["length"] <= 8 for x in recs)
        assert [(x["id"], x["sample"]) for x in recs] == [(s.id, j) for s in samples for j in range(n)]
        assert r["length_clip_ratio"] == sum(x["finish_reason"] == "length" for x in recs) / (4 * n)
        assert r["accuracy"] == sum(any(x["correct"] for x in recs[i:i + n]) for i in range(0, 4 * n, n)) / 4
    greedy = res["pass@1_t0.01"]["records"]
    assert greedy[0]["response"] == f"\\boxed{{{samples[0].answer}}}" and greedy[0]["finish_reason"] == "stop"
    assert [x["correct"] for x in greedy] == [True, False, False, False]       # right on the problem it learned
    other_seed = ev.evaluate_model(engine, samples, replace(cfg, seed=8), RCFG, ("pass@3_t2.0",))
    assert texts(other_seed["pass@3_t2.0"]["records"]) != texts(res["pass@3_t2.0"]["records"])
    rows = ev.evaluate_run(tmp_path / "run", data, rcfg, cfg, RCFG)
    assert [(r["setting"], r["n_responses"]) for r in rows] == [("pass@1_t0.01", 4), ("pass@3_t2.0", 12)]
    for row in rows:
        saved = ev.read_jsonl(ck.parents[1] / "eval_responses" / ck.name / f"validation_{row['setting']}.jsonl")
        assert texts(saved) == texts(res[row["setting"]]["records"]), row["setting"]
        keys = ("accuracy", "mean_length", "length_clip_ratio", "response_accuracy")
        assert [row[k] for k in keys] == [res[row["setting"]][k] for k in keys], row["setting"]


def test_reflection_stats_hand_worked():
    responses = ["Wait, let me recheck.", "The answer is 3.", "I verify: yes, WAIT.", "Done.", "try again"]
    correct = [True, True, False, False, False]
    s = ev.reflection_stats(responses, correct)
    # N=5; reflective R = {0, 2, 4} -> 3 ("yet" is not in any); correct C = {0, 1} -> 2; RC = {0} -> 1
    assert s["reflection_ratio"] == 3 / 5
    assert s["reflection_ratio_in_correct_answers"] == 1 / 2  # RC / C
    assert s["reflection_ratio_in_incorrect_answers"] == 2 / 3  # (R - RC) / (N - C) = 2 / 3
    assert s["correct_ratio_in_reflection_texts"] == 1 / 3  # RC / R
    assert s["correct_ratio_in_no_reflection_texts"] == 1 / 2  # (C - RC) / (N - R) = 1 / 2
    # total occurrences: "wait" in 0 and 2 ("WAIT"), "recheck" once, "verify" once, "try again" once
    assert (s["words/wait"], s["words/recheck"], s["words/verify"], s["words/try again"]) == (2, 1, 1, 1)
    assert s["words/yet"] == 0 and len([k for k in s if k.startswith("words/")]) == 15


def test_reflection_stats_zero_denominators_and_custom_words():
    s = ev.reflection_stats(["plain"], [True])
    assert s["reflection_ratio"] == 0.0 and s["correct_ratio_in_reflection_texts"] == 0.0  # R = 0
    assert s["reflection_ratio_in_incorrect_answers"] == 0.0  # N - C = 0
    s = ev.reflection_stats(["hmm hmm", "ok"], [False, True], words=("hmm",))
    assert s["words/hmm"] == 2 and s["reflection_ratio"] == 0.5
    assert ev.reflection_stats([], [])["reflection_ratio"] == 0.0
    with pytest.raises(ValueError):
        ev.reflection_stats(["a"], [])
    with pytest.raises(ValueError, match="strings needed"):
        ev.reflection_stats(["a", None], [True, False])


@pytest.mark.xdist_group("vllm_engine")
def test_one_vllm_engine_serves_a_run(toy_world, tmp_path, vllm_engine, monkeypatch):
    """evaluate_run starts one vLLM engine per run and loads each later checkpoint's weights into it: checkpoint 2
    then gives exactly the responses a freshly started engine on checkpoint 2 gives."""
    import shutil

    from safetensors.torch import load_file, save_file

    import rollout
    from data import DataConfig, load_dataset
    src = toy_world / "models" / "qwen2_5_vl-tiny"
    run = make_run(tmp_path, [1, 2])
    for step, scale in ((1, 1.0), (2, 1.5)):  # checkpoint 2: other weights
        ckpt = run / "checkpoints" / f"step_{step:06d}"
        shutil.copytree(src, ckpt, dirs_exist_ok=True)
        save_file({k: v * scale if ".layers." in k else v for k, v in load_file(src / "model.safetensors").items()},
                  ckpt / "model.safetensors")
    engine, started = vllm_engine("qwen2_5_vl"), []
    monkeypatch.setattr(ev, "make_engine", lambda path, *a: started.append(Path(path).name) or engine)
    data, rcfg = DataConfig(validation=str(toy_world / "data" / "validation.jsonl")), rollout.RolloutConfig()
    cfg = ev.EvalConfig(settings=("pass@1_t0.01",), splits=("validation",), max_tokens=8, limit=8)
    try:
        ev.evaluate_run(run, data, rcfg, cfg, RCFG)
    finally:
        engine.update_weights(load_file(src / "model.safetensors").items())   # the session's engine, as it was
    assert started == ["step_000001"]
    reused = [ev.read_jsonl(run / "eval_responses" / f"step_00000{step}" / "validation_pass@1_t0.01.jsonl")
              for step in (1, 2)]
    fresh = rollout.VLLMEngine(str(run / "checkpoints" / "step_000002"), rollout.RolloutConfig(dtype="float32",
                                                                                              max_model_len=1024))
    samples = load_dataset(data.validation, data)[:8]
    ref = ev.evaluate_model(fresh, samples, cfg, RCFG)["pass@1_t0.01"]["records"]
    assert [r["response"] for r in reused[1]] == [r["response"] for r in ref]
    assert [r["response"] for r in reused[0]] != [r["response"] for r in reused[1]]   # the weights did change

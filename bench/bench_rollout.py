"""Benchmark: rollout tokens/s on the `small` toy model, vLLM vs HF engine, and our wrapper's overhead.

Workload (issue 5): 16 image prompts x 8 samples x 128 new tokens, T=1, fp32 on CPU, the same seeded requests for
every contender. Stop tokens are honoured, so throughput is counted in tokens actually generated.
Contenders, interleaved per repeat so that machine-load drift hits all alike (medians reported):
- `bare`: vLLM `LLM.generate` on requests built once (prompt text + PIL image + SamplingParams), no wrapper.
- `vllm`: rollout.VLLMEngine.generate (templating, request building, log-prob extraction, Completion objects).
- `hf`:   rollout.HFEngine.generate (transformers generate, one left-padded batch).
The first generate of a vLLM process pays a one-off warm-up (measured and printed separately).

    python bench/bench_rollout.py                         # toy/models/qwen2_5_vl-small, 3 repeats
    python bench/bench_rollout.py --repeats 1 --skip-hf   # quick
Final line: RESULT {"name": "rollout_tokens_per_s", ...}; wrapper_overhead = vllm_s / bare_s - 1 (goal < 0.10;
noisy), wrapper_own_overhead = (time in VLLMEngine.generate outside LLM.generate) / bare_s (the direct measure).
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import data as D  # noqa: E402
import rollout as R  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "toy/models/qwen2_5_vl-small"))
    ap.add_argument("--data", default=str(ROOT / "toy/data/validation.jsonl"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()

    samples = D.load_dataset(a.data)[:a.prompts]
    t0 = time.perf_counter()
    engine = R.VLLMEngine(a.model, R.RolloutConfig(dtype="float32", max_model_len=1024))
    startup = time.perf_counter() - t0
    # the bare requests: exactly what VLLMEngine sends, built once outside the timed region
    requests = [engine._request(s) for s in samples]
    from vllm import SamplingParams   # as VLLMEngine.generate builds them
    params = [SamplingParams(n=a.n, temperature=1.0, top_p=1.0, max_tokens=a.max_tokens, seed=100 + i * a.n, logprobs=0,
                             stop_token_ids=engine.stops, allowed_token_ids=engine.allowed, detokenize=False)
              for i in range(len(samples))]
    t0 = time.perf_counter()
    engine.llm.generate(requests[:1], params[:1], use_tqdm=False)
    warmup = time.perf_counter() - t0

    def bare():
        outs = engine.llm.generate(requests, params, use_tqdm=False)
        return sum(len(o.token_ids) for out in outs for o in out.outputs)

    def ours(eng):
        def run():
            groups = eng.generate(samples, a.n, 1.0, 1.0, a.max_tokens, seed=100)
            return sum(len(c.token_ids) for g in groups for c in g)
        return run

    inner = []   # seconds spent inside LLM.generate during the `vllm` contender's calls

    def ours_timed():
        """VLLMEngine.generate with LLM.generate timed inside it: total - inner = the wrapper's own cost, a
        figure that, unlike the bare-vs-ours difference, does not drown in run-to-run noise."""
        orig = engine.llm.generate

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = orig(*args, **kwargs)
            inner.append(time.perf_counter() - t)
            return out
        engine.llm.generate = timed
        try:
            return ours(engine)()
        finally:
            del engine.llm.generate   # back to the class method
    contenders = {"bare": bare, "vllm": ours_timed}
    if not a.skip_hf:
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained(a.model, dtype=torch.float32).eval()
        contenders["hf"] = ours(R.HFEngine(model, engine.processor, R.RolloutConfig(engine="hf")))
    times = {k: [] for k in contenders}
    tokens = {}
    for rep in range(a.repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)
            print(f"repeat {rep} {name:5s} {tokens[name]:6d} tokens {times[name][-1]:7.2f} s "
                  f"{tokens[name] / times[name][-1]:8.0f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    own = statistics.median(t - i for t, i in zip(times["vllm"], inner))
    tps = {k: tokens[k] / med[k] for k in med}
    result = {"name": "rollout_tokens_per_s", "model": Path(a.model).name, "prompts": a.prompts, "n": a.n,
              "max_tokens": a.max_tokens, "repeats": a.repeats, "torch_threads": torch.get_num_threads(),
              "startup_s": round(startup, 2), "first_generate_warmup_s": round(warmup, 2),
              **{f"{k}_tok_per_s": round(v, 1) for k, v in tps.items()},
              **{f"{k}_median_s": round(v, 3) for k, v in med.items()},
              "wrapper_overhead": round(med["vllm"] / med["bare"] - 1, 4),
              "wrapper_own_s": round(own, 4), "wrapper_own_overhead": round(own / med["bare"], 5),
              "same_tokens_bare_vs_vllm": tokens["bare"] == tokens["vllm"],   # same seeded requests, same outputs
              "load_avg_1min": round(os.getloadavg()[0], 2)}   # > cores: other processes skewed the timings
    if "hf" in tps:
        result["vllm_vs_hf_speedup"] = round(tps["vllm"] / tps["hf"], 3)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

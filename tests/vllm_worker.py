"""Runs inside the vLLM venv (not the main one): greedy generation with vLLM's `LLM` for a list of jobs.

    VENV_PYTHON tests/vllm_worker.py JOBS.json RESULTS.json

JOBS.json: {"jobs": [{"name", "model" (a folder), "prompts" (lists of token ids), "max_tokens", and optionally
"dtype", "tensor_parallel_size", "enforce_eager", "max_model_len", "sabotage" (a way to break the plugin, see
`sabotage`)}]}.
RESULTS.json: {name: {"tokens": [[ids] per prompt], "logprobs": [[chosen tokens' log-probs]], "cached_tokens": [...],
"kv_cache_tokens": int, "init_s", "error": the exception's message when the engine refused the job}}.

Every job runs in this one process, one engine after another (`VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps a
single-rank engine in this process, so a sabotage patch reaches the model; tensor-parallel jobs start their own
workers). The prompts of a job go in one `generate` call (continuous batching); then the first prompt is sent again,
so its answer comes from the prefix cache (`cached_tokens` > 0).
"""

import contextlib
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@contextlib.contextmanager
def sabotage(kind: str | None):
    """Patch the plugin, for this job only, so that it computes a wrong model: the tests show the comparison
    catches it."""
    import torch
    from modeling_diff_vllm import diff_transformer as plugin

    patches = {
        # a1 instead of a1 - λ·a2
        "v1-no-lambda": (plugin.DiffTransformerV1Attention, "lambda_full",
                         lambda self: torch.zeros((), dtype=torch.float32)),
        # a1 - λ·a2 straight into o_proj
        "v1-no-head-norm": (plugin.DiffTransformerHeadNorm, "forward", lambda self, hidden_states: hidden_states),
        # a_2h instead of a_2h - σ(λ)·a_2h+1
        "v2-no-lambda": (plugin.DiffTransformerV2Attention, "lambda_gate",
                         lambda self, hidden_states: torch.zeros_like(hidden_states[:, : self.num_heads])),
    }
    if kind is None:
        yield
        return
    owner, name, replacement = patches[kind]
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    try:
        llm = LLM(
            model=job["model"],
            dtype=job.get("dtype", "float32"),
            max_model_len=job.get("max_model_len", 256),
            max_num_seqs=8,
            tensor_parallel_size=job.get("tensor_parallel_size", 1),
            skip_tokenizer_init=True,
            enable_prefix_caching=True,
            block_size=32,  # prompts of 40 tokens span pages; a repeated one fills whole pages from the prefix cache
            enforce_eager=job.get("enforce_eager", False),  # else vLLM's default on CPU: torch.compile (inductor)
            seed=0,
        )
    except Exception as error:  # the engine refused the model: the test checks the sentence
        cause = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        return {"error": f"{type(error).__name__}: {error}", "root_error": str(cause)}
    init_s = time.perf_counter() - started
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, logprobs=0, detokenize=False,
                            ignore_eos=True)  # as many tokens as `generate()` without an EOS
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    outputs += llm.generate(prompts[:1], params, use_tqdm=False)  # again: from the prefix cache
    cache = llm.llm_engine.vllm_config.cache_config
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "logprobs": [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outputs],
        "cached_tokens": [o.num_cached_tokens or 0 for o in outputs],
        "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
        "init_s": init_s,
    }
    del llm
    return result


def main() -> None:
    jobs_file, results_file = sys.argv[1:3]
    jobs = json.loads(open(jobs_file).read())["jobs"]
    results = {}
    for job in jobs:
        with sabotage(job.get("sabotage")):
            results[job["name"]] = run(job)
        print(f"{job['name']}: {'refused' if 'error' in results[job['name']] else 'done'}", flush=True)
    with open(results_file, "w") as out:
        json.dump(results, out)


if __name__ == "__main__":
    main()

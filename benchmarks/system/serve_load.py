#!/usr/bin/env python
"""Load test of `diff-transformer serve`: 32 concurrent clients for a minute, a quarter of them hostile.

A correctness and memory test, not a speed one. One server (continuous batching, the default; an API key) serves a
tiny DiffTransformer V2 (hidden 64, 2 layers, context 2048, random weights, a byte-level BPE tokenizer trained on
Python's docs), or `--model`. Then:

- reference answers: each good request, sent alone to the idle server;
- load: `--clients` threads for `--duration` seconds. Three in four are good clients, each cycling through the good
  requests (greedy chat, streamed greedy chat, greedy chat with a stop string, greedy completion, seeded sampled chat)
  and checking every answer against its reference. The others are hostile: an empty prompt, a body over the size
  limit, wrong types, `max_tokens` of 10^9, a prompt longer than the context, no API key, malformed JSON, and clients
  that leave mid-request (streamed and not); each must get its 4xx (or, for those that leave, nothing);
- the server's RSS (its API process and the model's process together) every half second.

It passes when every good answer equals its reference, every hostile request gets the status expected, /health still
answers, and the RSS is flat: its median over the last tenth of the load is within 5% of the median over the first
tenth after a warm-up of a tenth. The machine's load (os.getloadavg) is recorded: on a shared machine the request
counts vary, the verdict should not.

    python -m benchmarks.system.serve_load            # 32 clients for 60 s
    python -m benchmarks.system.serve_load --smoke    # 8 clients for 5 s (a test runs this)

Results: benchmarks/results/serve_load/serve_load.{md,json,png} (`--out` elsewhere).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx2 as httpx
import psutil
import torch
from modeling_diff_serving.server import start_server
from modeling_diff_eval.corpus import python_docs_texts
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from modeling_diff import DiffTransformerConfig, DiffTransformerForCausalLM

KEY = "load-test-key"
CONTEXT = 2048
MAX_TOKENS = 24
LIMIT_BYTES = 1024 * 1024  # the server's default --max-request-bytes
QUESTIONS = [
    "def main():",
    "What does the with statement do?",
    "import os",
    "How do I read a file line by line?",
    "class Point:",
    "Explain list comprehensions.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
RESULTS = Path(__file__).resolve().parents[1] / "results" / "serve_load"


def tiny_model(folder: Path) -> Path:
    """A tiny DiffTransformer V2 with a chat template, saved to `folder`."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(python_docs_texts()[:10], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = DiffTransformerConfig(diff_version=2, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                   max_position_embeddings=CONTEXT, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = DiffTransformerForCausalLM(config)
    with torch.no_grad():  # peaked attention maps: a wrong cache layout or pairing changes the answers
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Requests: each returns what to compare (a good one: its answer; a hostile one: its HTTP status, or "left").


def chat_body(question: str, **settings) -> dict:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": MAX_TOKENS, **settings}


def good_requests() -> list[tuple[str, str, dict]]:
    """(name, kind, body): kind is chat, stream or completion."""
    jobs = []
    for i, question in enumerate(QUESTIONS):
        jobs.append((f"greedy {i}", "chat", chat_body(question, temperature=0)))
        jobs.append((f"sampled {i}", "chat", chat_body(question, temperature=0.8, top_p=0.9, seed=i)))
    jobs.append(("streamed", "stream", chat_body(QUESTIONS[1], temperature=0)))
    jobs.append(("stop", "chat", chat_body(QUESTIONS[2], temperature=0, stop=["e", "\n"])))
    jobs.append(("completion", "completion", {"prompt": "import", "max_tokens": MAX_TOKENS, "temperature": 0}))
    return jobs


def send_good(client: httpx.Client, kind: str, body: dict) -> str:
    if kind == "completion":
        reply = client.post("/v1/completions", json=body)
        reply.raise_for_status()
        return reply.json()["choices"][0]["text"]
    if kind == "chat":
        reply = client.post("/v1/chat/completions", json=body)
        reply.raise_for_status()
        return reply.json()["choices"][0]["message"]["content"]
    pieces = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                pieces.append(choices[0].get("delta", {}).get("content") or "")
    return "".join(pieces)


def hostile_requests() -> dict[str, tuple]:
    """name: (function(client, base) -> status or "left", the status expected)."""
    long_prompt = chat_body("x " * (CONTEXT * 4))
    long_answer = {"prompt": "def", "max_tokens": CONTEXT - 10, "temperature": 0}

    def post(path, **kwargs):
        return lambda client, base: client.post(path, **kwargs).status_code

    def without_key(client, base):
        return httpx.post(f"{base}/v1/chat/completions", json=chat_body("hi"), timeout=60).status_code

    def leaves(client, base):
        try:
            httpx.post(f"{base}/v1/completions", json=long_answer, headers=client.headers, timeout=0.3)
        except httpx.TimeoutException:
            return "left"
        return "answered"

    def leaves_stream(client, base):
        with client.stream("POST", "/v1/completions", json={**long_answer, "stream": True}) as reply:
            for _ in reply.iter_lines():
                return "left"  # after the first event
        return "answered"

    def malformed(client, base):
        headers = {"Content-Type": "application/json"}
        return client.post("/v1/chat/completions", content=b'{"messages": [', headers=headers).status_code

    return {
        "empty prompt": (post("/v1/completions", json={"prompt": ""}), 422),
        "body over the limit": (post("/v1/chat/completions", json=chat_body("x " * (LIMIT_BYTES // 2 + 10))), 413),
        "bare string part": (
            post("/v1/chat/completions", json={"messages": [{"role": "user", "content": ["Hi"]}]}),
            422,
        ),
        "seed 2^70": (post("/v1/chat/completions", json=chat_body("hi", seed=2**70)), 422),
        "temperature string": (post("/v1/chat/completions", json=chat_body("hi", temperature="hot")), 422),
        "logit_bias types": (post("/v1/chat/completions", json=chat_body("hi", logit_bias={"a": "b"})), 422),
        "stop type": (post("/v1/chat/completions", json=chat_body("hi", stop=[1])), 422),
        "max_tokens 10^9": (post("/v1/completions", json={"prompt": "def", "max_tokens": 10**9}), 400),
        "prompt past the context": (post("/v1/chat/completions", json=long_prompt), 400),
        "no API key": (without_key, 401),
        "malformed JSON": (malformed, 422),
        "leaves mid-request": (leaves, "left"),
        "leaves mid-stream": (leaves_stream, "left"),
    }


# ---------------------------------------------------------------------------------------------------------------------


def rss_bytes(process: psutil.Process) -> int:
    """The RSS of the server's process and its children (the model's process, multiprocessing's tracker)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_load(base: str, server: psutil.Process, clients: int, duration: float) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    good = good_requests()
    hostile = hostile_requests()

    with httpx.Client(base_url=base, headers=headers, timeout=300) as client:  # the references, alone
        references = {name: send_good(client, kind, body) for name, kind, body in good}

    tallies = defaultdict(Counter)  # request name -> outcome -> count
    mismatches, errors = [], []
    rss = []  # (seconds since the load started, bytes)
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + duration

    def good_client(offset: int):
        with httpx.Client(base_url=base, headers=headers, timeout=300) as client:
            for name, kind, body in itertools.islice(itertools.cycle(good), offset, None):
                if time.monotonic() > deadline:
                    return
                try:
                    answer = send_good(client, kind, body)
                except Exception as error:  # counted: any failure of a good request fails the test
                    with lock:
                        errors.append(f"{name}: {type(error).__name__}: {error}")
                    continue
                with lock:
                    tallies[name]["match" if answer == references[name] else "mismatch"] += 1
                    if answer != references[name]:
                        mismatches.append({"request": name, "alone": references[name], "under load": answer})

    def hostile_client(offset: int):
        kinds = list(hostile.items())
        with httpx.Client(base_url=base, headers=headers, timeout=300) as client:
            for name, (send, expected) in itertools.islice(itertools.cycle(kinds), offset, None):
                if time.monotonic() > deadline:
                    return
                try:
                    outcome = send(client, base)
                except Exception as error:
                    outcome = type(error).__name__
                with lock:
                    tallies[name]["as expected" if outcome == expected else f"got {outcome}"] += 1

    def sample_rss():
        while time.monotonic() < deadline + 1:
            rss.append((time.monotonic() - started, rss_bytes(server)))
            time.sleep(0.5)

    hostile_count = clients // 4
    threads = [threading.Thread(target=sample_rss)]
    threads += [threading.Thread(target=hostile_client, args=(i,)) for i in range(hostile_count)]
    threads += [threading.Thread(target=good_client, args=(i,)) for i in range(clients - hostile_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    healthy = httpx.get(f"{base}/health", timeout=30).status_code == 200
    return {
        "references": references,
        "tallies": {name: dict(counts) for name, counts in tallies.items()},
        "good_names": [name for name, _, _ in good],
        "hostile_expected": {name: expected for name, (_, expected) in hostile.items()},
        "mismatches": mismatches[:20],
        "errors": errors[:20],
        "error_count": len(errors),
        "rss": rss,
        "healthy_after": healthy,
        "wall_s": time.monotonic() - started,
    }


def rss_verdict(rss: list[tuple[float, int]], duration: float) -> dict:
    """Median RSS over the first tenth after a warm-up tenth, and over the last tenth of the load."""
    tenth = duration / 10
    early = [value for t, value in rss if tenth <= t < 2 * tenth]
    late = [value for t, value in rss if duration - tenth <= t <= duration]
    early_mb, late_mb = statistics.median(early) / 2**20, statistics.median(late) / 2**20
    return {
        "early_mb": early_mb,
        "late_mb": late_mb,
        "growth": late_mb / early_mb - 1,
        "flat": late_mb <= 1.05 * early_mb,
    }


def plot_rss(rss: list[tuple[float, int]], verdict: dict, duration: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot([t for t, _ in rss], [value / 2**20 for _, value in rss], color="tab:blue", label="server RSS")
    for start, end, label in ((duration / 10, duration / 5, "first tenth"), (0.9 * duration, duration, "last tenth")):
        axis.axvspan(start, end, color="tab:gray", alpha=0.2)
        axis.text((start + end) / 2, axis.get_ylim()[0], label, ha="center", va="bottom", fontsize=8)
    axis.set_xlabel("seconds since the load started")
    axis.set_ylabel("MiB (API + model processes)")
    axis.set_title(f"RSS under load: {verdict['growth']:+.1%} from first to last tenth")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_markdown(results: dict, path: Path) -> None:
    settings, load, rss = results["settings"], results["load"], results["rss"]
    lines = [
        "# `diff-transformer serve` under load",
        "",
        f"Command: `{settings['command']}`. Verdict: **{'pass' if results['passed'] else 'FAIL'}**.",
        "",
        f"- Model: {settings['model']}; server flags: `{' '.join(settings['server_flags'])}`.",
        f"- {settings['clients']} clients for {settings['duration_s']:.0f} s, {settings['hostile_clients']} of them "
        f"hostile; machine: {settings['machine']}, load average (1, 5, 15 min) {settings['load_before']} before and "
        f"{settings['load_after']} after (a shared machine: the counts below vary with it, the verdict should not).",
        f"- Good answers equal to the same request's answer alone: {results['good_matched']} of "
        f"{results['good_sent']}; failed good requests: {load['error_count']}.",
        f"- Hostile requests with the status expected: {results['hostile_as_expected']} of {results['hostile_sent']}.",
        f"- RSS (API + model processes): {rss['early_mb']:.0f} MiB over the first tenth after warm-up, "
        f"{rss['late_mb']:.0f} MiB over the last tenth ({rss['growth']:+.1%}; flat means within +5%).",
        f"- /health after the load: {'200' if load['healthy_after'] else 'not 200'}.",
        "",
        "| request | expected | outcomes |",
        "| --- | --- | --- |",
    ]
    for name in load["good_names"]:
        lines.append(f"| {name} | its answer alone | {load['tallies'].get(name, {})} |")
    for name, expected in load["hostile_expected"].items():
        lines.append(f"| {name} | {expected} | {load['tallies'].get(name, {})} |")
    if load["mismatches"] or load["errors"]:
        lines += ["", "First mismatches and errors:", "", "```"]
        lines += [json.dumps(m, ensure_ascii=False) for m in load["mismatches"]] + load["errors"]
        lines.append("```")
    lines += ["", "![RSS over time](serve_load.png)", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model to serve (default: a tiny V2 built here)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--smoke", action="store_true", help="8 clients for 5 s")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for serve_load.{md,json,png}")
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.duration = 8, 5.0
    command = " ".join(["python", "-m", "benchmarks.system.serve_load", *(argv if argv is not None else sys.argv[1:])])

    with tempfile.TemporaryDirectory() as work:
        model = args.model or str(tiny_model(Path(work) / "tiny-v2"))
        flags = ("--api-key", KEY, "--num-blocks", "64")
        load_before = [round(x, 2) for x in os.getloadavg()]
        with start_server(model, *flags, timeout=300) as (base, process):
            load = run_load(base, psutil.Process(process.pid), args.clients, args.duration)
        load_after = [round(x, 2) for x in os.getloadavg()]

    good_sent = sum(sum(load["tallies"].get(name, {}).values()) for name in load["good_names"]) + load["error_count"]
    good_matched = sum(load["tallies"].get(name, {}).get("match", 0) for name in load["good_names"])
    hostile_sent = sum(sum(load["tallies"].get(name, {}).values()) for name in load["hostile_expected"])
    hostile_ok = sum(load["tallies"].get(name, {}).get("as expected", 0) for name in load["hostile_expected"])
    rss = rss_verdict(load["rss"], args.duration)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    results = {
        "settings": {
            "command": command,
            "model": args.model or "tiny DiffTransformer V2 (hidden 64, 2 layers, context 2048, random weights)",
            "server_flags": ["--api-key", "KEY", *flags[2:]],
            "clients": args.clients,
            "hostile_clients": args.clients // 4,
            "duration_s": args.duration,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}",
            "load_before": load_before,
            "load_after": load_after,
        },
        "load": load,
        "rss": rss,
        "good_sent": good_sent,
        "good_matched": good_matched,
        "hostile_sent": hostile_sent,
        "hostile_as_expected": hostile_ok,
    }
    results["passed"] = (
        good_sent > 0
        and good_matched == good_sent
        and hostile_sent > 0
        and hostile_ok == hostile_sent
        and load["healthy_after"]
        and rss["flat"]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    plot_rss(load["rss"], rss, args.duration, args.out / "serve_load.png")
    write_markdown(results, args.out / "serve_load.md")
    print((args.out / "serve_load.md").read_text())
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

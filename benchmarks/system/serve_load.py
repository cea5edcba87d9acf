#!/usr/bin/env python
"""Load test of `diff-transformer serve`: 32 concurrent clients for a minute, a quarter of them hostile.

A correctness and memory test, not a speed one. One server (continuous batching, the default; an API key; a request
timeout of 5 s) serves a tiny DiffTransformer V2 (hidden 64, 2 layers, context 2048, random weights, a byte-level BPE
tokenizer trained on Python's docs), or `--model`. Then:

- reference answers: each good request, sent alone to the idle server, not streamed;
- load: `--clients` threads for `--duration` seconds. Three in four are good clients, each cycling through the good
  requests and checking every answer against its reference: greedy chat, seeded sampled chat, streamed chat (its
  stream must end with `data: [DONE]`), a stop string, a completion, an answer cut inside a multi-byte character
  (streamed and not), the model named with a trailing slash, as ./relative and absolute paths, `bearer` in lower
  case, integer settings where generate() takes floats. The others are hostile, and each request must get exactly
  the status expected: empty prompts, bodies over the limit, wrong types, numbers of 400 digits, lone surrogates,
  the chat template's own arguments, a reasoning item with a role, a logit_bias key "²", `max_tokens` of 10^9,
  prompts past the context, no API key, malformed JSON, HEAD /health; clients that leave mid-request and mid-stream;
  connections that send nothing, one byte a second, or a Content-Length of 10^12 (each must be dropped within the
  timeout);
- the server's RSS every half second.

It passes when every good answer equals its reference, every hostile request gets the outcome expected, no request
gets a 5xx, /health still answers, and the RSS is flat: its median over the last tenth of the load is within 5% of
the median over the first tenth after a warm-up of a tenth. The machine's load is recorded: on a shared machine the
request counts vary, the verdict should not.

    python -m benchmarks.system.serve_load            # 32 clients for 60 s
    python -m benchmarks.system.serve_load --smoke    # 8 clients for 5 s (a test runs this)

Results: benchmarks/results/serve_load/serve_load.{md,json,png} (`--out` elsewhere).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
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
from modeling_diff_eval.corpus import python_docs_texts
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from benchmarks.harness import report
from benchmarks.harness.servers import start_server
from modeling_diff import DiffTransformerConfig, DiffTransformerForCausalLM

KEY = "load-test-key"
CONTEXT = 2048
MAX_TOKENS = 24
LIMIT_BYTES = 1024 * 1024  # the server's default --max-request-bytes
TIMEOUT = 5  # the server's --request-timeout
SERVER_FLAGS = ("--api-key", KEY, "--num-blocks", "64", "--request-timeout", str(TIMEOUT))
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


def cut_inside_a_character(folder: str) -> tuple[str, int] | None:
    """A question and a max_tokens at which the model's greedy answer ends inside a multi-byte character (its text
    ends with U+FFFD), from generate() here; None if no answer of up to MAX_TOKENS tokens does."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        tokens = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids.shape[1] :].tolist()
        for n in range(2, len(tokens) + 1):
            if tokenizer.decode(tokens[:n], skip_special_tokens=True).endswith("\ufffd"):
                return question, n
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Requests: each returns what to compare (a good one: its answer; a hostile one: its HTTP status, or how it ended).


def chat_body(question: str, **settings) -> dict:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": MAX_TOKENS, **settings}


def good_requests(model: str, cut: tuple[str, int] | None) -> list[tuple[str, str, dict, dict]]:
    """(name, kind, body, extra headers): kind is chat, stream or completion; each compared with its reference, the
    answer of `reference_of(name)` alone, not streamed."""
    jobs = []
    for i, question in enumerate(QUESTIONS):
        jobs.append((f"greedy {i}", "chat", chat_body(question, temperature=0), {}))
        jobs.append((f"sampled {i}", "chat", chat_body(question, temperature=0.8, top_p=0.9, seed=i), {}))
    jobs.append(("streamed", "stream", chat_body(QUESTIONS[1], temperature=0), {}))
    jobs.append(("stop", "chat", chat_body(QUESTIONS[2], temperature=0, stop=["e", "\n"]), {}))
    jobs.append(("completion", "completion", {"prompt": "import", "max_tokens": MAX_TOKENS, "temperature": 0}, {}))
    if cut is not None:
        body = chat_body(cut[0], temperature=0, max_tokens=cut[1])
        jobs += [("cut in a character", "chat", body, {}), ("cut in a character, streamed", "stream", body, {})]
    for label, name in (("slash", f"{model}/"), ("./relative", f"./{os.path.relpath(model)}"),
                        ("absolute", os.path.abspath(model))):
        jobs.append((f"model {label}", "chat", chat_body(QUESTIONS[0], temperature=0, model=name), {}))
    lower = {"Authorization": f"bearer {KEY}"}
    jobs.append(("bearer lower case", "chat", chat_body(QUESTIONS[3], temperature=0), lower))
    body = chat_body(QUESTIONS[4], temperature=1, top_p=1, seed=5, frequency_penalty=0)
    jobs.append(("integer settings", "chat", body, {}))
    return jobs


def reference_of(name: str) -> str:
    """The good request whose answer alone (not streamed) a good request must equal."""
    return {"cut in a character, streamed": "cut in a character", "streamed": "greedy 1"}.get(
        name, "greedy 0" if name.startswith("model ") else name
    )


def send_good(client: httpx.Client, kind: str, body: dict, headers: dict) -> str:
    if kind == "completion":
        reply = client.post("/v1/completions", json=body, headers=headers)
        reply.raise_for_status()
        return reply.json()["choices"][0]["text"]
    if kind == "chat":
        reply = client.post("/v1/chat/completions", json=body, headers=headers)
        reply.raise_for_status()
        return reply.json()["choices"][0]["message"]["content"]
    pieces, last = [], None
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=headers) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                pieces.append(choices[0].get("delta", {}).get("content") or "")
            last = line or last
    if last != "data: [DONE]":
        raise ValueError(f"the stream ended with {last!r}, not data: [DONE]")
    return "".join(pieces)


def held_connection(port: int, send) -> str:
    """A raw connection that sends `send(sock)` and then nothing: "dropped" if the server closes it within the
    timeout (and a second), with the status it answered first, if any."""
    started, received = time.monotonic(), b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        try:
            send(sock)
            sock.settimeout(TIMEOUT + 1)
            while data := sock.recv(65536):
                received += data
        except TimeoutError:
            return "still open"
        except OSError:
            pass  # reset: dropped
    status = received[9:12].decode() + " " if received.startswith(b"HTTP/1.1 ") else ""
    return f"{status}dropped" if time.monotonic() - started <= 2 * TIMEOUT + 1 else "held too long"


def trickle(sock):
    for byte in b"POST /v1/completions HTTP/1.1\r\n":
        sock.sendall(bytes([byte]))
        time.sleep(1)


def hostile_requests(port: int) -> dict[str, tuple]:
    """name: (function(client, base) -> status or outcome, the outcome expected)."""
    long_prompt = chat_body("x " * (CONTEXT * 4))
    long_answer = {"prompt": "def", "max_tokens": CONTEXT - 10, "temperature": 0}
    huge = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {10**12}\r\n\r\n")

    def post(path, body):  # json.dumps: big integers whole, lone surrogates as escapes
        return lambda client, base: client.post(
            path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        ).status_code

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

    big = 10**400
    return {
        "empty prompt": (post("/v1/completions", {"prompt": ""}), 422),
        "body over the limit": (post("/v1/chat/completions", chat_body("x " * (LIMIT_BYTES // 2 + 10))), 413),
        "bare string part": (post("/v1/chat/completions", {"messages": [{"role": "user", "content": ["Hi"]}]}), 422),
        "seed 2^70": (post("/v1/chat/completions", chat_body("hi", seed=2**70)), 422),
        "temperature string": (post("/v1/chat/completions", chat_body("hi", temperature="hot")), 422),
        "logit_bias types": (post("/v1/chat/completions", chat_body("hi", logit_bias={"a": "b"})), 422),
        "stop type": (post("/v1/chat/completions", chat_body("hi", stop=[1])), 422),
        "400 digits: temperature": (post("/v1/chat/completions", chat_body("hi", temperature=big)), 422),
        "400 digits: max_tokens": (post("/v1/completions", {"prompt": "def", "max_tokens": big}), 422),
        "400 digits: seed": (post("/v1/responses", {"input": "hi", "seed": big}), 422),
        "400 digits: frequency_penalty": (post("/v1/chat/completions", chat_body("hi", frequency_penalty=big)), 422),
        "lone surrogate: content": (post("/v1/chat/completions", chat_body("a\ud800")), 422),
        "lone surrogate: prompt": (post("/v1/completions", {"prompt": "\ud800"}), 422),
        "lone surrogate: input": (post("/v1/responses", {"input": "\ud800"}), 422),
        "template arguments": (
            post("/v1/chat/completions", chat_body("hi", chat_template_kwargs={"messages": [], "conversations": []})),
            422,
        ),
        "reasoning item with a role": (
            post("/v1/responses", {"input": [{"role": "user", "type": "reasoning", "content": "hi"}]}), 422
        ),
        "logit_bias key ²": (post("/v1/chat/completions", chat_body("hi", logit_bias={"²": 1})), 422),
        "max_tokens 10^9": (post("/v1/completions", {"prompt": "def", "max_tokens": 10**9}), 400),
        "prompt past the context": (post("/v1/chat/completions", long_prompt), 400),
        "no API key": (without_key, 401),
        "malformed JSON": (malformed, 422),
        "HEAD /health": (lambda client, base: httpx.head(f"{base}/health", timeout=60).status_code, 200),
        "leaves mid-request": (leaves, "left"),
        "leaves mid-stream": (leaves_stream, "left"),
        "sends nothing": (lambda client, base: held_connection(port, lambda sock: None), "dropped"),
        "one byte a second": (lambda client, base: held_connection(port, trickle), "dropped"),
        "Content-Length 10^12": (lambda client, base: held_connection(port, lambda s: s.sendall(huge.encode())),
                                 "413 dropped"),
    }


# ---------------------------------------------------------------------------------------------------------------------


def rss_bytes(process: psutil.Process) -> int:
    """The RSS of the server's process and its children."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_load(base: str, server: psutil.Process, model: str, clients: int, duration: float) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    good = good_requests(model, cut_inside_a_character(model))
    hostile = hostile_requests(int(base.rsplit(":", 1)[1]))
    server_errors = Counter()  # request name -> 5xx count

    def count_5xx(response):
        if response.status_code >= 500:
            server_errors[response.request.url.path] += 1

    def client_of():
        return httpx.Client(base_url=base, headers=headers, timeout=300, event_hooks={"response": [count_5xx]})

    with client_of() as client:  # the references: each request alone, not streamed
        references = {name: send_good(client, "chat" if kind == "stream" else kind, body, extra)
                      for name, kind, body, extra in good}

    tallies = defaultdict(Counter)  # request name -> outcome -> count
    mismatches, errors = [], []
    rss = []  # (seconds since the load started, bytes)
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + duration

    def good_client(offset: int):
        with client_of() as client:
            for name, kind, body, extra in itertools.islice(itertools.cycle(good), offset, None):
                if time.monotonic() > deadline:
                    return
                try:
                    answer = send_good(client, kind, body, extra)
                except Exception as error:  # counted: any failure of a good request fails the test
                    with lock:
                        errors.append(f"{name}: {type(error).__name__}: {error}")
                    continue
                expected = references[reference_of(name)]
                with lock:
                    tallies[name]["match" if answer == expected else "mismatch"] += 1
                    if answer != expected:
                        mismatches.append({"request": name, "alone": expected, "under load": answer})

    def hostile_client(offset: int):
        kinds = list(hostile.items())
        with client_of() as client:
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
    # each client starts at its own place in the cycle, spread over it
    threads += [threading.Thread(target=hostile_client, args=(i * len(hostile) // max(hostile_count, 1),))
                for i in range(hostile_count)]
    threads += [threading.Thread(target=good_client, args=(i * len(good) // (clients - hostile_count),))
                for i in range(clients - hostile_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    healthy = httpx.get(f"{base}/health", timeout=30).status_code == 200
    return {
        "references": references,
        "tallies": {name: dict(counts) for name, counts in tallies.items()},
        "good_names": [name for name, _, _, _ in good],
        "hostile_expected": {name: expected for name, (_, expected) in hostile.items()},
        "mismatches": mismatches[:20],
        "errors": errors[:20],
        "error_count": len(errors),
        "server_errors": dict(server_errors),
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
    axis.set_ylabel("MiB (server process)")
    axis.set_title(f"RSS under load: {verdict['growth']:+.1%} from first to last tenth")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(results: dict, info: dict) -> str:
    settings, load, rss = results["settings"], results["load"], results["rss"]
    lines = report.header(
        "`diff-transformer serve` under load",
        settings["command"],
        info,
        f"Model: {settings['model']}; server flags: `{' '.join(settings['server_flags'])}`",
        f"{settings['clients']} clients for {settings['duration_s']:.0f} s, {settings['hostile_clients']} of them "
        f"hostile; OMP_NUM_THREADS={settings['omp_threads']} (a shared machine: the counts below vary with its load, "
        "the verdict should not)",
    )
    lines += [
        f"Verdict: **{'pass' if results['passed'] else 'FAIL'}**.",
        "",
        f"- Good answers equal to the same request's answer alone: {results['good_matched']} of "
        f"{results['good_sent']}; failed good requests: {load['error_count']}.",
        f"- Hostile requests with the outcome expected: {results['hostile_as_expected']} of "
        f"{results['hostile_sent']}.",
        f"- Answers with a 5xx status, of all requests: {sum(load['server_errors'].values())}.",
        f"- RSS of the server: {rss['early_mb']:.0f} MiB over the first tenth after warm-up, {rss['late_mb']:.0f} MiB "
        f"over the last tenth ({rss['growth']:+.1%}; flat means within +5%).",
        f"- /health after the load: {'200' if load['healthy_after'] else 'not 200'}.",
        "",
        "| request | expected | outcomes |",
        "| --- | --- | --- |",
    ]
    for name in load["good_names"]:
        lines.append(f"| {name} | the answer of {reference_of(name)} alone | {load['tallies'].get(name, {})} |")
    for name, expected in load["hostile_expected"].items():
        lines.append(f"| {name} | {expected} | {load['tallies'].get(name, {})} |")
    if load["mismatches"] or load["errors"] or load["server_errors"]:
        lines += ["", "First mismatches and errors:", "", "```"]
        lines += [json.dumps(m, ensure_ascii=False) for m in load["mismatches"]] + load["errors"]
        lines += [f"5xx: {load['server_errors']}", "```"]
    lines += ["", "![RSS over time](serve_load.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model to serve (default: a tiny V2 built here)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--smoke", action="store_true", help="8 clients for 5 s")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for serve_load.{md,json,png}")
    args = report.parse_with_argv(parser, argv)
    if args.smoke:
        args.clients, args.duration = 8, 5.0
    info = report.machine_info()

    with tempfile.TemporaryDirectory() as work:
        model = args.model or str(tiny_model(Path(work) / "tiny-v2"))
        with start_server(model, *SERVER_FLAGS, timeout=300) as (base, process):
            load = run_load(base, psutil.Process(process.pid), model, args.clients, args.duration)

    tally = lambda names, outcome: sum(load["tallies"].get(name, {}).get(outcome, 0) for name in names)  # noqa: E731
    sent = lambda names: sum(sum(load["tallies"].get(name, {}).values()) for name in names)  # noqa: E731
    rss = rss_verdict(load["rss"], args.duration)
    results = {
        "settings": {
            "command": report.command("benchmarks.system.serve_load", args.argv),
            "model": args.model or "tiny DiffTransformer V2 (hidden 64, 2 layers, context 2048, random weights)",
            "server_flags": [flag if flag != KEY else "KEY" for flag in SERVER_FLAGS],
            "clients": args.clients,
            "hostile_clients": args.clients // 4,
            "duration_s": args.duration,
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        },
        "machine": info,
        "load": load,
        "rss": rss,
        "good_sent": sent(load["good_names"]) + load["error_count"],
        "good_matched": tally(load["good_names"], "match"),
        "hostile_sent": sent(load["hostile_expected"]),
        "hostile_as_expected": tally(load["hostile_expected"], "as expected"),
    }
    results["passed"] = (
        results["good_sent"] > 0
        and results["good_matched"] == results["good_sent"]
        and results["hostile_sent"] > 0
        and results["hostile_as_expected"] == results["hostile_sent"]
        and not load["server_errors"]
        and load["healthy_after"]
        and rss["flat"]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_text(args.out / "serve_load.json", json.dumps(results, indent=1, ensure_ascii=False, default=str))
    plot_rss(load["rss"], rss, args.duration, args.out / "serve_load.png")
    report.write_results(args.out / "serve_load.md", markdown(results, info))
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

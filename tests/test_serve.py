"""`diff-transformer serve` end to end: real servers on 127.0.0.1, real clients (openai, httpx, raw sockets).

Module-scoped servers: a batching server per variant (a Llama converted to V2, behind an API key given by the
environment; a V1 model), and one answering one request at a time (V1). The request models and the answer's text
stream are also tested without a server.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import psutil
import pytest
import torch
from helpers import assert_one_line_error, run_cli, tiny_tokenizer
from modeling_diff_conversion import convert
from modeling_diff_serving import ServeArguments, ServingError
from modeling_diff_serving.engine import Answer
from modeling_diff_serving.schemas import ChatRequest, CompletionRequest, ResponseRequest, problem
from openai import OpenAI
from pydantic import ValidationError
from tokenizers import decoders
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from benchmarks.harness.servers import free_port, read_output, start_server
from modeling_diff import DiffTransformerConfig, DiffTransformerForCausalLM

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
QUESTIONS = ["def main():", "What does the with statement do?", "import os"]
MAX_TOKENS = 12
KEY = "test-key-0123"
CONTEXT = 2048
TIMEOUT = 2  # --request-timeout: seconds for a request's head, then its body
# a paged cache of 16 blocks of 256 tokens: two requests of the whole context, not transformers' share of the RAM
FLAGS = ("--num-blocks", "16", "--request-timeout", str(TIMEOUT))


def sizes(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def peak(model):
    """Scale q and k so that the maps are peaked: a wrong pairing or cache layout then changes the answer."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def served_models(tmp_path_factory):
    """A tiny Llama converted to V2 by the converter, and a tiny V1 model, each saved with a chat tokenizer."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    llama = peak(LlamaForCausalLM(LlamaConfig(**sizes(len(tokenizer)))))
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    convert(str(root / "llama"), str(root / "converted-v2"), progress=False)
    v1 = peak(DiffTransformerForCausalLM(DiffTransformerConfig(diff_version=1, **sizes(len(tokenizer)))))
    v1.save_pretrained(root / "v1")
    tokenizer.save_pretrained(root / "v1")
    return root


class Server:
    """A running `diff-transformer serve`: its URL, model folder, HTTP headers (with its key) and process."""

    def __init__(self, base, folder, process, key=None):
        self.base, self.folder, self.process = base, folder, process
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = OpenAI(base_url=f"{base}/v1", api_key=key or "unused")

    def post(self, path, timeout=60, headers=None, **kwargs):
        return httpx.post(f"{self.base}{path}", headers=headers or self.headers, timeout=timeout, **kwargs)

    def chat(self, question, model=None, **settings):
        reply = self.client.chat.completions.create(
            model=model or str(self.folder), messages=[{"role": "user", "content": question}], **settings
        )
        return reply.choices[0].message.content

    def stream(self, path, body) -> list[str]:
        """The lines of a streamed answer, raw."""
        with httpx.stream("POST", f"{self.base}{path}", json=body, headers=self.headers, timeout=60) as reply:
            assert reply.status_code == 200, reply.read()
            return [line for line in reply.iter_lines() if line]


@pytest.fixture(scope="module", params=["converted-v2", "v1"])
def batched(request, served_models):
    """A continuous-batching server per variant; the V2 one requires the API key, given by the environment."""
    folder = served_models / request.param
    key = KEY if request.param == "converted-v2" else None
    env = {"DIFF_TRANSFORMER_API_KEY": key} if key else {}
    with start_server(folder, *FLAGS, timeout=180, env=env) as (base, process):
        yield Server(base, folder, process, key)


@pytest.fixture(scope="module")
def one_at_a_time(served_models):
    folder = served_models / "v1"
    with start_server(folder, "--no-continuous-batching", timeout=180) as (base, process):
        yield Server(base, folder, process)


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


@pytest.fixture(scope="module")
def references(served_models):
    """What `generate()` answers to each question on the chat template: (greedy, sampled with seed 7, the greedy
    answer's token ids)."""
    answers = {}
    for name in ("converted-v2", "v1"):
        model = AutoModelForCausalLM.from_pretrained(served_models / name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(served_models / name)
        for question in QUESTIONS:
            ids = chat_ids(tokenizer, question)
            greedy = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids.shape[1] :]
            torch.manual_seed(7)
            sampled = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=True, temperature=1.0)
            sampled = sampled[0, ids.shape[1] :]
            decode = lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True)  # noqa: E731
            answers[name, question] = (decode(greedy), decode(sampled), greedy.tolist(), tokenizer)
    return answers


def greedy(references, server, question):
    return references[server.folder.name, question][0]


@pytest.mark.slow
def test_greedy_answers_like_generate_whatever_ran_before(batched, references):
    expected = [greedy(references, batched, question) for question in QUESTIONS]
    assert len(set(expected)) == len(QUESTIONS)  # the answers tell the questions apart
    # a sampled request first, then greedy ones: each equals generate()
    batched.chat(QUESTIONS[0], max_tokens=MAX_TOKENS, temperature=1.0)
    assert batched.chat(QUESTIONS[0], max_tokens=MAX_TOKENS, temperature=0) == expected[0]

    # greedy and sampled requests at once: the greedy ones (batched together) still equal generate()
    def ask(job):
        question, temperature = job
        return batched.chat(question, max_tokens=MAX_TOKENS, temperature=temperature)

    jobs = [(question, temperature) for question in QUESTIONS for temperature in (0, 1.0)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers[0::2] == expected

    # streamed: several chunks, the same text
    stream = batched.client.chat.completions.create(
        model=str(batched.folder),
        messages=[{"role": "user", "content": QUESTIONS[1]}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == expected[1]


@pytest.mark.slow
def test_an_answer_that_ends_inside_a_character_streams_whole(batched, references):
    # a greedy answer cut, by max_tokens, after the first byte of a multi-byte character: generate()'s text ends with
    # U+FFFD; streamed and not, the server's too (the stream's decoder is flushed at the end)
    cuts = []
    for question in QUESTIONS:
        _, _, tokens, tokenizer = references[batched.folder.name, question]
        cuts += [(question, n) for n in range(2, len(tokens) + 1) if tokenizer.decode(tokens[:n]).endswith("\ufffd")]
    assert cuts, "no greedy answer here ends inside a character: pick other questions"
    for question, n in cuts[:3]:
        _, _, tokens, tokenizer = references[batched.folder.name, question]
        expected = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": n, "temperature": 0}
        whole = batched.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        lines = batched.stream("/v1/chat/completions", {**body, "stream": True})
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        streamed = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
        assert whole == streamed == expected, (question, n)


@pytest.mark.slow
def test_each_request_samples_with_its_own_settings(batched, references):
    question = QUESTIONS[2]
    expected_greedy, expected_sampled, _, _ = references[batched.folder.name, question]
    # a greedy request first, then a sampled one with a seed: generate()'s answer with that seed, not a greedy one
    assert batched.chat(question, max_tokens=MAX_TOKENS, temperature=0) == expected_greedy
    assert expected_sampled != expected_greedy
    assert batched.chat(question, max_tokens=MAX_TOKENS, temperature=1.0, seed=7) == expected_sampled
    # the same seed again, among concurrent sampled and greedy requests: the same answer
    jobs = [dict(temperature=1.0, seed=7), dict(temperature=1.0), dict(temperature=0), dict(temperature=1.0, seed=7)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda settings: batched.chat(question, max_tokens=MAX_TOKENS, **settings), jobs))
    assert answers[0] == answers[3] == expected_sampled
    assert answers[2] == expected_greedy


def stop_string(answer: str) -> tuple[str, int]:
    """A two-character piece of `answer` (none of it U+FFFD), after its first two characters, and where it starts."""
    for index in range(2, len(answer) - 1):
        if "\ufffd" not in answer[index : index + 2] and answer.find(answer[index : index + 2]) == index:
            return answer[index : index + 2], index
    raise AssertionError(f"no stop string in {answer!r}")


@pytest.mark.slow
def test_stop_strings_end_the_answer_with_batching(batched, references):
    expected = greedy(references, batched, QUESTIONS[0])
    stop, index = stop_string(expected)
    reply = batched.client.chat.completions.create(
        model=str(batched.folder),
        messages=[{"role": "user", "content": QUESTIONS[0]}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stop=[stop, "never in it"],
    )
    assert reply.choices[0].message.content == expected[:index]
    assert reply.choices[0].finish_reason == "stop"
    stream = batched.client.chat.completions.create(
        model=str(batched.folder),
        messages=[{"role": "user", "content": QUESTIONS[0]}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stop=stop,
        stream=True,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[:index]
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_streams_end_with_done(batched):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0, "stream": True}
    assert batched.stream("/v1/chat/completions", chat)[-1] == "data: [DONE]"
    completion = {"prompt": "def", "max_tokens": 3, "temperature": 0, "stream": True}
    assert batched.stream("/v1/completions", completion)[-1] == "data: [DONE]"
    # the Responses API ends as OpenAI's does: with response.completed
    lines = batched.stream("/v1/responses", {"input": "hi", "max_output_tokens": 3, "temperature": 0, "stream": True})
    assert json.loads(lines[-1][6:])["type"] == "response.completed"


@pytest.mark.slow
def test_the_model_may_be_named_as_the_client_likes(batched, references):
    # the docs' client example names the folder with a trailing slash; ./relative and absolute paths name it too
    expected = greedy(references, batched, QUESTIONS[1])
    for model in (f"{batched.folder}/", f"./{os.path.relpath(batched.folder)}", str(batched.folder.resolve())):
        assert batched.chat(QUESTIONS[1], model=model, max_tokens=MAX_TOKENS, temperature=0) == expected, model
    listed = httpx.get(f"{batched.base}/v1/models", headers=batched.headers).json()["data"]
    assert [model["id"] for model in listed] == [str(batched.folder)]


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BIG = 10**400  # a number of 400 digits
HOSTILE_BODIES = {  # endpoint, body, expected status, a word of the detail
    "empty prompt": ("/v1/completions", {"prompt": ""}, 422, "prompt"),
    "max_tokens 1e9": ("/v1/completions", {"prompt": "def", "max_tokens": 1e9}, 422, "max_tokens"),
    "max_tokens past the context": ("/v1/completions", {"prompt": "def", "max_tokens": 10**9}, 400, "context"),
    "a bare string part": (
        "/v1/chat/completions", {"messages": [{"role": "user", "content": ["Hi"]}]}, 422, "content"
    ),
    "a part without type": (
        "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"text": "Hi"}]}]}, 422, "type"
    ),
    "non-string text": (
        "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, 422, "text"
    ),
    "seed 2^70": ("/v1/chat/completions", {**CHAT, "seed": 2**70}, 422, "seed"),
    "logit_bias types": ("/v1/chat/completions", {**CHAT, "logit_bias": {"a": "b"}}, 422, "logit_bias"),
    "logit_bias key ²": ("/v1/chat/completions", {**CHAT, "logit_bias": {"²": 1}}, 422, "token ids"),
    "frequency_penalty type": ("/v1/chat/completions", {**CHAT, "frequency_penalty": "x"}, 422, "frequency_penalty"),
    "tools type": ("/v1/chat/completions", {**CHAT, "tools": "x"}, 422, "tools"),
    "stop type": ("/v1/chat/completions", {**CHAT, "stop": [1]}, 422, "stop"),
    "chat_template_kwargs messages": (
        "/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"messages": []}}, 422, "messages"
    ),
    "chat_template_kwargs conversations": (
        "/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"conversations": []}}, 422, "conversations"
    ),
    "generation_config (gone)": (
        "/v1/chat/completions", {**CHAT, "generation_config": '{"do_sample": true}'}, 422, "generation_config"
    ),
    "responses input type": ("/v1/responses", {"input": 3}, 422, "input"),
    "responses bad item": ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "x"}]}]}, 422, "type"),
    "responses reasoning with a role": (
        "/v1/responses", {"input": [{"role": "user", "type": "reasoning", "content": "hi"}]}, 422, "role"
    ),
    "another model": ("/v1/completions", {"prompt": "def", "model": "gpt-4"}, 400, "gpt-4"),
    "unknown field": ("/v1/completions", {"prompt": "def", "prompt_logprobs": 1}, 422, "prompt_logprobs"),
}
# a number of 400 digits in each number field of each endpoint: refused (422), or ignored where the field is
BIG_NUMBERS = [
    ("/v1/chat/completions", {**CHAT, field: BIG}, 422)
    for field in ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "frequency_penalty")
] + [
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": BIG}}, 422),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": BIG}, 200),  # ignored
    *[("/v1/completions", {"prompt": "def", "max_tokens": 2, field: BIG}, 422) for field in ("max_tokens", "seed")],
    *[("/v1/responses", {"input": "hi", "max_output_tokens": 2, field: BIG}, 422)
      for field in ("max_output_tokens", "top_p")],
]
# a lone surrogate (JSON's "\ud800") where text goes
SURROGATES = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]}),
    ("/v1/completions", {"prompt": "\ud800"}),
    ("/v1/responses", {"input": "\ud800"}),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "\ud800"}]}]}),
]


@pytest.mark.slow
def test_hostile_requests_are_refused_and_it_keeps_serving(batched, references):
    for name, (path, body, status, word) in HOSTILE_BODIES.items():
        reply = batched.post(path, json=body)
        assert reply.status_code == status and word in reply.json()["detail"], (name, reply.text)
    headers = {**batched.headers, "Content-Type": "application/json"}
    for path, body, status in BIG_NUMBERS:
        reply = batched.post(path, content=json.dumps(body).encode(), headers=headers)
        assert reply.status_code == status, (body, reply.text)
    for path, body in SURROGATES:  # json.dumps writes a lone surrogate as the escape \ud800
        reply = batched.post(path, content=json.dumps(body).encode(), headers=headers)
        assert reply.status_code == 422 and "JSON" in reply.json()["detail"], (body, reply.text)
    # NaN is not JSON, but Python's json reads it
    reply = batched.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"}], '
                         b'"temperature": NaN}', headers=headers)
    assert reply.status_code == 422, reply.text
    # a chat prompt of ~240 KB: longer than the context
    reply = batched.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x " * 120_000}]})
    assert reply.status_code == 400 and "tokens" in reply.json()["detail"]
    # a body over the limit (1 MiB by default)
    reply = batched.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x " * 600_000}]})
    assert reply.status_code == 413
    reply = batched.post("/v1/chat/completions", content=b"{not json", headers=headers)
    assert reply.status_code == 422 and "JSON" in reply.json()["detail"]
    # integer settings where generate() takes floats are answered
    for settings in ({"temperature": 1}, {"frequency_penalty": 0, "top_p": 1}):
        reply = batched.post("/v1/chat/completions", json={**CHAT, **settings})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2, reply.text
    # still serving, and right
    assert httpx.get(f"{batched.base}/health").json() == {"status": "ok"}
    expected = greedy(references, batched, QUESTIONS[1])
    assert batched.chat(QUESTIONS[1], max_tokens=MAX_TOKENS, temperature=0) == expected
    # /v1/completions and /v1/responses answer too
    reply = batched.post("/v1/completions", json={"prompt": "import", "max_tokens": 3, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    reply = batched.post(
        "/v1/responses", json={"input": QUESTIONS[1], "max_output_tokens": MAX_TOKENS, "temperature": 0}
    )
    assert reply.status_code == 200 and reply.json()["output"][0]["content"][0]["text"] == expected


@pytest.mark.slow
def test_admin_endpoints_are_gone(batched):
    assert batched.post("/reset").status_code == 404
    assert batched.post("/load_model", json={"model": str(batched.folder)}).status_code == 404


@pytest.mark.slow
@pytest.mark.parametrize("batched", ["converted-v2"], indirect=True)
def test_api_key_is_required_but_for_health(batched):
    assert batched.headers  # this server has a key
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    url = f"{batched.base}/v1/chat/completions"
    assert httpx.post(url, json=chat).status_code == 401
    assert httpx.post(url, json=chat, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url, json=chat, headers={"Authorization": KEY}).status_code == 401
    assert httpx.get(f"{batched.base}/v1/models").status_code == 401
    assert httpx.get(f"{batched.base}/health").status_code == 200
    assert httpx.head(f"{batched.base}/health").status_code == 200
    for scheme in ("Bearer", "bearer", "BEARER"):  # RFC 7235: the scheme is case-insensitive
        assert httpx.post(url, json=chat, headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200


def closes_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends before it closes `sock` (AssertionError if it is still open after `seconds`)."""
    received, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data
    raise AssertionError(f"still open after {seconds} s, having sent {received[:200]!r}")


@pytest.mark.slow
@pytest.mark.parametrize("batched", ["converted-v2"], indirect=True)
def test_connections_that_hold_the_server_are_dropped(batched):
    port = int(batched.base.rsplit(":", 1)[1])
    auth = f"Authorization: Bearer {KEY}\r\n"

    def silent():
        with socket.create_connection(("127.0.0.1", port)) as sock:
            return closes_within(sock, TIMEOUT + 3)

    def trickling():  # one byte every half second: the head never arrives in time
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n":
                try:
                    sock.sendall(bytes([byte]))
                except OSError:  # closed meanwhile
                    return b""
                time.sleep(0.5)
            return closes_within(sock, 3)

    def huge():  # a Content-Length of 10^12: refused at once, then dropped
        with socket.create_connection(("127.0.0.1", port)) as sock:
            head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {10**12}\r\n\r\n"
            sock.sendall(head.encode())
            return closes_within(sock, TIMEOUT + 3)

    def slow_body():  # 10 bytes of a body of 100, then nothing: 408, then dropped
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 100\r\n\r\n".encode())
            sock.sendall(b'{"prompt":')
            return closes_within(sock, 2 * TIMEOUT + 3)

    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(job) for job in (silent, trickling, huge, slow_body)]
        received = [job.result() for job in jobs]
    assert received[0] == b"" and b"200" not in received[1]
    assert received[2].startswith(b"HTTP/1.1 413") and received[3].startswith(b"HTTP/1.1 408")
    assert httpx.get(f"{batched.base}/health").status_code == 200


def cpu_seconds(process: psutil.Process, duration: float) -> float:
    """CPU seconds `process` uses over the next `duration` seconds."""
    before = sum(process.cpu_times()[:2])
    time.sleep(duration)
    return sum(process.cpu_times()[:2]) - before


def assert_cancelled_when_the_client_leaves(server, body):
    """A request for the whole context, not streamed, whose client leaves after 2 s: the server goes idle."""
    process = psutil.Process(server.process.pid)
    outcome = []

    def leave():
        try:
            outcome.append(server.post("/v1/chat/completions", json=body, timeout=2).status_code)
        except httpx.TimeoutException as timeout:
            outcome.append(timeout)

    client = threading.Thread(target=leave)
    client.start()
    time.sleep(0.5)
    assert cpu_seconds(process, 1.0) > 0.3  # generating
    client.join()
    assert isinstance(outcome[0], httpx.TimeoutException), outcome  # it was still generating when the client left
    time.sleep(1)
    assert cpu_seconds(process, 1.0) < 0.1  # cancelled


LONG_ANSWER = {"messages": [{"role": "user", "content": "def"}], "max_tokens": CONTEXT - 20, "temperature": 0}


@pytest.mark.slow
@pytest.mark.parametrize("batched", ["v1"], indirect=True)
def test_a_batched_request_whose_client_leaves_is_cancelled(batched):
    assert_cancelled_when_the_client_leaves(batched, LONG_ANSWER)


@pytest.mark.slow
def test_a_request_whose_client_leaves_is_cancelled(one_at_a_time):
    assert_cancelled_when_the_client_leaves(one_at_a_time, {**LONG_ANSWER, "logit_bias": {"2": -100}})  # no EOS


@pytest.mark.slow
def test_sigterm_stops_a_busy_server(one_at_a_time):
    # a long streamed answer is running when SIGTERM comes: the server still stops, within its grace period
    first_chunk = threading.Event()

    def stream():
        body = {"prompt": "def", "max_tokens": CONTEXT - 10, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", f"{one_at_a_time.base}/v1/completions", json=body, timeout=120) as reply:
                for _ in reply.iter_lines():
                    first_chunk.set()
        except httpx.TransportError:  # the server went away mid-stream
            pass

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    assert first_chunk.wait(60)
    one_at_a_time.process.send_signal(signal.SIGTERM)
    one_at_a_time.process.wait(timeout=30)  # raises if it does not stop


@pytest.mark.slow
def test_ctrl_c_says_what_happened(served_models):
    with start_server(served_models / "v1", "--no-continuous-batching", timeout=180) as (base, process):
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        output = read_output(process)
    assert process.returncode == 130
    lines = [line for line in output.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "server stopped" in lines[0] and "Traceback" not in output, output[-2000:]


FAULTY_SERVER = """\
import os, sys
from modeling_diff import DiffTransformerForCausalLM
from modeling_diff_cli.main import main

forward = DiffTransformerForCausalLM.forward

def fails_once_told(self, *args, **kwargs):
    if os.path.exists(sys.argv[1]):
        raise RuntimeError("injected fault")
    return forward(self, *args, **kwargs)

DiffTransformerForCausalLM.forward = fails_once_told
sys.exit(main(["serve", *sys.argv[2:]]))
"""


@pytest.mark.slow
def test_the_server_exits_when_its_model_dies(served_models, tmp_path):
    # the model's forward starts failing (a fault injected by this test): the batch dies with it, the request gets
    # 503, /health stops answering 200, and the server exits with status 3 and one `error:` line
    (tmp_path / "faulty.py").write_text(FAULTY_SERVER)
    trigger, port = tmp_path / "fail-now", free_port()
    output = open(tmp_path / "output.txt", "w+")
    process = subprocess.Popen(
        [sys.executable, str(tmp_path / "faulty.py"), trigger, served_models / "converted-v2", "--port", str(port),
         *FLAGS], stdout=output, stderr=subprocess.STDOUT, text=True,
    )
    try:
        server = Server(f"http://127.0.0.1:{port}", served_models / "converted-v2", process)
        for _ in range(600):
            if process.poll() is not None:
                break
            try:
                if httpx.get(f"{server.base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert server.post("/v1/chat/completions", json={**CHAT, "temperature": 0}).status_code == 200
        trigger.touch()
        reply = server.post("/v1/chat/completions", json={**CHAT, "temperature": 0})
        assert reply.status_code == 503 and "stopped" in reply.json()["detail"]
        try:
            assert httpx.get(f"{server.base}/health", timeout=5).status_code != 200
        except httpx.TransportError:
            pass  # already gone
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    output.seek(0)
    text = output.read()
    assert process.returncode == 3, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "injected fault" in errors[0] and "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(port=70000), "--port"),
        (dict(max_memory_percent=0), "--max-memory-percent"),
        (dict(max_memory_percent=1.5), "--max-memory-percent"),
        (dict(max_batch_tokens=0), "--max-batch-tokens"),
        (dict(num_blocks=0), "--num-blocks"),
        (dict(max_model_len=1), "--max-model-len"),
        (dict(max_request_bytes=10), "--max-request-bytes"),
        (dict(request_timeout=float("nan")), "--request-timeout"),
        (dict(log_level="loud"), "--log-level"),
        (dict(api_key=" "), "--api-key"),
        (dict(attn_implementation="eager"), "eager"),
        (dict(device="gpu"), "--device"),
        (dict(device="cuda:¹"), "--device"),
    ],
)
def test_bad_options_are_refused_before_loading(options, message):
    # what `serve` checks before it binds the port or loads anything (the CLI's one-line contract is
    # test_a_taken_port_fails_before_loading's)
    with pytest.raises(ServingError, match=message):
        ServeArguments(**options)
    ServeArguments()  # the defaults pass


@pytest.mark.slow
def test_a_taken_port_fails_before_loading(tmp_path):
    # weights that cannot load: the error is the port's, so the port was checked first
    (tmp_path / "config.json").write_text('{"model_type": "diff_transformer"}')
    (tmp_path / "model.safetensors").write_bytes(b"not weights")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("serve", tmp_path, "--port", taken.getsockname()[1])
    assert_one_line_error(result, "port")


@pytest.mark.slow
def test_a_paged_cache_that_cannot_fit_fails_at_start_up(served_models):
    result = run_cli("serve", served_models / "v1", "--port", free_port(), "--max-memory-percent", "0.0000001")
    assert_one_line_error(result, "paged KV cache")


@pytest.mark.slow
def test_serve_refuses_a_model_that_cannot_load(tmp_path, served_models):
    # no weights: refused before anything is loaded
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert_one_line_error(run_cli("serve", tmp_path / "empty", "--port", free_port()), "has no weights")
    # weights present but an unknown architecture: the load fails before the server starts
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no_such_model"}')
    (broken / "model.safetensors").write_bytes((served_models / "v1" / "model.safetensors").read_bytes())
    assert_one_line_error(run_cli("serve", broken, "--port", free_port()), "cannot load")


def test_request_models():
    # what each endpoint refuses, in one sentence naming the field (no server: the pydantic models themselves)
    def refusal(schema, body: dict | bytes) -> str:
        with pytest.raises(ValidationError) as refused:
            raw = body if isinstance(body, bytes) else json.dumps(body)
            schema.model_validate_json(raw, context={"vocab_size": 400})
        return problem(refused.value)

    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "stream": True}
    assert ChatRequest.model_validate_json(json.dumps(ok)).settings() == {"temperature": 0, "do_sample": False}
    parts = [{"type": "text", "text": "hi"}]
    request = ChatRequest.model_validate_json(json.dumps({**ok, "messages": [{"role": "user", "content": parts}]}))
    assert request.conversation() == [{"role": "user", "content": "hi"}]
    refused = {
        "messages": {"messages": []},
        "role": {"messages": [{"role": "robot", "content": "hi"}]},
        "content": {"messages": [{"role": "user"}]},
        "type": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "max_tokens": {**ok, "max_tokens": 0},
        "temperature": {**ok, "temperature": "hot"},
        "top_p": {**ok, "top_p": 0},
        "`n`": {**ok, "n": 2},
        "stream": {**ok, "stream": "yes"},
        "stop": {**ok, "stop": ["a", ""]},
        "below 400": {**ok, "logit_bias": {"400": 1}},
        "logit_bias.5": {**ok, "logit_bias": {"5": 101}},
        "tokenize": {**ok, "chat_template_kwargs": {"tokenize": False}},
        "`generation_config` is not a field": {**ok, "generation_config": "{}"},
        "`tools` is not a field": {**ok, "tools": []},
    }
    for word, body in refused.items():
        assert word in refusal(ChatRequest, body), word
    assert "finite" in refusal(ChatRequest, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
    assert "JSON" in refusal(CompletionRequest, b'{"prompt": "\\ud800"}')
    settings = ChatRequest.model_validate_json(json.dumps({**ok, "frequency_penalty": 0, "temperature": 1,
                                                           "seed": 3})).settings()
    assert settings == {"repetition_penalty": 1.0, "temperature": 1.0, "do_sample": True, "seed": 3}
    assert type(settings["repetition_penalty"]) is float and type(settings["temperature"]) is float
    assert CompletionRequest.model_validate_json('{"prompt": "def", "suffix": "x"}').prompt == "def"  # ignored
    assert "prompt" in refusal(CompletionRequest, {"prompt": ["def"]})
    conversation = ResponseRequest.model_validate_json(json.dumps({
        "instructions": "be brief",
        "input": [{"type": "reasoning", "summary": [{"type": "summary_text", "text": "t"}]},
                  {"role": "user", "content": "hi"}],
    })).conversation()
    assert conversation == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ResponseRequest.model_validate_json('{"input": [{"type": "input_text", "text": "hi"}]}').conversation() == [
        {"role": "user", "content": "hi"}
    ]
    assert "max_output_tokens" in refusal(ResponseRequest, {"input": "hi", "max_output_tokens": -1})
    two_items = {"input": [{"role": "user", "content": "hi"}, {"role": "user"}]}
    assert "`input[1]`" in refusal(ResponseRequest, two_items) and "content" in refusal(ResponseRequest, two_items)
    assert "`input[0]" in refusal(ResponseRequest, {"input": [{"type": "function_call", "call_id": "1"}]})  # gone


def test_answer_text_adds_up_and_holds_back_what_may_begin_a_stop_string():
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()
    # "é" is two bytes, C3 A9: with byte tokens, "ab" then the first byte alone ends inside the character
    ids = tokenizer("ab", add_special_tokens=False)["input_ids"] + tokenizer.convert_tokens_to_ids(["Ã", "©", "Ã"])

    async def pieces(stop=()):
        async def tokens():
            for token in ids:
                yield [token]

        answer = Answer(tokens(), tokenizer, eos={2}, stop=stop)
        return [piece async for piece in answer], answer

    received, answer = asyncio.run(pieces())
    assert "".join(received) == tokenizer.decode(ids) == "abé\ufffd" and received[-1] == "\ufffd"
    assert answer.completion_tokens == len(ids) and answer.finish_reason == "length"
    received, answer = asyncio.run(pieces(stop=("bé", "zz")))
    assert "".join(received) == "a" and answer.finish_reason == "stop"


@pytest.mark.slow
def test_load_test_smoke(tmp_path):
    """benchmarks/system/serve_load.py --smoke: a few seconds of good and hostile clients at once."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.system.serve_load", "--smoke", "--out", str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "serve_load.json").read_text())
    assert results["passed"] and results["good_matched"] == results["good_sent"] > 0
    assert results["hostile_as_expected"] == results["hostile_sent"] > 0
    assert (tmp_path / "serve_load.png").stat().st_size > 0

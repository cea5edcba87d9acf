"""`diff-transformer serve` end to end: real servers on 127.0.0.1, real HTTP clients (openai and httpx).

Module-scoped servers: a batching server per variant (a Llama converted to V2, behind an API key given by the
environment variable, and a V1 model), and one answering one request at a time (V1, admin endpoints on).
"""

import inspect
import json
import pkgutil
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
from helpers import assert_one_line_error, make_model, run_cli, tiny_tokenizer
from modeling_diff_conversion import load_model
from modeling_diff_cli.generate import prompt_ids
from modeling_diff_cli.serve import free_port, read_output, start_server
from modeling_diff_conversion import convert
from openai import OpenAI
from tokenizers import decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from modeling_diff import DiffTransformerConfig, DiffTransformerForCausalLM

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
QUESTIONS = ["def main():", "What does the with statement do?", "import os"]
MAX_TOKENS = 12
KEY = "test-key-0123"
CONTEXT = 2048
# a paged cache of 16 blocks of 256 tokens: two requests of the whole context, not transformers' share of the RAM
SMALL_CACHE = ("--num-blocks", "16")


def chat_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


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
    tokenizer = chat_tokenizer()
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

    def chat(self, question, **settings):
        reply = self.client.chat.completions.create(
            model=str(self.folder), messages=[{"role": "user", "content": question}], **settings
        )
        return reply.choices[0].message.content

    def model_process(self):
        """The process the server runs the model in (transformers serve spawns it)."""
        children = psutil.Process(self.process.pid).children()
        return max(children, key=lambda child: child.memory_info().rss)


@pytest.fixture(scope="module", params=["converted-v2", "v1"])
def batched(request, served_models):
    """A continuous-batching server per variant; the V2 one requires the API key, given by the environment."""
    folder = served_models / request.param
    key = KEY if request.param == "converted-v2" else None
    env = {"DIFF_TRANSFORMER_API_KEY": key} if key else {}
    with start_server(folder, *SMALL_CACHE, timeout=180, env=env) as (base, process):
        yield Server(base, folder, process, key)


@pytest.fixture(scope="module")
def one_at_a_time(served_models):
    folder = served_models / "v1"
    with start_server(folder, "--no-continuous-batching", "--enable-admin-endpoints", timeout=180) as (base, process):
        yield Server(base, folder, process)


@pytest.fixture(scope="module")
def references(served_models):
    """What `generate()` answers (greedily, and sampled with seed 7) to each question on the chat template."""
    answers = {}
    for name in ("converted-v2", "v1"):
        model, tokenizer = load_model(str(served_models / name))
        for question in QUESTIONS:
            ids = prompt_ids(tokenizer, question, chat=True)
            greedy = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
            torch.manual_seed(7)
            sampled = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=True, temperature=1.0)
            answers[name, question] = tuple(
                tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) for out in (greedy, sampled)
            )
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

    # streamed: several chunks, the same text (the streamer holds back a trailing incomplete UTF-8 sequence, which the
    # random tiny model may end on: decoded whole it shows as U+FFFD)
    stream = batched.client.chat.completions.create(
        model=str(batched.folder),
        messages=[{"role": "user", "content": QUESTIONS[1]}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == expected[1].rstrip("\ufffd")


@pytest.mark.slow
def test_each_request_samples_with_its_own_settings(batched, references):
    question = QUESTIONS[2]
    expected_greedy, expected_sampled = references[batched.folder.name, question]
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


HOSTILE_BODIES = {  # endpoint, body, expected status, a word of the detail
    "empty prompt": ("/v1/completions", {"prompt": ""}, 422, "empty"),
    "max_tokens 1e9": ("/v1/completions", {"prompt": "def", "max_tokens": 1e9}, 422, "max_tokens"),
    "max_tokens past the context": ("/v1/completions", {"prompt": "def", "max_tokens": 10**9}, 400, "context"),
    "a bare string part": ("/v1/chat/completions", {"messages": [{"role": "user", "content": ["Hi"]}]}, 422, "part"),
    "a part without type": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"text": "Hi"}]}]},
        422,
        "type",
    ),
    "non-string text": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
        422,
        "text",
    ),
    "seed 2^70": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "seed": 2**70},
        422,
        "seed",
    ),
    "logit_bias types": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"a": "b"}},
        422,
        "logit_bias",
    ),
    "frequency_penalty type": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": "x"},
        422,
        "frequency_penalty",
    ),
    "tools type": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "tools": "x"},
        422,
        "tools",
    ),
    "stop type": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 422, "stop"),
    "responses input type": ("/v1/responses", {"input": 3}, 422, "input"),
    "another model": ("/v1/completions", {"prompt": "def", "model": "gpt-4"}, 400, "gpt-4"),
    "responses bad item": ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "x"}]}]}, 422, "text"),
}


@pytest.mark.slow
def test_hostile_requests_are_refused_and_it_keeps_serving(batched, references):
    for name, (path, body, status, word) in HOSTILE_BODIES.items():
        reply = batched.post(path, json=body)
        assert reply.status_code == status and word in reply.json()["detail"], (name, reply.text)
    # NaN is not JSON, but Python's json reads it
    reply = batched.post(
        "/v1/chat/completions",
        content=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        headers={**batched.headers, "Content-Type": "application/json"},
    )
    assert reply.status_code == 422 and "temperature" in reply.json()["detail"]
    # a chat prompt of ~240 KB: longer than the context
    long_prompt = {"messages": [{"role": "user", "content": "x " * 120_000}]}
    reply = batched.post("/v1/chat/completions", json=long_prompt)
    assert reply.status_code == 400 and "tokens" in reply.json()["detail"]
    # a body over the limit (1 MiB by default)
    reply = batched.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x " * 600_000}]})
    assert reply.status_code == 413
    reply = batched.post("/v1/chat/completions", content=b"{not json")
    assert 400 <= reply.status_code < 500
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
def test_admin_endpoints_are_off_by_default(batched):
    assert batched.post("/reset").status_code == 404
    assert batched.post("/load_model", json={"model": str(batched.folder)}).status_code == 404


@pytest.mark.slow
@pytest.mark.parametrize("batched", ["converted-v2"], indirect=True)
def test_api_key_is_required_but_for_health(batched):
    assert batched.headers  # this server has a key
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(f"{batched.base}/v1/chat/completions", json=chat).status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert httpx.post(f"{batched.base}/v1/chat/completions", json=chat, headers=wrong).status_code == 401
    assert httpx.get(f"{batched.base}/v1/models").status_code == 401
    assert httpx.get(f"{batched.base}/health").status_code == 200
    assert batched.post("/v1/chat/completions", json=chat).status_code == 200


def cpu_seconds(process: psutil.Process, duration: float) -> float:
    """CPU seconds `process` uses over the next `duration` seconds."""
    before = sum(process.cpu_times()[:2])
    time.sleep(duration)
    return sum(process.cpu_times()[:2]) - before


def assert_cancelled_when_the_client_leaves(server, body):
    """A request for the whole context, not streamed, whose client leaves after 2 s: the model's process goes idle."""
    model_process = server.model_process()
    outcome = []

    def leave():
        try:
            outcome.append(server.post("/v1/chat/completions", json=body, timeout=2).status_code)
        except httpx.TimeoutException as timeout:
            outcome.append(timeout)

    client = threading.Thread(target=leave)
    client.start()
    time.sleep(0.5)
    assert cpu_seconds(model_process, 1.0) > 0.3  # generating
    client.join()
    assert isinstance(outcome[0], httpx.TimeoutException), outcome  # it was still generating when the client left
    time.sleep(1)
    assert cpu_seconds(model_process, 1.0) < 0.1  # cancelled


LONG_ANSWER = {"messages": [{"role": "user", "content": "def"}], "max_tokens": CONTEXT - 20, "temperature": 0}


@pytest.mark.slow
def test_a_request_whose_client_leaves_is_cancelled(one_at_a_time):
    assert_cancelled_when_the_client_leaves(one_at_a_time, {**LONG_ANSWER, "logit_bias": {"2": -100}})  # no EOS


@pytest.mark.slow
@pytest.mark.parametrize("batched", ["v1"], indirect=True)
def test_a_batched_request_whose_client_leaves_is_cancelled(batched):
    assert_cancelled_when_the_client_leaves(batched, LONG_ANSWER)


@pytest.mark.slow
def test_admin_endpoints_when_enabled(one_at_a_time):
    assert one_at_a_time.post("/reset").status_code == 200  # unloads the model
    reply = one_at_a_time.post("/v1/completions", json={"prompt": "import", "max_tokens": 3, "temperature": 0})
    assert reply.status_code == 200  # loaded again


@pytest.mark.slow
def test_sigterm_stops_a_busy_server(one_at_a_time):
    # a long streamed answer is running when SIGTERM comes: the server still stops, within its grace period
    first_chunk = threading.Event()

    def stream():
        body = {"prompt": "def", "max_tokens": CONTEXT - 10, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{one_at_a_time.base}/v1/completions", json=body, timeout=120) as reply:
            for _ in reply.iter_lines():
                first_chunk.set()

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    assert first_chunk.wait(60)
    one_at_a_time.process.send_signal(signal.SIGTERM)
    one_at_a_time.process.wait(timeout=30)  # raises if it does not stop


@pytest.mark.slow
def test_the_server_exits_when_its_model_dies(served_models):
    with start_server(served_models / "converted-v2", *SMALL_CACHE, timeout=180) as (base, process):
        server = Server(base, served_models / "converted-v2", process)
        server.model_process().kill()
        process.wait(timeout=30)
        output = read_output(process)
    assert process.returncode == 3
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model" in errors[0] and "Traceback" not in output, output[-2000:]


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--port", "70000"), "--port"),
        (("--max-memory-percent", "0"), "--max-memory-percent"),
        (("--max-memory-percent", "1.5"), "--max-memory-percent"),
        (("--max-batch-tokens", "0"), "--max-batch-tokens"),
        (("--num-blocks", "0"), "--num-blocks"),
        (("--max-model-len", "1"), "--max-model-len"),
        (("--max-request-bytes", "10"), "--max-request-bytes"),
        (("--log-level", "loud"), "--log-level"),
        (("--api-key", " "), "--api-key"),
        (("--attn-implementation", "eager"), "eager"),
        (("--device", "gpu"), "--device"),
    ],
)
def test_bad_flags_are_refused_before_loading(flags, message):
    # what `serve` checks first, before it binds the port or loads anything (the CLI's one-line contract is
    # test_a_taken_port_fails_before_loading's)
    from modeling_diff_cli.common import CLIError
    from modeling_diff_cli.main import build_parser
    from modeling_diff_cli.serve import check_arguments

    args = build_parser().parse_args(["serve", "some-model", *flags])
    with pytest.raises(CLIError, match=message):
        check_arguments(args)
    check_arguments(build_parser().parse_args(["serve", "some-model"]))  # the defaults pass


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
    assert_one_line_error(result, "paged KV cache does not fit")


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


def test_request_checks():
    from modeling_diff_cli.serving import chat_request_problem, completion_request_problem, response_request_problem

    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "stream": True}
    assert chat_request_problem(ok) is None
    parts = [{"type": "text", "text": "hi"}]
    assert chat_request_problem({**ok, "messages": [{"role": "user", "content": parts}], "stop": ["a", "b"]}) is None
    problems = {
        "messages": {"messages": []},
        "role": {"messages": [{"role": "robot", "content": "hi"}]},
        "content": {"messages": [{"role": "user"}]},
        "text only": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "arguments": {
            "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{nope"}}]}]
        },
        "max_tokens": {**ok, "max_tokens": 0},
        "temperature": {**ok, "temperature": "hot"},
        "top_p": {**ok, "top_p": 0},
        "n": {**ok, "n": 2},
        "stream": {**ok, "stream": "yes"},
        "stop": {**ok, "stop": ["a", ""]},
        "below 400": {**ok, "logit_bias": {"400": 1}},
        "logit_bias[5]": {**ok, "logit_bias": {"5": 101}},
        "apply_chat_template": {**ok, "chat_template_kwargs": {"tokenize": False}},
        "`generation_config` may set": {**ok, "generation_config": json.dumps({"trust_remote_code": True})},
        "generation_config.top_k": {**ok, "generation_config": json.dumps({"top_k": -1})},
        "JSON object": {**ok, "generation_config": "[1]"},
    }
    for word, body in problems.items():
        problem = chat_request_problem(body, vocab_size=400)
        assert problem is not None and word in problem, (word, problem)
    assert completion_request_problem({"prompt": "def", "suffix": "x"}) is None
    assert "prompt" in completion_request_problem({"prompt": ["def"]})
    assert response_request_problem({"input": "hi", "max_output_tokens": 3}) is None
    assert response_request_problem({"input": [{"type": "input_text", "text": "hi"}]}) is None
    assert "max_output_tokens" in response_request_problem({"input": "hi", "max_output_tokens": -1})
    assert "call_id" in response_request_problem(
        {"input": [{"role": "user", "content": "hi"}, {"type": "function_call"}]}
    )


def test_stop_filter_holds_back_what_may_begin_a_stop_string():
    import asyncio

    from modeling_diff_cli.serving import StopFilter

    queue = asyncio.Queue()
    stop = StopFilter(queue, ("END", "xy"))
    for piece in ["ab", "cE", "N", "x", "zE", "ND", "more"]:
        stop.put_nowait(piece)
    items = [queue.get_nowait() for _ in range(queue.qsize())]
    assert "".join(item for item in items if item is not None) == "abcENxz" and items[-1] is None
    assert stop.stopped


# What serving.py overrides or calls that transformers may change (private methods, signatures), as transformers 5.25
# has them: a change there fails here, naming the symbol.
UPSTREAM_SIGNATURES = {
    "transformers.cli.serving.model_manager:ModelLoader.__init__": (
        "(self, device='auto', dtype='auto', trust_remote_code=False, attn_implementation=None, "
        "quantization=None, continuous_batching=False)"
    ),
    "transformers.cli.serving.model_manager:ModelLoader._load_model": (
        "(self, model_id, tqdm_class=None, progress_callback=None)"
    ),
    "transformers.cli.serving.model_manager:ModelLoader.load_model_and_processor": (
        "(self, model_id, on_progress=None)"
    ),
    "transformers.cli.serving.model_manager:ModelManager.__init__": (
        "(self, loader=None, generation_state=None, model_timeout=300, force_model=None, engine_connection=None)"
    ),
    "transformers.cli.serving.model_manager:ModelManager.preload_engine": ("(self, force_model, engine_connection)"),
    "transformers.cli.serving.model_manager:EngineClient.__init__": (
        "(self, model_id, loader, generation_state=None, timeout=-1, connection=None)"
    ),
    "transformers.cli.serving.model_manager:EngineClient._send_request": ("(self, method, args, streamer=None)"),
    "transformers.cli.serving.model_manager:EngineClient.generate_streaming": (
        "(self, inputs, generation_kwargs, response_parser=None)"
    ),
    "transformers.cli.serving.model_manager:EngineClient.generate_non_streaming": (
        "(self, inputs, generation_kwargs)"
    ),
    "transformers.cli.serving.utils:GenerateRunner.submit": ("(self, request_id, function, args, stream)"),
    "transformers.cli.serving.utils:Detokenizer.__init__": ("(self, tokenizer, queue, response_parser=None)"),
    "transformers.cli.serving.utils:Detokenizer.put_token": ("(self, token_id)"),
    "transformers.cli.serving.utils:BaseHandler._validate_request": ("(self, body)"),
    "transformers.cli.serving.utils:BaseHandler._check_prompt_length": ("(self, engine, inputs)"),
    "transformers.cli.serving.utils:BaseHandler._build_generation_kwargs": ("(self, body, model_generation_config)"),
    "transformers.cli.serving.utils:GenerationState.__init__": (
        "(self, continuous_batching=False, compile=False, cb_config=None, seed=None, max_model_len=None)"
    ),
    "transformers.cli.serving.utils:GenerationState.context_length": ("(self, config)"),
    "transformers.cli.serving.server:build_server": (
        "(model_manager, chat_handler, completion_handler, response_handler, transcription_handler, "
        "systemone_handler, enable_cors=False)"
    ),
    "transformers.generation.continuous_batching.continuous_api:ContinuousMixin.init_continuous_batching": (
        "(self, generation_config=None, continuous_batching_config=None, workload_hints=None)"
    ),
}


def bare_signature(function) -> str:
    """A signature without its annotations, which vary with Python's version."""
    signature = inspect.signature(function)
    parameters = [parameter.replace(annotation=inspect.Parameter.empty) for parameter in signature.parameters.values()]
    return str(signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty))


def test_the_transformers_internals_serving_relies_on():
    changed = []
    for name, expected in UPSTREAM_SIGNATURES.items():
        try:
            found = bare_signature(pkgutil.resolve_name(name))
        except (ImportError, AttributeError):
            found = "missing"
        if found != expected:
            changed.append(f"{name} is now {found}, not {expected}")
    assert not changed, "transformers changed what `diff-transformer serve` builds on:\n" + "\n".join(changed)

    # start_greedy_batching relies on the runner's init_continuous_batching() returning the manager cached on the model
    model = make_model("v2-gqa", attn="sdpa")
    manager = model.init_continuous_batching()
    model._cached_continuous_batching_manager = manager
    assert model.init_continuous_batching() is manager, (
        "transformers' ContinuousMixin.init_continuous_batching no longer returns the manager cached on the model"
    )


@pytest.mark.slow
def test_load_test_smoke(tmp_path):
    """benchmarks/system/serve_load.py --smoke: a few seconds of good and hostile clients at once."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "system" / "serve_load.py"
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "serve_load.json").read_text())
    assert results["passed"] and results["good_matched"] == results["good_sent"] > 0
    assert results["hostile_as_expected"] == results["hostile_sent"] > 0
    assert (tmp_path / "serve_load.png").stat().st_size > 0

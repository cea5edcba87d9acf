"""`diff-transformer serve` end to end: a real server on 127.0.0.1, real HTTP clients (openai and httpx)."""

from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest
import torch
from helpers import assert_one_line_error, run_cli, tiny_tokenizer
from modeling_diff_cli.common import load_model
from modeling_diff_cli.generate import prompt_ids
from modeling_diff_cli.serve import chat_request_problem, free_port, serve_in_background
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


@pytest.fixture(scope="module", params=["converted-v2", "v1"])
def server(request, served_models):
    """`diff-transformer serve MODEL` on a free port, ready, and always stopped afterwards."""
    folder = served_models / request.param
    with serve_in_background(folder, timeout=120) as base:
        yield base, folder


def generate_answers(folder) -> dict[str, str]:
    """What `generate()` answers to each of QUESTIONS, greedily, on the same chat template (one model load)."""
    model, tokenizer = load_model(str(folder))
    answers = {}
    for question in QUESTIONS:
        ids = prompt_ids(tokenizer, question, chat=True)
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers[question] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return answers


def test_serve_answers_like_generate(server):
    base, folder = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    expected = generate_answers(folder)
    assert len(set(expected.values())) == len(QUESTIONS)  # the answers tell the questions apart

    def ask(question):
        reply = client.chat.completions.create(
            model=str(folder),
            messages=[{"role": "user", "content": question}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        return reply.choices[0].message.content

    # greedy answers equal generate(), also when the requests run concurrently (continuous batching)
    assert ask(QUESTIONS[0]) == expected[QUESTIONS[0]]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(ask, QUESTIONS))
    assert answers == [expected[question] for question in QUESTIONS]

    # streamed: more than one chunk, and the same text
    stream = client.chat.completions.create(
        model=str(folder),
        messages=[{"role": "user", "content": QUESTIONS[1]}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) > 1
    # the streamer holds back a trailing incomplete UTF-8 sequence (shown as U+FFFD when decoded whole); the random
    # tiny model emits arbitrary byte tokens, so the last one may be such a fragment
    assert "".join(pieces) == expected[QUESTIONS[1]].rstrip("\ufffd")

    # a malformed request gets a 4xx with a message, and the server keeps serving
    bad = httpx.post(f"{base}/v1/chat/completions", json={"messages": 3}, timeout=60)
    assert 400 <= bad.status_code < 500 and "messages" in bad.text
    bad = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", timeout=60)
    assert 400 <= bad.status_code < 500
    assert ask(QUESTIONS[2]) == expected[QUESTIONS[2]]


def test_chat_request_problems():
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "stream": True}
    assert chat_request_problem(ok) is None
    assert "messages" in chat_request_problem({"messages": []})
    assert "role" in chat_request_problem({"messages": [{"role": "robot", "content": "hi"}]})
    assert "content" in chat_request_problem({"messages": [{"role": "user"}]})
    assert "max_tokens" in chat_request_problem({**ok, "max_tokens": 0})
    assert "temperature" in chat_request_problem({**ok, "temperature": "hot"})
    assert "stream" in chat_request_problem({**ok, "stream": "yes"})


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

"""The evaluation tasks (`modeling_diff_eval`): generators, metrics on hand-computed tensors, run_task on tiny models."""

import json

import pytest
import torch
from helpers import tiny_config
from modeling_diff_eval.metrics import answer_attention_share, capture_attention_logits, outlier_stats
from modeling_diff_eval.needle import build_example, key_pool, needle_specs
from modeling_diff_eval.tasks import TASK_NAMES, format_table, run_task
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from modeling_diff import DiffTransformerForCausalLM


def char_encode(text):
    return [ord(c) for c in text]


# ---------------------------------------------------------------------------------------------------- generators


def test_key_pools_are_disjoint_and_fixed():
    train, evaluation = key_pool("train"), key_pool("eval")
    assert not set(train) & set(evaluation)
    assert len(train) == 3920 and len(evaluation) == 980
    assert key_pool("eval") == evaluation  # no hidden randomness
    with pytest.raises(ValueError):
        key_pool("test")


def test_needle_specs_are_deterministic_for_a_seed():
    a = needle_specs(5, needles=4, queries=2, seed=7)
    assert a == needle_specs(5, needles=4, queries=2, seed=7)
    assert a != needle_specs(5, needles=4, queries=2, seed=8)
    for spec in a:
        assert len(set(spec.keys)) == 4 and len(set(spec.values)) == 4
        assert len(spec.query_order) == 2 and set(spec.query_order) <= set(range(4))


def test_train_and_eval_examples_never_share_keys():
    train_keys = {k for s in needle_specs(300, 6, seed=0, split="train") for k in s.keys}
    eval_keys = {k for s in needle_specs(300, 6, seed=0, split="eval") for k in s.keys}
    assert train_keys <= set(key_pool("train"))
    assert eval_keys <= set(key_pool("eval"))
    assert not train_keys & eval_keys


def test_build_example_places_needles_and_answers():
    spec = needle_specs(1, needles=3, queries=2, seed=3)[0]
    filler = char_encode("lorem ipsum dolor sit amet " * 40)
    example = build_example(spec, char_encode, filler, context_len=400, bos_id=1)
    ids = example.input_ids
    assert example.context_end == 400 and ids[0] == 1
    for i, (start, end) in enumerate(example.needle_spans):
        text = "".join(map(chr, ids[start:end]))
        assert text == f" The magic number for {spec.keys[i]} is {spec.values[i]}."
    for j, (start, end) in enumerate(example.answer_spans):
        needle = example.query_needles[j]
        assert "".join(map(chr, ids[start:end])) == f" {spec.values[needle]}"
        assert "".join(map(chr, ids[start - 7 : start])).endswith(f"{spec.keys[needle]} is")
        assert start > example.context_end
    # deeper needles come later
    order = sorted(range(3), key=lambda i: spec.depths[i])
    starts = [example.needle_spans[i][0] for i in order]
    assert starts == sorted(starts)
    assert build_example(spec, char_encode, filler, 400, 1).input_ids == ids


# ---------------------------------------------------------------------------------------------------- metrics


def test_answer_share_matches_hand_computation():
    # two heads, six keys: 0..3 are the context (1 and 2 the answer), 4 and 5 the query tokens
    attention = torch.tensor([[0.10, 0.20, 0.30, 0.15, 0.05, 0.20],
                              [0.40, 0.00, 0.10, 0.10, 0.20, 0.20]])
    answer, noise = answer_attention_share(attention, [1, 2], range(4))
    assert answer == pytest.approx(((0.2 + 0.3) + (0.0 + 0.1)) / 2)  # 0.30
    assert noise == pytest.approx(((0.10 + 0.15) + (0.40 + 0.10)) / 2)  # 0.375
    # a differential row with negative entries is summed as it is
    answer, noise = answer_attention_share(torch.tensor([0.6, -0.1, 0.05, 0.0]), [0], [0, 1, 2])
    assert answer == pytest.approx(0.6) and noise == pytest.approx(-0.05)


def test_outlier_ratio_matches_hand_computation():
    hidden = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 50.0, 6.0], [0.5, -1.0, 2.0]])
    # |values| sorted: 0.5 1 1 2 2 3 4 6 50 -> median 2, top-1 50, top-3 4
    stats = outlier_stats(hidden, ks=(1, 3))
    assert stats["median"] == 2.0 and stats["top1"] == 50.0 and stats["top3"] == 4.0
    assert stats["top1_ratio"] == 25.0 and stats["top3_ratio"] == 2.0
    even = outlier_stats(torch.tensor([1.0, -3.0, 5.0, 100.0]), ks=(1, 10))  # median (3 + 5) / 2
    assert even["median"] == 4.0 and even["top1_ratio"] == 25.0 and even["top10"] == 1.0


@pytest.mark.parametrize("kind", ["llama", "v1", "v2"])
def test_captured_logits_are_the_causal_qk_products(kind):
    model = tiny_llama() if kind == "llama" else DiffTransformerForCausalLM(tiny_config(1 if kind == "v1" else 2))
    model.eval()
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with capture_attention_logits(model) as captured:
            logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)
    heads = model.config.num_attention_heads
    assert len(captured) == model.config.num_hidden_layers
    assert all(c.numel() == 2 * heads * 9 * 10 // 2 for c in captured)
    assert model.config._attn_implementation != "capture_logits"


# ---------------------------------------------------------------------------------------------------- run_task


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512))


@pytest.fixture(scope="module")
def tokenizer():
    from modeling_diff_eval.corpus import python_docs_texts
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(python_docs_texts()[:10], trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


EXPECTED_KEYS = {
    "ppl": {"perplexity", "nll", "tokens", "seq_len"},
    "needle": {"accuracy", "correct", "total", "needles", "context_len", "queries"},
    "attention-noise": {"answer_share", "noise_share", "answer_to_noise", "maps"},
    "outliers": {"attention_logits", "hidden_states"},
}
OPTIONS = {
    "ppl": dict(seq_len=64, max_batches=2),
    "needle": dict(needles=2, context_len=96, samples=2),
    "attention-noise": dict(context_len=96, samples=2),
    "outliers": dict(seq_len=64, max_batches=1),
}


@pytest.mark.parametrize("kind", ["llama", "v1", "v2"])
def test_run_task_returns_the_expected_keys(kind, tokenizer):
    vocab = len(tokenizer)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    else:
        model = DiffTransformerForCausalLM(tiny_config(1 if kind == "v1" else 2, heads=4, kv_heads=2,
                                                       vocab_size=vocab, hidden_size=32, intermediate_size=64))
    before = model.config._attn_implementation
    for name in TASK_NAMES:
        result = run_task(name, model, tokenizer, progress=False, **OPTIONS[name])
        assert result["task"] == name and EXPECTED_KEYS[name] <= set(result)
        json.dumps(result)
        table = format_table(name, result)
        assert table.startswith("|") and "---" in table
    assert model.config._attn_implementation == before and model.training
    noise = run_task("attention-noise", model, tokenizer, progress=False, **OPTIONS["attention-noise"])
    assert noise["maps"] == ("softmax" if kind == "llama" else "differential")
    if kind == "llama":  # softmax rows: answer + noise + the query tokens' share = 1
        assert 0 < noise["answer_share"] + noise["noise_share"] <= 1 + 1e-5
    with pytest.raises(ValueError, match="unknown task"):
        run_task("bleu", model, tokenizer)

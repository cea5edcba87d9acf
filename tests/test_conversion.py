"""Llama / DiffLlama -> DiffTransformer conversion: exactness, gradients, layouts, refusals, atomic output."""

import json
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import add_to_hub_cache, run_cli
from modeling_diff_cli.main import main
from modeling_diff_conversion import ConversionError, convert
from modeling_diff_conversion.mapping import llama_v1_query_order
from transformers import DiffLlamaConfig, DiffLlamaForCausalLM, LlamaConfig, LlamaForCausalLM

from modeling_diff import DiffTransformerForCausalLM

LLAMAS = {  # name: (heads, kv heads, tied, hidden)
    "mha": (4, 4, False, 64),
    "gqa": (8, 2, False, 64),
    "odd": (9, 3, False, 72),  # SmolLM2's 9/3 layout
    "tied": (8, 4, True, 64),
}


def save_llama(folder: Path, heads, kv, tied, hidden, **kwargs) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=120,
        hidden_size=hidden,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tied,
        max_position_embeddings=128,
        **kwargs,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked maps make pairing mistakes visible
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    model.save_pretrained(folder)
    return model


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("name", list(LLAMAS))
def test_llama_to_v2_is_exact_and_every_parameter_learns(tmp_path, name):
    llama = save_llama(tmp_path / "llama", *LLAMAS[name])
    report = convert(str(tmp_path / "llama"), str(tmp_path / "out"), progress=False)
    assert report.variant == "v2" and report.verification.passed
    diff = DiffTransformerForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert diff.config.diff_version == 2 and diff.config.num_attention_heads == 2 * LLAMAS[name][0]
    ids = torch.randint(0, 120, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(diff(ids).logits, llama(ids).logits, rtol=0, atol=1e-5)
        kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(diff.generate(ids[:1, :5], **kw), llama.generate(ids[:1, :5], **kw))

    diff.train()
    diff(ids, labels=ids).loss.backward()
    no_grad = [n for n, p in diff.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert no_grad == [], f"parameters without gradient after conversion: {no_grad}"
    # the two copies of a Llama head are pushed apart: their q_proj gradients differ
    grad = diff.model.layers[0].self_attn.q_proj.weight.grad.view(-1, 2, diff.config.head_dim, diff.config.hidden_size)
    assert (grad[:, 0] - grad[:, 1]).abs().max() > 0


def test_llama_to_v1_layout_and_maps(tmp_path):
    heads, kv, tied, hidden = LLAMAS["gqa"]
    llama = save_llama(tmp_path / "llama", heads, kv, tied, hidden)
    report = convert(str(tmp_path / "llama"), str(tmp_path / "out"), variant="v1", progress=False)
    assert not report.preserves_function and "cannot preserve the function" in report.summary()
    assert (tmp_path / "out" / "README.md").read_text().count("does not preserve the function") == 1
    diff = DiffTransformerForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    cfg = diff.config
    assert (cfg.diff_version, cfg.num_attention_heads, cfg.num_key_value_heads) == (1, heads, kv)
    attn = diff.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (heads * 8, hidden) and attn.head_norm.weight.shape == (16,)
    assert sum(p.numel() for p in diff.parameters()) == sum(p.numel() for p in llama.parameters()) + 2 * 6 * 8

    # with the subtraction switched off, each differential head's map is exactly the Llama map of its q1 head
    diff.config.lambda_scale = 0.0
    llama.set_attn_implementation("eager")
    ids = torch.randint(0, 120, (1, 12))
    with torch.no_grad():
        first_diff = diff.model.layers[0].self_attn
        ours = diff(ids, output_attentions=True).attentions[0][0]  # (heads/2, T, T)
        theirs = llama(ids, output_attentions=True).attentions[0][0]  # (heads, T, T)
    order = llama_v1_query_order(heads, kv)
    torch.testing.assert_close(ours, theirs[order[0::2]], rtol=1e-5, atol=1e-6)
    assert first_diff.head_norm.lambda_q1.abs().sum() > 0  # λ vectors were drawn, not left at zero


@pytest.mark.parametrize("heads, kv", [(4, 4), (8, 2)])
def test_diffllama_to_v1_is_exact(tmp_path, heads, kv):
    config = DiffLlamaConfig(
        vocab_size=120,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
    )
    source = DiffLlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in source.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    source.save_pretrained(tmp_path / "dl")
    report = convert(str(tmp_path / "dl"), str(tmp_path / "out"), progress=False)
    assert report.variant == "v1" and report.verification.passed
    diff = DiffTransformerForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 120, (2, 14))
    with torch.no_grad():
        torch.testing.assert_close(diff(ids).logits, source(ids).logits, rtol=0, atol=1e-5)


def test_sharded_source_converts_to_shards_and_loads(tmp_path):
    llama = save_llama(tmp_path / "llama", 8, 4, False, 64)
    llama.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    n_source = len(list((tmp_path / "sharded").glob("*.safetensors")))
    assert n_source > 2
    report = convert(str(tmp_path / "sharded"), str(tmp_path / "out"), max_shard_bytes=80_000, progress=False)
    assert report.n_shards > 2 and report.verification.passed
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == report.n_shards


def test_output_folder_contents(tmp_path):
    save_llama(tmp_path / "llama", 8, 4, True, 64)
    convert(str(tmp_path / "llama"), str(tmp_path / "out"), dtype="bfloat16", progress=False)
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "README.md",
        "model.safetensors",
        "modeling_diff_transformer.py",
        "configuration_diff_transformer.py",
    } <= names
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_diff_transformer.DiffTransformerForCausalLM"
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    card = (out / "README.md").read_text()
    assert (
        card.startswith("---\n") and "library_name: transformers" in card and "pipeline_tag: text-generation" in card
    )
    assert "max \\|Δlogit\\| vs source | 0 |" in card or "max \\|Δlogit\\|" in card


def test_hub_id_resolves_from_an_offline_cache(tmp_path, monkeypatch):
    save_llama(tmp_path / "llama", 8, 4, False, 64)
    add_to_hub_cache(tmp_path / "hub", "someone/tiny-llama", tmp_path / "llama")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    report = convert("someone/tiny-llama", str(tmp_path / "out"), progress=False)
    assert report.verification.passed
    assert "- someone/tiny-llama" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(ConversionError, match="not in the local HF cache"):
        convert("someone/absent-model", str(tmp_path / "out2"), progress=False)
    assert not (tmp_path / "out2").exists()


def test_refusals_leave_nothing_behind(tmp_path):
    save_llama(tmp_path / "llama", 9, 3, False, 72)
    with pytest.raises(ConversionError, match="odd.*--variant v2"):
        convert(str(tmp_path / "llama"), str(tmp_path / "out"), variant="v1", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="--overwrite_output_dir"):
        convert(str(tmp_path / "llama"), str(tmp_path / "full"), progress=False)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert(str(tmp_path / "noconfig"), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_mismatched_shapes_and_corrupt_shards(tmp_path):
    save_llama(tmp_path / "llama", 8, 4, False, 64)
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "llama" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="has shape .* but config.json implies"):
        convert(str(tmp_path / "llama"), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []

    model = save_llama(tmp_path / "llama2", 8, 4, False, 64)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated mid-download
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        convert(str(tmp_path / "sharded"), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_unsupported_architecture_and_missing_gguf(tmp_path, monkeypatch):
    from transformers import MistralConfig, MistralForCausalLM

    MistralForCausalLM(
        MistralConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(tmp_path / "m")
    with pytest.raises(ConversionError, match="MistralForCausalLM; supported architectures are LlamaForCausalLM"):
        convert(str(tmp_path / "m"), str(tmp_path / "out"), progress=False)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ConversionError, match="needs the gguf package: pip install gguf"):
        convert(str(fake), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("convert", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no config.json in {tmp_path / 'empty'}: is this a Transformers model folder?"
    ]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    # --debug lets the exception out (Python prints its traceback); in this process, as the subprocess above ran it
    with pytest.raises(ConversionError, match="no config.json in"):
        main(["convert", str(tmp_path / "empty"), str(tmp_path / "out"), "--debug"])


def test_smollm2_gguf_to_v2_keeps_the_chat_answer(tmp_path):
    from modeling_diff_conversion.loading import embedded_smollm2

    report = convert(str(embedded_smollm2()), str(tmp_path / "smol"), progress=False)
    v = report.verification
    assert v.passed and v.greedy_identical and v.max_abs_logit_diff <= v.tolerance
    assert v.source_answer == v.converted_answer and "Paris" in v.converted_answer
    card = (tmp_path / "smol" / "README.md").read_text()
    assert "- HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
    assert (tmp_path / "smol" / "tokenizer.json").exists()


def test_llama3_rope_scaling_converts_exactly(tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    llama = save_llama(tmp_path / "llama", 8, 2, True, 64, rope_parameters=rope)
    report = convert(str(tmp_path / "llama"), str(tmp_path / "out"), progress=False)
    assert report.verification.passed
    diff = DiffTransformerForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert diff.config.rope_parameters["rope_type"] == "llama3"
    ids = torch.randint(0, 120, (1, 100))  # longer than original_max_position_embeddings
    with torch.no_grad():
        torch.testing.assert_close(diff(ids).logits, llama(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_cli_convert_happy_path(tmp_path):
    save_llama(tmp_path / "llama", 8, 4, False, 64)
    result = run_cli("convert", str(tmp_path / "llama"), str(tmp_path / "out"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "PASS (same function)" in result.stdout and "max |Δlogit|" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()

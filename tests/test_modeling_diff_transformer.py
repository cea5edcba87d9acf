"""The model against an independent reference, across backends, caches and generate()."""

import copy
import functools

import pytest
import torch
from helpers import LAYOUTS, make_model, tiny_config
from modeling_diff_eval.reference import causal_lm_forward
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    QuantizedCache,
    StaticCache,
)
from transformers.configuration_utils import get_head_shapes

from modeling_diff import DiffTransformerForCausalLM, DiffTransformerForSequenceClassification, DiffTransformerModel


def with_attn(model, attn):
    other = copy.deepcopy(model)
    other.set_attn_implementation(attn)
    return other


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_reference(layout):
    model = make_model(layout)
    ids = torch.randint(3, 97, (2, 12))
    ref_logits, ref_maps = causal_lm_forward(model, ids)
    # the maps really are peaked: on average the largest weight of a row holds most of the mass
    assert ref_maps[1].abs().amax(-1).mean() > 0.5
    for attn in ("eager", "sdpa"):
        logits = with_attn(model, attn)(ids).logits.double()
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["v1-gqa", "v2-gqa"])
def test_training_gradients_match_reference(layout):
    """In training mode (V1 recomputes a1 - λ·a2 and its norm in the backward pass) the gradients of every
    parameter equal those of the plain-torch equations."""
    model = make_model(layout, attn="sdpa").train()
    with torch.no_grad():  # λ away from its init value, so that its gradient path is exercised
        for name, param in model.named_parameters():
            if "lambda" in name:
                param.add_(0.1 * torch.randn_like(param))
    ids = torch.randint(3, 97, (2, 12))
    probe = torch.randn(2, 12, model.config.vocab_size, dtype=torch.float64)

    (model(ids).logits.double() * probe).sum().backward()
    ours = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    ref_logits, _ = causal_lm_forward(model, ids, differentiable=True)
    (ref_logits * probe).sum().backward()

    for name, param in model.named_parameters():
        scale = param.grad.abs().max().clamp(min=1e-3)
        torch.testing.assert_close(ours[name] / scale, param.grad / scale, rtol=0, atol=2e-4, msg=name)
    assert all(ours[n].abs().max() > 0 for n in ours if "lambda" in n)


@pytest.mark.parametrize("layout", ["v1-gqa", "v2-gqa"])
def test_output_attentions_is_the_differential_map(layout):
    model = make_model(layout)
    ids = torch.randint(3, 97, (1, 10))
    _, ref_maps = causal_lm_forward(model, ids)
    out = model(ids, output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    for layer, attn in enumerate(out.attentions):
        assert attn.shape == (1, model.config.num_attention_heads // 2, 10, 10)
        torch.testing.assert_close(attn.double(), ref_maps[layer], rtol=1e-4, atol=1e-5)
    # a differential map has negative entries, a softmax map never does
    assert out.attentions[0].min() < 0


@pytest.mark.parametrize("layout", ["v1-gqa", "v2-gqa", "v2-mqa"])
def test_returned_maps_are_in_the_autograd_graph(layout):
    """Attribution methods differentiate the logits by the returned maps: eager computes the output from them."""
    model = make_model(layout)
    ids = torch.randint(3, 97, (2, 9))
    out = model(ids, output_attentions=True)
    for attn in out.attentions:
        attn.retain_grad()
    out.logits.sum().backward()
    for layer, attn in enumerate(out.attentions):
        assert attn.grad is not None, f"layer {layer}: the map is not in the graph"
        assert attn.grad.shape == attn.shape and torch.isfinite(attn.grad).all()
        assert attn.grad.abs().max() > 0
    # the eager path that returns the maps still computes what sdpa computes
    torch.testing.assert_close(out.logits, with_attn(model, "sdpa")(ids).logits, rtol=1e-4, atol=1e-4)


@functools.lru_cache(maxsize=1)
def flex_available():
    """FlexAttention runs on CPU for inference only (torch has no CPU backward for it)."""
    try:
        config = tiny_config()
        model = DiffTransformerForCausalLM._from_config(config, attn_implementation="flex_attention")
        with torch.no_grad():
            model(torch.randint(3, 97, (1, 8)))
        return True
    except Exception:
        return False


@pytest.mark.parametrize("layout", ["v1-mha", "v1-gqa", "v2-gqa"])
@torch.no_grad()
def test_backends_agree_with_left_padding(layout):
    model = make_model(layout)
    ids = torch.randint(3, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on the first row
    ids[0, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    ref_logits, _ = causal_lm_forward(model, ids, mask)
    backends = ["eager", "sdpa"] + (["flex_attention"] if flex_available() else [])
    for attn in backends:
        logits = with_attn(model, attn)(ids, attention_mask=mask, position_ids=position_ids).logits.double()
        valid = mask.bool()
        torch.testing.assert_close(logits[valid], ref_logits[valid], rtol=1e-4, atol=1e-4, msg=attn)


@pytest.mark.parametrize("layout", ["v1-gqa", "v2-gqa"])
@torch.no_grad()
def test_backend_returning_log_sum_exp_is_not_read_as_maps(layout):
    """flex_attention on CUDA returns (output, log-sum-exp of each row) rather than (output, maps): the GPU check
    found both variants crashing on it. A backend with that contract, registered here, must give sdpa's logits."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sdpa_with_lse(module, query, key, value, attention_mask, **kwargs):
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return out, torch.zeros(query.shape[:3], dtype=torch.float32)  # (B, heads, T), like flex's lse

    AttentionInterface.register("sdpa_with_lse", sdpa_with_lse)
    model = make_model(layout, "sdpa")
    ids = torch.randint(3, 97, (2, 11))
    out = with_attn(model, "sdpa_with_lse")(ids, output_attentions=True)
    torch.testing.assert_close(out.logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert all(attn is None for attn in out.attentions)


@pytest.mark.parametrize("layout", ["v1-gqa", "v2-gqa"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_incremental_decoding_matches_full_forward(layout, attn):
    model = make_model(layout, attn)
    ids = torch.randint(3, 97, (2, 14))
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    out = model(ids[:, :8], past_key_values=cache, use_cache=True)
    steps = [out.logits]
    for t in range(8, 14):
        out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["v1-gqa", "v2-gqa"])
def test_kv_cache_bytes_equal_llama(layout):
    version, heads, kv = LAYOUTS[layout]
    model = make_model(layout, "sdpa")
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=heads, num_key_value_heads=kv,
        )
    ).eval()
    ids = torch.randint(3, 97, (2, 9))

    def cache_bytes(m):
        cache = m(ids, use_cache=True).past_key_values
        total = 0
        for layer in cache.layers:
            for tensor in (layer.keys, layer.values):
                total += tensor.numel() * tensor.element_size()
        # K and V keep the same head count, so offloaded and quantized caches work unchanged
        assert all(layer.keys.shape[:3] == layer.values.shape[:3] for layer in cache.layers)
        return total

    assert cache_bytes(model) == cache_bytes(llama)


def test_parameter_counts_against_llama():
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4)
    )
    n_llama = sum(p.numel() for p in llama.parameters())
    v1 = DiffTransformerForCausalLM(tiny_config(1, 8, 4))
    v2 = DiffTransformerForCausalLM(tiny_config(2, 8, 4))
    head_dim, layers = 8, 2
    extra_v1 = layers * (4 * head_dim + 2 * head_dim)  # four λ vectors and the per-head norm
    assert sum(p.numel() for p in v1.parameters()) == n_llama + extra_v1
    assert sum(p.numel() for p in v2.parameters()) <= n_llama


def generate_kwargs(model):
    return dict(max_new_tokens=8, pad_token_id=model.config.pad_token_id, eos_token_id=None)


@pytest.mark.parametrize("layout", ["v1-gqa", "v2-gqa"])
def test_generate_dynamic_vs_static_cache(layout):
    model = make_model(layout, "sdpa", peaked=False)
    ids = torch.randint(3, 97, (2, 6))
    kw = generate_kwargs(model)
    greedy = model.generate(ids, do_sample=False, **kw)
    static = model.generate(ids, do_sample=False, cache_implementation="static", **kw)
    assert torch.equal(greedy, static)
    beams = model.generate(ids, do_sample=False, num_beams=3, **kw)
    beams_static = model.generate(ids, do_sample=False, num_beams=3, cache_implementation="static", **kw)
    assert torch.equal(beams, beams_static)
    # greedy equals the argmax of repeated full forwards (no cache at all)
    seq = ids
    for _ in range(8):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=-1)
    assert torch.equal(greedy, seq)


@pytest.mark.parametrize("layout", ["v1-gqa", "v2-gqa"])
def test_generate_left_padding_sampling_embeds_and_continuation(layout):
    model = make_model(layout, "sdpa", peaked=False)
    kw = generate_kwargs(model)
    short, long = torch.randint(3, 97, (1, 4)), torch.randint(3, 97, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = (batch != 0).long()
    batched = model.generate(batch, attention_mask=mask, do_sample=False, **kw)
    alone = model.generate(short, do_sample=False, **kw)
    assert torch.equal(batched[0, 3:], alone[0])

    # inputs_embeds: generate returns only the new tokens, which must equal those from ids
    embeds = model.get_input_embeddings()(long)
    from_embeds = model.generate(inputs_embeds=embeds, do_sample=False, **kw)
    from_ids = model.generate(long, do_sample=False, **kw)
    assert torch.equal(from_embeds[0], from_ids[0, 7:])

    # continuing from past_key_values gives the same tokens as one call
    first = model.generate(long, do_sample=False, max_new_tokens=4, return_dict_in_generate=True,
                           pad_token_id=0, eos_token_id=None)
    cont = model.generate(first.sequences, past_key_values=first.past_key_values, do_sample=False,
                          max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    assert torch.equal(cont, from_ids[:, :15])

    # sampling is reproducible for a seed and differs from greedy for a flat-ish distribution
    torch.manual_seed(1)
    s1 = model.generate(long, do_sample=True, temperature=1.5, top_p=0.95, **kw)
    torch.manual_seed(1)
    s2 = model.generate(long, do_sample=True, temperature=1.5, top_p=0.95, **kw)
    assert torch.equal(s1, s2) and s1.shape == from_ids.shape


def test_sequence_classification_and_base_model():
    config = tiny_config(2, 8, 4, num_labels=3)
    model = DiffTransformerForSequenceClassification(config).eval()
    ids = torch.randint(3, 97, (2, 9))
    ids[0, -2:] = config.pad_token_id  # right padding: the last real token is used
    out = model(ids, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    base = DiffTransformerModel(config).eval()
    assert base(ids).last_hidden_state.shape == (2, 9, 64)


def test_tied_embeddings_and_resize():
    model = DiffTransformerForCausalLM(tiny_config(1, tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.resize_token_embeddings(120)
    assert model.lm_head.weight.shape == (120, 64) and model.config.vocab_size == 120
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model(torch.randint(0, 120, (1, 5))).logits.shape == (1, 5, 120)


def test_llama3_rope_scaling_matches_llama():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from modeling_diff.modeling_diff_transformer import DiffTransformerRotaryEmbedding

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    ours = DiffTransformerRotaryEmbedding(tiny_config(2, max_position_embeddings=512, rope_parameters=rope))
    llama = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=8, max_position_embeddings=512,
                                             rope_parameters=dict(rope)))
    assert not torch.equal(ours.inv_freq, DiffTransformerRotaryEmbedding(tiny_config(2)).inv_freq)
    torch.testing.assert_close(ours.inv_freq, llama.inv_freq)
    model = DiffTransformerForCausalLM(tiny_config(2, max_position_embeddings=512, rope_parameters=rope))
    assert torch.isfinite(model(torch.randint(3, 97, (1, 6))).logits).all()


def test_auto_classes_resolve():
    config = tiny_config(2)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, DiffTransformerForCausalLM)
    assert model.config.model_type == "diff_transformer"


def test_init_weights_cover_lambda_and_norms():
    model = DiffTransformerForCausalLM(tiny_config(1, lambda_std_dev=0.1))
    attn = model.model.layers[0].self_attn
    norm = attn.head_norm
    lam = torch.cat([norm.lambda_q1, norm.lambda_k1, norm.lambda_q2, norm.lambda_k2])
    assert 0.03 < lam.std().item() < 0.3  # N(0, 0.1), not the zeros the module was built with
    assert torch.equal(norm.weight, torch.ones(16))
    assert torch.equal(model.model.norm.weight, torch.ones(64))


@pytest.mark.parametrize("version", [1, 2])
def test_compiled_decode_with_static_cache_matches_generate(version):
    """torch.compile(fullgraph) of the forward, decoding with a StaticCache, gives generate()'s tokens."""
    model = DiffTransformerForCausalLM._from_config(tiny_config(version), attn_implementation="sdpa").eval()
    ids = torch.randint(3, 97, (1, 6))
    expected = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    cache = StaticCache(config=model.config, max_cache_len=32)
    step = torch.compile(model.forward, fullgraph=True, dynamic=False)
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        seq = [ids, token]
        for position in range(6, 11):
            out = step(token, cache=cache, use_cache=True, position_ids=torch.tensor([[position]]))
            token = out.logits[:, -1:].argmax(-1)
            seq.append(token)
    assert torch.equal(torch.cat(seq, dim=1), expected)


def test_attention_classes_are_named_by_variant():
    from modeling_diff.modeling_diff_transformer import DiffTransformerV1Attention, DiffTransformerV2Attention

    v1, v2 = (DiffTransformerModel(tiny_config(version)) for version in (1, 2))
    assert all(type(layer.self_attn) is DiffTransformerV1Attention for layer in v1.layers)
    assert all(type(layer.self_attn) is DiffTransformerV2Attention for layer in v2.layers)


V1_LAYOUTS = ["v1-mha", "v1-gqa", "v1-gqa4"]  # 8/8, 8/4 and 8/2 query/KV heads


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("layout", V1_LAYOUTS + ["v2-gqa"])
def test_caches_allocated_ahead_give_the_dynamic_caches_tokens(layout):
    """A static cache laid out from num_key_value_heads × head_dim before the first write: Llama's bytes."""
    model = make_model(layout, "sdpa")
    ids = torch.randint(3, 97, (2, 6))
    kw = generate_kwargs(model)
    expected = model.generate(ids, do_sample=False, **kw)
    chunked = model.generate(ids, do_sample=False, cache_implementation="static", prefill_chunk_size=4, **kw)
    assert torch.equal(chunked, expected)

    cache = StaticCache(config=model.config, max_cache_len=32)
    cache.early_initialization(2, *get_head_shapes(model.config), torch.float32, torch.device("cpu"))
    allocated = cache_bytes(cache)
    assert torch.equal(model.generate(ids, do_sample=False, past_key_values=cache, **kw), expected)
    _, heads, kv_heads = LAYOUTS[layout]
    llama = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads)
    llama_cache = StaticCache(config=llama, max_cache_len=32)
    llama_cache.early_initialization(2, *get_head_shapes(llama), torch.float32, torch.device("cpu"))
    assert cache_bytes(cache) == allocated == cache_bytes(llama_cache)


@pytest.mark.slow
@pytest.mark.parametrize("layout", V1_LAYOUTS + ["v2-gqa"])
def test_executorch_export_decodes_the_tokens_of_generate(layout):
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    model = make_model(layout, "sdpa")
    ids = torch.randint(3, 97, (1, 6))
    expected = model.generate(ids, do_sample=False, **generate_kwargs(model))
    model.generation_config.cache_implementation = "static"
    exportable = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=32)
    program = exportable.export(input_ids=ids[:, :1], cache_position=torch.tensor([0]))
    # the decode loop written out: the wrapper's own generate() feeds each new token one cache position too far
    step = program.module()
    for position in range(6):
        logits = step(input_ids=ids[:, position : position + 1], cache_position=torch.tensor([position]))
    seq = ids
    for position in range(6, 14):
        token = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, token], dim=1)
        logits = step(input_ids=token, cache_position=torch.tensor([position]))
    assert torch.equal(seq, expected)


@pytest.mark.parametrize("layout", V1_LAYOUTS)
def test_quantized_cache(layout):
    """Quantized caches are lossy for every model: the prefill is exact, the decode error shrinks with more bits."""
    pytest.importorskip("optimum.quanto")
    model = make_model(layout, "sdpa")
    seq = model.generate(torch.randint(3, 97, (1, 8)), do_sample=False, **generate_kwargs(model))
    with torch.no_grad():
        full = model(seq).logits
        errors = []
        for nbits in (4, 2):
            cache = QuantizedCache("quanto", model.config, nbits=nbits, q_group_size=16, residual_length=2)
            logits = [model(seq[:, :8], cache=cache, use_cache=True).logits]
            logits += [model(seq[:, p : p + 1], cache=cache, use_cache=True).logits for p in range(8, seq.shape[1])]
            logits = torch.cat(logits, dim=1)
            torch.testing.assert_close(logits[:, :8], full[:, :8], rtol=1e-5, atol=1e-5)
            errors.append((logits[:, 8:] - full[:, 8:]).abs().max().item())
    assert 0 < errors[0] < errors[1]

"""Continuous batching (`generate_batch`, paged KV cache) gives every request exactly what `generate()` gives it alone."""

import pytest
import torch
from helpers import LAYOUTS, make_model
from transformers import ContinuousBatchingConfig, GenerationConfig

PROMPT_LENGTHS = (5, 40, 17, 70, 9, 33, 52)  # 16-token pages: most prompts span several pages


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("attn", ["sdpa", "paged|eager"])
def test_generate_batch_matches_generate(layout, attn):
    # peaked maps (q, k × 4) and a wide init: a wrong pairing of maps or a wrong cache layout changes the tokens
    model = make_model(layout, attn="sdpa", peaked=False, vocab_size=257, initializer_range=0.15, eos_token_id=None)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 257, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    generation_config = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = [
        model.generate(torch.tensor([prompt]), generation_config=generation_config)[0, len(prompt) :].tolist()
        for prompt in prompts
    ]
    assert len({tuple(tokens) for tokens in expected}) == len(prompts)  # the instrument tells requests apart

    model.set_attn_implementation(attn)
    # 16-token pages and at most 48 tokens per forward: long prompts are prefilled in chunks that read the cache back
    cb_config = ContinuousBatchingConfig(page_size=16, max_batch_tokens=48, auto_switch_to_flash=False)
    outputs = model.generate_batch(prompts, generation_config=generation_config, continuous_batching_config=cb_config)

    assert len(outputs) == len(prompts)
    by_prompt = {tuple(output.prompt_ids): output.generated_tokens for output in outputs.values()}
    assert [by_prompt[tuple(prompt)] for prompt in prompts] == expected

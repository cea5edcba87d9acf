"""Build a tiny randomly initialised DiffTransformer of each variant and generate from it (seconds, no download)."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import modeling_diff  # noqa: F401  (registers "diff_transformer" with the Auto classes)

torch.manual_seed(0)
for version in (1, 2):
    config = AutoConfig.from_pretrained("configs/diff-tiny.json", diff_version=version, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompt = torch.tensor([[1, 17, 42, 99]])
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    n = sum(p.numel() for p in model.parameters())
    print(f"V{version}: {n:,} parameters, greedy tokens {out[0].tolist()}")

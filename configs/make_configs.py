"""Write the shipped config JSONs and print their parameter counts as a markdown table.

    python configs/make_configs.py            # rewrite configs/*.json and print the table in configs/README.md

Sizes follow the paper (arXiv 2410.05258): Table 10's scaling models and §3.1's 3B model. The paper gives
hidden size, layers and *differential* heads; heads here are counted as Llama counts them (query heads = 2 x
differential heads), the SwiGLU width is 8/3 x hidden rounded to a multiple of 128 (8192 for the 3B), the
vocabulary is the paper's cl100k tokenizer (100,288 ids) and the embeddings are tied: with those choices the
counts land within 1% of the sizes the paper names.

V1 files are the paper's layout (multi-head, every KV head its own). V2 files are the DIFF V2 authors' layout
for the same baseline: twice the baseline Transformer's query heads, its KV heads, and an o_proj as wide as the
baseline's, so V2 carries one extra hidden x hidden matrix per layer.
"""

import json
from pathlib import Path

import torch

HERE = Path(__file__).parent

# name: (hidden, layers, differential heads, head_dim or None, intermediate or None, nominal parameters)
PAPER_SIZES = {
    "830m": (1536, 24, 8, None, None, 830e6),
    "1.4b": (2048, 24, 8, None, None, 1.4e9),
    "2.8b": (2560, 32, 10, None, None, 2.8e9),
    "6.8b": (4096, 32, 16, None, None, 6.8e9),
    "13.1b": (5120, 40, 20, None, None, 13.1e9),
    "3b": (3072, 28, 12, 128, 8192, None),
}


def paper_config(size, version):
    hidden, layers, diff_heads, head_dim, intermediate, _ = PAPER_SIZES[size]
    baseline_heads = 2 * diff_heads  # the Transformer baseline's heads, as Llama counts them
    head_dim = head_dim or hidden // baseline_heads
    intermediate = intermediate or int(round(8 * hidden / 3 / 128)) * 128
    heads = baseline_heads if version == 1 else 2 * baseline_heads
    return dict(
        model_type="diff_transformer",
        diff_version=version,
        vocab_size=100288,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=baseline_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=100257,
        eos_token_id=100257,
    )


TINY = dict(
    model_type="diff_transformer", diff_version=2, vocab_size=512, hidden_size=64, intermediate_size=176,
    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def all_configs():
    """{file stem: config dict} for every shipped config."""
    configs = {"diff-tiny": TINY}
    for size in PAPER_SIZES:
        for version in (1, 2):
            configs[f"diff-v{version}-{size}"] = paper_config(size, version)
    return configs


def count_parameters(config_dict):
    import modeling_diff  # noqa: F401
    from modeling_diff import DiffTransformerConfig, DiffTransformerForCausalLM

    config = DiffTransformerConfig(**{k: v for k, v in config_dict.items() if k != "model_type"})
    with torch.device("meta"):
        model = DiffTransformerForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def main():
    print("| config | variant | hidden | layers | query heads | KV heads | head_dim | parameters |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, cfg in all_configs().items():
        (HERE / f"{name}.json").write_text(json.dumps(cfg, indent=2) + "\n")
        n = count_parameters(cfg)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        print(
            f"| {name} | V{cfg['diff_version']} | {cfg['hidden_size']} | {cfg['num_hidden_layers']} | "
            f"{cfg['num_attention_heads']} | {cfg['num_key_value_heads']} | {head_dim} | {n / 1e6:,.1f}M |"
        )


if __name__ == "__main__":
    main()

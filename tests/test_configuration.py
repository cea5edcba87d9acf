"""Config validation, the λ_init schedule, and the shipped configs in configs/."""

import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from modeling_diff import DiffTransformerConfig, DiffTransformerForCausalLM

NOMINAL = {"830m": 830e6, "1.4b": 1.4e9, "2.8b": 2.8e9, "6.8b": 6.8e9, "13.1b": 13.1e9}
CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.json"))


def test_lambda_init_schedule():
    config = tiny_config(1, num_hidden_layers=4)
    expected = [0.8 - 0.6 * math.exp(-0.3 * layer) for layer in range(4)]
    assert [config.lambda_init_for_layer(i) for i in range(4)] == pytest.approx(expected)
    assert expected[0] == pytest.approx(0.2)
    model = DiffTransformerForCausalLM(config)
    assert [layer.self_attn.lambda_init for layer in model.model.layers] == pytest.approx(expected)
    constant = tiny_config(1, lambda_init=0.5)
    assert [constant.lambda_init_for_layer(i) for i in range(3)] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_attention_heads=7, num_key_value_heads=7), "must be even"),
        (dict(num_attention_heads=8, num_key_value_heads=3), "must divide"),
        (dict(diff_version=1, num_attention_heads=6, num_key_value_heads=3), "even num_key_value_heads"),
        (dict(diff_version=2, num_attention_heads=8, num_key_value_heads=8), "must be even"),
        (dict(diff_version=3), "diff_version must be 1"),
    ],
)
def test_invalid_configs_raise_value_error(kwargs, message):
    base = dict(hidden_size=64, num_hidden_layers=1, vocab_size=50)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        DiffTransformerConfig(**base)


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config(2, lambda_init=0.3)
    config.save_pretrained(tmp_path)
    loaded = DiffTransformerConfig.from_pretrained(tmp_path)
    assert loaded.diff_version == 2 and loaded.lambda_init == 0.3 and loaded.head_dim == 8


def test_shipped_configs_exist():
    names = {p.stem for p in CONFIGS}
    for size in ("830m", "1.4b", "2.8b", "6.8b", "13.1b", "3b"):
        for version in ("v1", "v2"):
            assert f"diff-{version}-{size}" in names, f"configs/diff-{version}-{size}.json is missing"
    assert "diff-tiny" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_loads_and_reports_parameters(path):
    config = DiffTransformerConfig.from_pretrained(path)
    with torch.device("meta"):  # count parameters without allocating 13B floats
        model = DiffTransformerForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{path.stem}: {n_params / 1e6:.1f}M parameters")
    size = path.stem.split("-")[-1]
    nominal = NOMINAL.get(size)
    if nominal is None:
        return
    if config.diff_version == 1:  # the paper's layout: within 3% of the size the paper names
        assert abs(n_params - nominal) / nominal < 0.03, (n_params, nominal)
    else:  # DIFF V2's layout adds one hidden x hidden matrix per layer (q_proj doubles): at most +9%
        assert nominal * 0.97 < n_params < nominal * 1.09, (n_params, nominal)

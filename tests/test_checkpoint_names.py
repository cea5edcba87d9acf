"""Checkpoints keep the paper's names for V1's λ and head norm; V2 has no renaming at all.

`test_reverse_loading_mapping_*` does what transformers' own `ModelTesterMixin.test_reverse_loading_mapping` does
(tests/test_modeling_common.py), for every head of V1 and V2: a model built from its config is saved; where its
conversion mapping is not empty, the saved names must differ from the model's and every renaming must match a saved
name; the folder reloads to the same state dict, and saving the reloaded model writes the same tensors again.
"""

import re

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming

import modeling_diff
from modeling_diff import DiffTransformerForCausalLM

HEADS = list(modeling_diff.HEADS.values())
V1_NAMES = {"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "subln.weight"}


def equal_state_dicts(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def saved_names_and_round_trip(model, folder) -> list[str]:
    """Save `model`, reload it, save again; assert both round trips are exact; return the saved tensor names."""
    model.save_pretrained(folder / "from-init")
    saved = load_file(folder / "from-init" / "model.safetensors")
    reloaded = type(model).from_pretrained(folder / "from-init")
    assert equal_state_dicts(reloaded.state_dict(), model.state_dict())
    reloaded.save_pretrained(folder / "from-pretrained")
    assert equal_state_dicts(load_file(folder / "from-pretrained" / "model.safetensors"), saved)
    return list(saved)


@pytest.mark.parametrize("head", HEADS, ids=lambda head: head.__name__)
def test_reverse_loading_mapping_v1(tmp_path, head):
    model = head(tiny_config(1, num_labels=3))
    conversions = get_model_conversion_mapping(model, add_legacy=False)
    assert conversions and all(isinstance(conversion, WeightRenaming) for conversion in conversions)
    model_keys = list(model.state_dict())
    saved = saved_names_and_round_trip(model, tmp_path)
    assert sorted(saved) != sorted(model_keys), "no key was renamed"
    for conversion in conversions:
        for pattern in conversion.source_patterns:
            assert any(re.search(pattern, key) for key in saved), f"`{pattern}` matches no saved name"
    # the paper's names, and no in-memory name, in the file
    assert {key.split("self_attn.", 1)[1] for key in saved if "self_attn.lambda" in key or "subln" in key} == V1_NAMES
    assert not any("head_norm" in key for key in saved)


@pytest.mark.parametrize("head", HEADS, ids=lambda head: head.__name__)
def test_reverse_loading_mapping_v2(tmp_path, head):
    """V2 has nothing to rename: no conversion (transformers' test skips such a model), and the file holds exactly
    the model's names."""
    model = head(tiny_config(2, num_labels=3))
    assert get_model_conversion_mapping(model, add_legacy=False) == []
    model_keys = list(model.state_dict())
    saved = saved_names_and_round_trip(model, tmp_path)
    tied = set(model.all_tied_weights_keys)
    assert sorted(saved) == sorted(key for key in model_keys if key not in tied)


def test_each_variant_saves_its_own_names_whatever_was_built_last(tmp_path):
    """The renaming is registered per variant when a model is built and again when it is saved: a V1 model saved
    after a V2 model was built still writes the paper's names, and a V2 built after a V1 has no conversion."""
    v1 = DiffTransformerForCausalLM(tiny_config(1))
    v2 = DiffTransformerForCausalLM(tiny_config(2))
    assert get_model_conversion_mapping(v2, add_legacy=False) == []
    v1.save_pretrained(tmp_path / "v1")
    saved = load_file(tmp_path / "v1" / "model.safetensors")
    assert "model.layers.0.self_attn.subln.weight" in saved and not any("head_norm" in key for key in saved)
    v2.save_pretrained(tmp_path / "v2")
    loaded = DiffTransformerForCausalLM.from_pretrained(tmp_path / "v1")  # built as V1 after V2 was saved
    assert equal_state_dicts(loaded.state_dict(), v1.state_dict())
    assert get_model_conversion_mapping(DiffTransformerForCausalLM(tiny_config(2)), add_legacy=False) == []

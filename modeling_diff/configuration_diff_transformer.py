# Copyright 2026 The modeling_diff authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""DiffTransformer model configuration: Llama's block with differential attention (paper V1 or DIFF V2)."""

import math

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters
from transformers.utils import auto_docstring


@auto_docstring(
    custom_intro="""
Configuration of a [`DiffTransformerModel`]: a Llama decoder whose attention is differential
(Ye et al., "Differential Transformer", arXiv 2410.05258, and DIFF V2).

Heads are counted the way Llama counts them, so that a Llama config and a DiffTransformer config with the
same numbers compare directly:

- `num_attention_heads` counts query heads, i.e. softmax maps. A differential head subtracts two of them, so
  there are `num_attention_heads // 2` differential heads.
- `num_key_value_heads` counts `head_dim`-wide key heads, as in Llama.

With these numbers both variants keep exactly Llama's KV-cache bytes; V1 has Llama's parameter count plus
λ and the per-head norm, V2 has fewer parameters than that Llama (its `o_proj` is half as wide).
"""
)
@strict
class DiffTransformerConfig(PreTrainedConfig):
    r"""
    Args:
        vocab_size (`int`, defaults to 32000): Size of the vocabulary.
        hidden_size (`int`, defaults to 2048): Width of the residual stream.
        intermediate_size (`int`, defaults to 5632): Width of the SwiGLU MLP.
        num_hidden_layers (`int`, defaults to 24): Number of decoder layers.
        num_attention_heads (`int`, defaults to 16): Query heads (softmax maps). Must be even.
        num_key_value_heads (`int`, *optional*): Key heads of width `head_dim` (GQA). Defaults to
            `num_attention_heads`. V1 needs an even number (k1 and k2 of a KV group); V2 needs
            `num_attention_heads / num_key_value_heads` to be even, so that both query heads of a pair share keys.
        head_dim (`int`, *optional*): Width of one query/key head. Defaults to `hidden_size // num_attention_heads`.
        hidden_act (`str`, defaults to `"silu"`): MLP activation: a name from transformers' `ACT2FN`, or
            `"poly_norm"` for the learned PolyNorm of Motif-2.6B (three weights and a bias per layer,
            `mlp.act_fn.weight` and `mlp.act_fn.bias`).
        max_position_embeddings (`int`, defaults to 4096): Longest sequence the RoPE setup is meant for.
        initializer_range (`float`, defaults to 0.02): Std of the normal init of linear and embedding weights.
        rms_norm_eps (`float`, defaults to 1e-5): Epsilon of every RMSNorm, the per-head norm of V1 included.
        use_cache (`bool`, defaults to `True`): Whether the model returns a KV cache.
        pad_token_id / bos_token_id / eos_token_id: Special token ids.
        tie_word_embeddings (`bool`, defaults to `False`): Share the input embedding with the LM head.
        rope_parameters (`dict`, *optional*): RoPE settings (`rope_theta`, `rope_type`, and for Llama 3 scaling
            `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`).
        attention_bias (`bool`, defaults to `False`): Bias in q/k/v/o projections.
        attention_dropout (`float`, defaults to 0.0): Dropout on each softmax map during training.
        mlp_bias (`bool`, defaults to `False`): Bias in the MLP projections.
        diff_version (`int`, defaults to 1): 1 for the paper's differential attention, 2 for DIFF V2.
        lambda_init (`float`, *optional*): V1 only. A constant λ_init for every layer. `None` uses the paper's
            schedule `0.8 - 0.6 * exp(-0.3 * (layer_idx - lambda_init_layer_offset))`.
        lambda_init_layer_offset (`int`, defaults to 0): V1 only. Shifts the layer index of the λ_init schedule;
            Motif-2.6B was trained with 1 (its first layer has λ_init = 0.8 - 0.6 * exp(0.3) ≈ -0.0099).
        head_norm_eps (`float`, *optional*): V1 only. Epsilon of the per-head norm; `None` uses `rms_norm_eps`.
        lambda_std_dev (`float`, defaults to 0.1): V1 only. Std of the normal init of the four λ vectors.
        lambda_scale (`float`, defaults to 1.0): Multiplies the subtracted map's weight (V1: λ, V2: sigmoid(λ(x))).
            1.0 is the model as published; a training run can ramp it from 0 to 1 to introduce the subtraction
            gradually into a converted model.

    Example:

    ```python
    >>> import modeling_diff
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> config = AutoConfig.for_model("diff_transformer", diff_version=2, hidden_size=256, num_attention_heads=8,
    ...                               num_key_value_heads=2, num_hidden_layers=2, intermediate_size=688)
    >>> model = AutoModelForCausalLM.from_config(config)
    ```
    """

    model_type = "diff_transformer"
    # Tensor parallelism (`from_pretrained(..., tp_plan="auto")` under torchrun): Llama's plan. Colwise q/k/v and a
    # rowwise o_proj give every rank a contiguous block of heads, so a differential head stays whole on one rank when
    # the KV groups divide by the TP size (checked when the distributed config is set, see `check_tensor_parallel`).
    # The embedding is vocab-parallel like the colwise lm_head: both shard the (vocab, hidden) weight on dim 0, so a
    # tied weight is one tensor sharded once. Each variant adds its own modules, see `base_model_tp_plan` below.
    _base_tp_plan = {
        "embed_tokens": "embedding_rowwise",
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    _variant_tp_plans = {
        # V1: the four λ vectors and the per-head norm (self_attn.head_norm) are shared by all heads of a layer, so
        # every rank keeps them whole; their gradient only sees this rank's heads and is summed over ranks.
        1: {"layers.*.self_attn.head_norm": "replicated_with_grad_allreduce"},
        # V2: lambda_proj has one output row per output head, split with the query-head pairs of those heads.
        2: {"layers.*.self_attn.lambda_proj": "colwise"},
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    mlp_bias: bool = False
    diff_version: int = 1
    lambda_init: float | None = None
    lambda_init_layer_offset: int = 0
    head_norm_eps: float | None = None
    lambda_std_dev: float = 0.1
    lambda_scale: float = 1.0

    def __post_init__(self, **kwargs):
        if not isinstance(self.num_attention_heads, int) or self.num_attention_heads < 2:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads!r}: a differential head subtracts two softmax maps, "
                "so a layer needs an even number of query heads, at least 2."
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.check_head_layout()
        super().__post_init__(**kwargs)

    def check_head_layout(self):
        """Raise a `ValueError` that says what to change when the heads cannot form differential pairs."""
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if self.diff_version not in (1, 2):
            raise ValueError(f"diff_version must be 1 (the paper) or 2 (DIFF V2), got {self.diff_version!r}.")
        if heads < 2 or heads % 2:
            raise ValueError(
                f"num_attention_heads={heads} must be even: each differential head subtracts two softmax maps. "
                "Use an even number of query heads."
            )
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(
                f"num_key_value_heads={kv_heads} must divide num_attention_heads={heads}. "
                "Pick a divisor of the query heads."
            )
        if self.diff_version == 1 and kv_heads % 2:
            raise ValueError(
                f"diff_version=1 needs an even num_key_value_heads (k1 and k2 of each KV group), got {kv_heads}. "
                "Use an even number of KV heads, or diff_version=2."
            )
        if self.diff_version == 2 and (heads // kv_heads) % 2:
            raise ValueError(
                f"diff_version=2 pairs query heads 2h and 2h+1 on the same keys, so num_attention_heads / "
                f"num_key_value_heads must be even; got {heads}/{kv_heads}. Use at most "
                f"num_key_value_heads={heads // 2} (a divisor of {heads // 2}), or double num_attention_heads."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings.")

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """The tensor-parallel plan of `DiffTransformerModel`: Llama's, plus this variant's λ modules."""
        return {**self._base_tp_plan, **self._variant_tp_plans[self.diff_version]}

    def __setattr__(self, key, value):
        # `from_pretrained(..., tp_plan=...)` sets the distributed config before it builds and shards the model:
        # the one place where the config sees the TP size, so an unsplittable head layout fails here, clearly.
        if key == "distributed_config" and value is not None:
            self.check_tensor_parallel(value)
        super().__setattr__(key, value)

    def check_tensor_parallel(self, distributed_config) -> None:
        """Raise a `ValueError` naming the numbers when the heads cannot split across `distributed_config.tp_size`.

        With colwise q/k/v and a rowwise o_proj each rank holds a contiguous block of heads. A differential head stays
        whole on one rank, with the keys and values it reads, exactly when the KV units divide by the TP size:
        V1's KV groups (k1‖k2 and a 2·head_dim value, `num_key_value_heads / 2` of them), V2's KV heads (the query
        pairs of each KV head and their `lambda_proj` rows travel with it).
        """
        tp_size = getattr(distributed_config, "tp_size", None) or 1
        tp_plan = getattr(distributed_config, "tp_plan", None)
        plan = self.base_model_tp_plan | (tp_plan if isinstance(tp_plan, dict) else {})
        if tp_size == 1 or tp_plan == {} or plan.get("layers.*.self_attn.k_proj") != "colwise":
            return  # the attention is not sharded
        if self.diff_version == 1:  # a KV group: k1‖k2 and its 2·head_dim value
            units, what = self.num_key_value_heads // 2, "KV groups (num_key_value_heads / 2)"
        else:  # a KV head and the query-head pairs that read it
            units, what = self.num_key_value_heads, "KV heads (num_key_value_heads)"
        if units % tp_size:
            fits = [n for n in range(2, units + 1) if units % n == 0]
            raise ValueError(
                f"Tensor parallelism over tp_size={tp_size} ranks cannot keep the differential heads of this "
                f"diff_version={self.diff_version} model whole: its {units} {what} do not divide by {tp_size}. "
                + (f"Use tp_size in {fits}" if fits else "This model cannot be split by heads; use tp_size=1")
                + " (or FSDP, which shards any layout)."
            )

    def lambda_init_for_layer(self, layer_idx: int) -> float:
        """λ_init of layer `layer_idx` (counted from 0): the config constant, or the paper's depth schedule."""
        if self.lambda_init is not None:
            return float(self.lambda_init)
        return 0.8 - 0.6 * math.exp(-0.3 * (layer_idx - self.lambda_init_layer_offset))


__all__ = ["DiffTransformerConfig"]

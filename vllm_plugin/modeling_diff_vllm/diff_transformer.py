# Copyright 2026 The modeling_diff authors. All rights reserved.
#
# Differential attention follows Ye et al., "Differential Transformer" (ICLR 2025, arXiv 2410.05258) and
# DIFF V2 (microsoft/unilm, Diff-Transformer/Diff-Transformer-V2); PolyNorm follows Zhuo et al. (arXiv 2411.03884) as
# Motif-2.6B uses it. The decoder layer is vLLM's Llama layer, written out with these attentions and MLPs.
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
"""Inference-only DiffTransformer for vLLM: vLLM's Llama with differential attention (paper V1 and DIFF V2).

It computes what `modeling_diff.DiffTransformerForCausalLM` computes, on vLLM's paged KV cache (continuous batching,
prefix caching), with the same head layout and the same checkpoint names:

- V1: query heads 2i and 2i+1 are q1 and q2 of differential head i; key heads 2j and 2j+1 are k1 and k2 of KV group
  j, read as one 2·head_dim key k1‖k2 next to a 2·head_dim value. One `Attention` call with 2·head_dim-wide heads:
  q1 is zero-padded on the right and q2 on the left, so q1·(k1‖k2) = q1·k1 and q2·(k1‖k2) = q2·k2 (scale
  1/√head_dim). Then a1 − λ·a2, λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init (× `lambda_scale`), and an RMSNorm over the
  2·head_dim head with its gain × (1 − λ_init). The cache holds num_key_value_heads / 2 heads of 2·head_dim: Llama's
  bytes.
- V2: one `Attention` call with 2·heads query heads of head_dim on the KV heads; out_h = a_2h − σ(W_λ x)_h · a_2h+1
  (× `lambda_scale`); `o_proj` reads heads · head_dim.

The MLP is vLLM's `LlamaMLP` for `hidden_act="silu"`. For `hidden_act="poly_norm"` (Motif-2.6B imported by
`modeling_diff_conversion`) it is down(PolyNorm(gate(x)) · up(x)), PolyNorm(x) = w0·n(x³) + w1·n(x²) + w2·n(x) + b,
n(u) = u / sqrt(mean(u²) + 1e-6) over the intermediate dimension, in float32; its weights load from the checkpoint's
`mlp.act_fn.weight` (3) and `mlp.act_fn.bias` (1).

Tensor parallelism (vLLM's parallel linear layers): q/k/v are split by heads, so each rank holds a contiguous block
of query heads and the KV heads they read; `o_proj` is split by its input (those heads' outputs) and all-reduced.
A differential head stays whole on one rank exactly when the KV units divide by the TP size: V1's KV groups
(k1‖k2 and their 2·head_dim value), V2's KV heads. V1's λ vectors and head norm are replicated; V2's `lambda_proj`
is split by output rows, one per differential head, with those heads. The MLP is split as Llama's (gate and up by
output rows, down by input columns); PolyNorm's mean runs over the whole intermediate dimension, so each rank's sums
of u² are all-reduced before the division; its four weights are replicated.
"""

import torch
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.llama import LlamaForCausalLM, LlamaMLP
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

# RoPE types whose vLLM implementation equals transformers' at every position (the others are refused at start:
# transformers' "dynamic" rescales with the sequence length, vLLM's with the maximum length, for one)
ROPE_TYPES = ("default", "linear", "llama3")
# MLP activations: vLLM's Llama MLP (SiLU) and Motif-2.6B's PolyNorm
ACTIVATIONS = ("silu", "poly_norm")


def check_servable(config, tp_size: int) -> None:
    """Raise a one-sentence `ValueError` naming the limit when this plugin cannot serve `config` on `tp_size` ranks:
    a RoPE type whose vLLM implementation differs from transformers', an activation other than SiLU and PolyNorm, or a
    TP size that would split a differential head from its keys."""
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_type={rope_type!r} is not served by the DiffTransformer vLLM plugin: it serves {list(ROPE_TYPES)}, "
            "whose vLLM rotary embeddings equal transformers'."
        )
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"hidden_act={config.hidden_act!r} is not served by the DiffTransformer vLLM plugin: it serves "
            f"{list(ACTIVATIONS)}."
        )
    if config.diff_version == 1:  # a KV group: k1‖k2 and its 2·head_dim value
        units, what = config.num_key_value_heads // 2, "KV groups (num_key_value_heads / 2)"
    else:  # a KV head and the query-head pairs that read it
        units, what = config.num_key_value_heads, "KV heads (num_key_value_heads)"
    if units % tp_size:
        fits = [n for n in range(1, units + 1) if units % n == 0]
        raise ValueError(
            f"tensor_parallel_size={tp_size} cannot keep the differential heads of this diff_version="
            f"{config.diff_version} model whole on each rank: its {units} {what} do not divide by {tp_size}; "
            f"use a tensor_parallel_size in {fits}."
        )


def check_head_size(attn: Attention, head_size: int, what: str) -> None:
    """Raise a one-sentence `ValueError` when the attention backend vLLM chose cannot take `head_size`."""
    backend = attn.get_attn_backend()
    if not backend.supports_head_size(head_size):
        raise ValueError(
            f"{what} attends with {head_size}-wide heads, which vLLM's {backend.get_name()} attention backend does "
            f"not support (it takes {backend.get_supported_head_sizes()}), so this model cannot be served here."
        )


class DiffTransformerHeadNorm(nn.Module):
    """V1's per-head RMSNorm over 2·head_dim, its gain scaled by (1 − λ_init); checkpoint name `self_attn.subln`."""

    def __init__(self, width: int, lambda_init: float, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.scale = 1 - lambda_init
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.scale
        return nn.functional.rms_norm(hidden_states, weight.shape, weight, self.variance_epsilon)


class DiffTransformerV1Attention(nn.Module):
    """The paper's differential attention in one `Attention` call of 2·head_dim-wide heads (see the module doc)."""

    def __init__(
        self,
        config,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        max_position_embeddings: int = 8192,
        quant_config: QuantizationConfig | None = None,
        bias: bool = False,
        bias_o_proj: bool = False,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
        attn_type: str = AttentionType.DECODER,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()  # divides the KV units: `check_servable`
        self.config = config
        self.head_dim = d = config.head_dim
        self.num_maps = num_heads // tp_size  # query heads on this rank: q1 and q2 of each differential head
        self.num_heads = self.num_maps // 2  # differential heads on this rank
        num_kv_groups = num_kv_heads // 2 // tp_size  # (k1‖k2, v) groups on this rank
        self.q_size = self.num_maps * d
        self.kv_size = num_kv_groups * 2 * d

        self.qkv_proj = QKVParallelLinear(
            hidden_size=hidden_size,
            head_size=d,
            total_num_heads=num_heads,
            total_num_kv_heads=num_kv_heads,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            input_size=num_heads * d,
            output_size=hidden_size,
            bias=bias_o_proj,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            d, max_position=max_position_embeddings, rope_parameters=config.rope_parameters, is_neox_style=True
        )
        self.attn = Attention(
            self.num_maps,
            2 * d,
            d**-0.5,
            num_kv_heads=num_kv_groups,
            cache_config=cache_config,
            quant_config=quant_config,
            attn_type=attn_type,
            prefix=f"{prefix}.attn",
        )
        check_head_size(self.attn, 2 * d, f"DiffTransformer V1 (head_dim {d}, keys and values k1‖k2 of 2·{d})")

        self.lambda_init = config.lambda_init_for_layer(extract_layer_index(prefix))
        self.lambda_q1 = nn.Parameter(torch.zeros(d))
        self.lambda_k1 = nn.Parameter(torch.zeros(d))
        self.lambda_q2 = nn.Parameter(torch.zeros(d))
        self.lambda_k2 = nn.Parameter(torch.zeros(d))
        head_norm_eps = config.rms_norm_eps if config.head_norm_eps is None else config.head_norm_eps
        self.subln = DiffTransformerHeadNorm(2 * d, self.lambda_init, head_norm_eps)

    def lambda_full(self) -> torch.Tensor:
        """The layer's scalar λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, × lambda_scale, in float32."""
        lambda_1 = torch.exp(torch.dot(self.lambda_q1.float(), self.lambda_k1.float()))
        lambda_2 = torch.exp(torch.dot(self.lambda_q2.float(), self.lambda_k2.float()))
        return (lambda_1 - lambda_2 + self.lambda_init) * self.config.lambda_scale

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        d = self.head_dim
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)  # (T, maps·d), (T, 2·groups·d): k heads 2j, 2j+1 are group j's k1‖k2
        # q1 -> q1‖0 and q2 -> 0‖q2: diag_embed puts the map index on the diagonal of a (map, half) pair of dims
        q = q.view(-1, self.num_heads, 2, d).transpose(-1, -2)  # (T, heads, d, map)
        q = torch.diag_embed(q, dim1=-3, dim2=-2).reshape(-1, self.num_maps * 2 * d)  # (T, maps·2d)
        attn_output = self.attn(q, k, v).view(-1, self.num_heads, 2, 2 * d)  # (T, heads, map, 2d)
        # a float32 scalar: as a 0-dim tensor it leaves the dtype of the activations it multiplies
        attn_output = torch.addcmul(attn_output[:, :, 0], self.lambda_full(), attn_output[:, :, 1], value=-1)
        attn_output = self.subln(attn_output)  # (T, heads, 2d)
        output, _ = self.o_proj(attn_output.reshape(-1, self.num_heads * 2 * d))
        return output


class DiffTransformerV2Attention(nn.Module):
    """DIFF V2: one `Attention` call with 2·heads query heads, then a_2h − σ(W_λ x)_h · a_2h+1 (see the module doc)."""

    def __init__(
        self,
        config,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        max_position_embeddings: int = 8192,
        quant_config: QuantizationConfig | None = None,
        bias: bool = False,
        bias_o_proj: bool = False,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
        attn_type: str = AttentionType.DECODER,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()  # divides the KV units: `check_servable`
        self.config = config
        self.head_dim = d = config.head_dim
        self.num_maps = num_heads // tp_size  # query heads on this rank, two per differential head
        self.num_heads = self.num_maps // 2  # differential (output) heads on this rank
        self.q_size = self.num_maps * d
        self.kv_size = num_kv_heads // tp_size * d

        self.qkv_proj = QKVParallelLinear(
            hidden_size=hidden_size,
            head_size=d,
            total_num_heads=num_heads,
            total_num_kv_heads=num_kv_heads,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            input_size=num_heads // 2 * d,
            output_size=hidden_size,
            bias=bias_o_proj,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        # one output row per differential head, split with those heads; not quantized (a handful of rows)
        self.lambda_proj = ColumnParallelLinear(
            hidden_size, num_heads // 2, bias=False, gather_output=False, prefix=f"{prefix}.lambda_proj"
        )
        self.rotary_emb = get_rope(
            d, max_position=max_position_embeddings, rope_parameters=config.rope_parameters, is_neox_style=True
        )
        self.attn = Attention(
            self.num_maps,
            d,
            d**-0.5,
            num_kv_heads=num_kv_heads // tp_size,
            cache_config=cache_config,
            quant_config=quant_config,
            attn_type=attn_type,
            prefix=f"{prefix}.attn",
        )
        check_head_size(self.attn, d, f"DiffTransformer V2 (head_dim {d})")

    def lambda_gate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """σ(W_λ x) per token and differential head on this rank, × lambda_scale: (T, hidden) -> (T, heads)."""
        lambda_gate, _ = self.lambda_proj(hidden_states)
        lambda_gate = torch.sigmoid(lambda_gate)
        if self.config.lambda_scale != 1.0:
            lambda_gate = lambda_gate * self.config.lambda_scale
        return lambda_gate

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        attn_output = self.attn(q, k, v).view(-1, self.num_heads, 2, self.head_dim)  # (T, heads, map, d)
        lambda_gate = self.lambda_gate(hidden_states)  # (T, heads)
        attn_output = torch.addcmul(attn_output[:, :, 0], lambda_gate.unsqueeze(-1), attn_output[:, :, 1], value=-1)
        output, _ = self.o_proj(attn_output.reshape(-1, self.num_heads * self.head_dim))
        return output


class DiffTransformerPolyNorm(nn.Module):
    """PolyNorm(x) = w0·n(x³) + w1·n(x²) + w2·n(x) + b, n(u) = u / sqrt(mean(u²) + eps), in float32; checkpoint names
    `mlp.act_fn.weight` and `mlp.act_fn.bias`. The mean is over all `intermediate_size` columns; under tensor
    parallelism each rank holds a slice of them, so the sums of u² are all-reduced across the TP group."""

    def __init__(self, intermediate_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((3,), 1 / 3))
        self.bias = nn.Parameter(torch.zeros(1))
        self.intermediate_size = intermediate_size  # across all ranks
        self.tp_size = get_tensor_model_parallel_world_size()
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        powers = torch.stack((x**3, x**2, x))  # (3, T, intermediate / tp)
        sum_squares = powers.pow(2).sum(-1, keepdim=True)  # (3, T, 1)
        if self.tp_size > 1:
            sum_squares = tensor_model_parallel_all_reduce(sum_squares)
        normed = powers * torch.rsqrt(sum_squares / self.intermediate_size + self.variance_epsilon)
        weight, bias = self.weight.float(), self.bias.float()
        output = weight[0] * normed[0] + weight[1] * normed[1] + weight[2] * normed[2] + bias
        return output.to(hidden_states.dtype)


class DiffTransformerPolyNormMLP(nn.Module):
    """down(PolyNorm(gate(x)) · up(x)) with vLLM's parallel layers, split as `LlamaMLP` splits its own."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        quant_config: QuantizationConfig | None = None,
        bias: bool = False,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            input_size=hidden_size,
            output_sizes=[intermediate_size] * 2,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            input_size=intermediate_size,
            output_size=hidden_size,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = DiffTransformerPolyNorm(intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        gate, up = gate_up.chunk(2, dim=-1)  # (T, intermediate / tp) each
        x, _ = self.down_proj(self.act_fn(gate) * up)
        return x


class DiffTransformerDecoderLayer(nn.Module):
    """vLLM's Llama decoder layer with this config's differential attention, and PolyNorm's MLP for
    `hidden_act="poly_norm"` (vLLM's `LlamaDecoderLayer` builds a SiLU `LlamaMLP` whatever the config says)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        super().__init__()
        config = config or vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        attention = DiffTransformerV1Attention if config.diff_version == 1 else DiffTransformerV2Attention
        self.self_attn = attention(
            config=config,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            max_position_embeddings=config.max_position_embeddings,
            quant_config=quant_config,
            bias=config.attention_bias,  # q, k, v and o alike
            bias_o_proj=config.attention_bias,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.self_attn",
        )
        if config.hidden_act == "poly_norm":
            self.mlp = DiffTransformerPolyNormMLP(
                hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size,
                quant_config=quant_config,
                bias=config.mlp_bias,
                prefix=f"{prefix}.mlp",
            )
        else:  # "silu": `check_servable` refused the others
            self.mlp = LlamaMLP(
                hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size,
                hidden_act=config.hidden_act,
                quant_config=quant_config,
                bias=config.mlp_bias,
                prefix=f"{prefix}.mlp",
            )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # vLLM's RMSNorm adds the residual and normalizes in one step, returning both
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


class DiffTransformerForCausalLM(LlamaForCausalLM):
    """vLLM's Llama causal LM (embedding, final norm, LM head, tied or not, weight loading) over DiffTransformer
    decoder layers."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        check_servable(vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=DiffTransformerDecoderLayer)

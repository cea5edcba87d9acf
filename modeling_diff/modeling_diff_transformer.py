# Copyright 2026 The modeling_diff authors. All rights reserved.
#
# Differential attention follows Ye et al., "Differential Transformer" (ICLR 2025, arXiv 2410.05258) and
# DIFF V2 (microsoft/unilm, Diff-Transformer/Diff-Transformer-V2). The decoder block is Llama's.
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
"""PyTorch DiffTransformer: a Llama decoder with differential attention (paper V1 and DIFF V2)."""

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.generation import GenerationMixin
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple, is_peft_available
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_diff_transformer import DiffTransformerConfig


# Copied from transformers.models.llama.modeling_llama.LlamaRMSNorm with Llama->DiffTransformer
class DiffTransformerRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps: float = 1e-6) -> None:
        """
        DiffTransformerRMSNorm is equivalent to T5LayerNorm
        """
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class DiffTransformerHeadNorm(nn.Module):
    def __init__(self, head_dim: int, lambda_init: float, eps: float = 1e-6) -> None:
        """V1's per-head parameters: the four vectors of λ and the RMSNorm of the difference.

        λ = exp(λq1·λk1) - exp(λq2·λk2) + λ_init is reparametrised by four `head_dim` vectors; the difference
        a1 - λ·a2 of each 2·head_dim-wide head goes through an RMSNorm whose gain is scaled by (1 - λ_init).
        They form one module so that PEFT, which trains whole modules (`modules_to_save=["head_norm"]`), can train them
        (docs/design.md). Checkpoints name them as the paper does, see `V1_CHECKPOINT_NAMES`.
        """
        super().__init__()
        self.lambda_init = lambda_init
        self.lambda_q1 = nn.Parameter(torch.zeros(head_dim))
        self.lambda_k1 = nn.Parameter(torch.zeros(head_dim))
        self.lambda_q2 = nn.Parameter(torch.zeros(head_dim))
        self.lambda_k2 = nn.Parameter(torch.zeros(head_dim))
        self.weight = nn.Parameter(torch.ones(2 * head_dim))
        self.scale = 1 - lambda_init
        self.variance_epsilon = eps

    def lambda_full(self) -> torch.Tensor:
        """The layer's scalar λ = exp(λq1·λk1) - exp(λq2·λk2) + λ_init, in float32."""
        lambda_1 = torch.exp(torch.dot(self.lambda_q1.float(), self.lambda_k1.float()))
        lambda_2 = torch.exp(torch.dot(self.lambda_q2.float(), self.lambda_k2.float()))
        return lambda_1 - lambda_2 + self.lambda_init

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # one rms_norm call with the (1 - λ_init) scale folded into the 2·head_dim gain
        weight = self.weight * self.scale
        return nn.functional.rms_norm(hidden_states, weight.shape, weight, self.variance_epsilon)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, lambda_init={self.lambda_init}, eps={self.variance_epsilon}"


# V1 checkpoints keep the paper's names for λ and the head norm (`self_attn.lambda_q1`, `self_attn.subln.weight`), so
# that every saved model, converted checkpoint and older copy of this code reads them; in memory they live in
# `self_attn.head_norm`. transformers renames them on load and back on save. V2 has nothing to rename.
V1_CHECKPOINT_NAMES = [
    WeightRenaming(r"\.self_attn\.subln\.weight", ".self_attn.head_norm.weight"),
    WeightRenaming(r"\.self_attn\.(lambda_q1|lambda_k1|lambda_q2|lambda_k2)", r".self_attn.head_norm.\1"),
]


def register_checkpoint_names(config: DiffTransformerConfig) -> None:
    """Register the renaming of `config`'s variant with transformers: V1's names, and none for V2.

    transformers looks a model's renaming up by its model type after it builds the model in `from_pretrained` and
    when it saves, and V1 and V2 share one model type: the models register their variant's renaming when built (in
    `post_init`) and again before saving, so the one in place is always the variant's own. A renaming left by the
    other variant loads and saves the same files (V1's names occur in no V2 checkpoint).
    """
    # CODEPATH: diff_version=1 checkpoints (the paper, DiffLlama conversions) carry the paper's names; diff_version=2
    # checkpoints have nothing to rename.
    renaming = list(V1_CHECKPOINT_NAMES) if config.diff_version == 1 else []
    register_checkpoint_conversion_mapping(config.model_type, renaming, overwrite=True)


# Copied from transformers.models.llama.modeling_llama.LlamaRotaryEmbedding with Llama->DiffTransformer
class DiffTransformerRotaryEmbedding(nn.Module):
    def __init__(self, config: DiffTransformerConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings

        self.config = config

        self.rope_type = self.config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(self.config)

        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: DiffTransformerConfig, **kwargs) -> tuple[torch.Tensor, float]:
        """
        Computes the inverse frequencies according to the original RoPE implementation
        Args:
            config ([`~transformers.PreTrainedConfig`]):
                The model configuration.
        Returns:
            Tuple of (`torch.Tensor`, `float`), containing the inverse frequencies for the RoPE embeddings and the
            post-processing scaling factor applied to the computed cos/sin (unused in this type of RoPE).
        """
        base = config.rope_parameters["rope_theta"]
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

        attention_factor = 1.0  # Unused in this type of RoPE
        # Compute the inverse frequencies
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, attention_factor

    @dynamic_rope_update  # power user: used with advanced RoPE types (e.g. dynamic rope)
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling

        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


# Copied from transformers.models.llama.modeling_llama.rotate_half
def rotate_half(x):
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


# Copied from transformers.models.llama.modeling_llama.apply_rotary_pos_emb
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Applies Rotary Position Embedding to the query and key tensors.

    Args:
        q (`torch.Tensor`): The query tensor.
        k (`torch.Tensor`): The key tensor.
        cos (`torch.Tensor`): The cosine part of the rotary embedding.
        sin (`torch.Tensor`): The sine part of the rotary embedding.
        unsqueeze_dim (`int`, *optional*, defaults to 1):
            The 'unsqueeze_dim' argument specifies the dimension along which to unsqueeze cos[position_ids] and
            sin[position_ids] so that they can be properly broadcasted to the dimensions of q and k. For example, note
            that cos[position_ids] and sin[position_ids] have the shape [batch_size, seq_len, head_dim]. Then, if q and
            k have the shape [batch_size, heads, seq_len, head_dim], then setting unsqueeze_dim=1 makes
            cos[position_ids] and sin[position_ids] broadcastable to the shapes of q and k. Similarly, if q and k have
            the shape [batch_size, seq_len, heads, head_dim], then set unsqueeze_dim=2.
    Returns:
        `tuple(torch.Tensor)` comprising of the query and key tensors rotated using the Rotary Position Embedding.
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


class DiffTransformerPolyNorm(nn.Module):
    def __init__(self, eps: float = 1e-6) -> None:
        """PolyNorm (Zhuo et al., arXiv 2411.03884), Motif-2.6B's learned MLP activation (`hidden_act="poly_norm"`):

            PolyNorm(x) = w0·norm(x³) + w1·norm(x²) + w2·norm(x) + b,   norm(u) = u / sqrt(mean(u²) + eps)

        with the mean over the last dimension, computed in float32.
        """
        super().__init__()
        self.weight = nn.Parameter(torch.full((3,), 1 / 3))
        self.bias = nn.Parameter(torch.zeros(1))
        self.variance_epsilon = eps

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        weight, bias = self.weight.float(), self.bias.float()
        output = weight[0] * self.norm(x**3) + weight[1] * self.norm(x**2) + weight[2] * self.norm(x) + bias
        return output.to(input_dtype)

    def extra_repr(self):
        return f"eps={self.variance_epsilon}"


class DiffTransformerMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.mlp_bias)
        # CODEPATH: "poly_norm" is Motif-2.6B's learned activation (imported checkpoints); every other name is one of
        # transformers' activations, as in Llama.
        self.act_fn = DiffTransformerPolyNorm() if config.hidden_act == "poly_norm" else ACT2FN[config.hidden_act]

    # Copied from transformers.models.llama.modeling_llama.LlamaMLP.forward
    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


# Copied from transformers.models.llama.modeling_llama.repeat_kv
def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """
    This is the equivalent of torch.repeat_interleave(x, dim=1, repeats=n_rep). The hidden states go from (batch,
    num_key_value_heads, seqlen, head_dim) to (batch, num_attention_heads, seqlen, head_dim)
    """
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def pairs_as_one_head(states: torch.Tensor) -> torch.Tensor:
    """(..., 2·n, d) -> (..., n, 2d): heads 2j and 2j+1 read as one head twice as wide (a view when contiguous)."""
    return states.unflatten(-2, (-1, 2)).flatten(-2)


def head_major_pairs_as_one_head(states: torch.Tensor) -> torch.Tensor:
    """(B, 2·n, S, d) -> (B, n, S, 2d): heads 2j and 2j+1 of a head-major cache as one head twice as wide (a copy)."""
    return states.unflatten(1, (-1, 2)).transpose(2, 3).flatten(-2)


# Copied from transformers.models.llama.modeling_llama.eager_attention_forward
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()

    return attn_output, attn_weights


def differential(pairs: torch.Tensor, lambda_: torch.Tensor, lambda_scale: float, dim: int) -> torch.Tensor:
    """The differential step a1 - λ·a2 of every differential head, on the softmax maps or on their outputs.

    `pairs` holds the two maps of differential head h (or their outputs) at 2h and 2h+1 along `dim`, so
    (..., 2·heads, ...) -> (..., heads, ...). `lambda_` broadcasts against either half: V1's scalar λ, V2's per-token
    gate sigmoid(λ(x)). Both variants and every path (eager maps, inference, training) go through here.
    """
    # CODEPATH: lambda_scale is 1.0 in every checkpoint (no multiply per layer and token); below 1 only while a
    # training run ramps the subtraction in.
    if lambda_scale != 1.0:
        lambda_ = lambda_ * lambda_scale
    a1, a2 = pairs.unflatten(dim, (-1, 2)).unbind(dim + 1)
    # one addcmul: no intermediate tensor for λ·a2
    return torch.addcmul(a1, lambda_, a2, value=-1)


class DiffTransformerV1Attention(nn.Module):
    """Differential attention of the paper (V1):

        out_i = (softmax(q1_i k1ᵀ/√d) - λ softmax(q2_i k2ᵀ/√d)) v,   λ = exp(λq1·λk1) - exp(λq2·λk2) + λ_init

    followed by a per-head RMSNorm over the 2·head_dim-wide head and a (1 - λ_init) scale.

    Layout: query heads 2i and 2i+1 are q1 and q2 of differential head i; key heads 2j and 2j+1 are k1 and k2 of KV
    group j, whose value is 2·head_dim wide. The cache stores k1‖k2 as one 2·head_dim key per group, the same head
    count and width as the value, so it holds exactly Llama's bytes. A cache laid out ahead for Llama's
    head_dim-wide heads (paged, or statically allocated early) holds the same bytes as two heads per group.

    Both maps come from ONE call of the attention interface. q1 is zero-padded on the right and q2 on the left to
    2·head_dim, so that q1·(k1‖k2) = q1·k1 and q2·(k1‖k2) = q2·k2, exactly. Every backend then sees q, k and v of
    one width (what flash kernels need), the cache key is used in place (no slicing or copy per decode step), and
    GQA runs natively. The price is QKᵀ at twice the width, which costs less than the alternatives: more attention
    calls, a value wider than the key (which falls off the fused kernels), or materialised T×T maps.
    """

    def __init__(self, config: DiffTransformerConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        num_kv_groups = config.num_key_value_heads // 2  # (k1‖k2, v) groups
        # the interface sees num_attention_heads maps (q1 and q2 of each differential head) on num_kv_groups keys
        self.num_key_value_groups = config.num_attention_heads // num_kv_groups
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.lambda_init = config.lambda_init_for_layer(layer_idx)

        self.q_proj = nn.Linear(
            config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias
        )
        self.k_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.v_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias
        )
        head_norm_eps = config.rms_norm_eps if config.head_norm_eps is None else config.head_norm_eps
        self.head_norm = DiffTransformerHeadNorm(self.head_dim, self.lambda_init, eps=head_norm_eps)

    def lambda_full(self) -> torch.Tensor:
        """The layer's scalar λ, in float32."""
        return self.head_norm.lambda_full()

    def cache_is_allocated_by_head_dim(self, cache: Cache) -> bool:
        """Whether this layer's cache was allocated ahead with Llama's head_dim-wide heads, not by its first write."""
        layers = getattr(cache, "layers", [])
        if self.layer_idx >= len(layers) or not layers[self.layer_idx].is_initialized:
            return False
        return layers[self.layer_idx].keys.shape[-1] == self.head_dim

    def differential_head_norm(self, attn_output: torch.Tensor, lambda_full: torch.Tensor) -> torch.Tensor:
        """(B, T, 2·heads, 2d) outputs of the maps -> (B, T, heads, 2d): head_norm(a1 - λ·a2)."""
        return self.head_norm(differential(attn_output, lambda_full, self.config.lambda_scale, dim=2))

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, q_len = hidden_states.shape[:-1]
        d = self.head_dim

        query = self.q_proj(hidden_states).view(batch, q_len, -1, d)  # (B, T, 2·heads, d)
        key = self.k_proj(hidden_states).view(batch, q_len, -1, d)  # (B, T, 2·groups, d)
        value = self.v_proj(hidden_states).view(batch, q_len, -1, 2 * d)  # (B, T, groups, 2d)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=2)

        if isinstance(cache, PagedAttentionCache):
            # CODEPATH: continuous batching. The paged cache is token-major and sized for num_key_value_heads heads of
            # head_dim, so each group's k1‖k2 key and its 2d value are written as two head_dim-wide heads (the same
            # bytes) and read back as one 2d-wide head by a view: nothing is copied.
            key_states, value_states = cache.update(
                key.transpose(1, 2), value.view(batch, q_len, -1, d).transpose(1, 2), self.layer_idx, kwargs=kwargs
            )  # (B, 2·groups, S, d), each a transposed (B, S, 2·groups, d) tensor
            key_states = pairs_as_one_head(key_states.transpose(1, 2)).transpose(1, 2)  # (B, groups, S, 2d)
            value_states = pairs_as_one_head(value_states.transpose(1, 2)).transpose(1, 2)
            for name in ("k_cache", "v_cache"):  # flash decode reads and writes the pages itself: same reading
                if kwargs.get(name) is not None:
                    kwargs[name] = pairs_as_one_head(kwargs[name])
        elif cache is not None and self.cache_is_allocated_by_head_dim(cache):
            # A cache allocated ahead from num_key_value_heads × head_dim (early initialisation, ExecuTorch export):
            # each group's k1‖k2 key and its 2d value are written as two head_dim-wide heads (the same bytes). The
            # cache is head-major, so reading them back as one 2d-wide head copies this layer's cache.
            key_states, value_states = cache.update(
                key.transpose(1, 2), value.view(batch, q_len, -1, d).transpose(1, 2), self.layer_idx, kwargs=kwargs
            )  # (B, 2·groups, S, d)
            key_states = head_major_pairs_as_one_head(key_states)  # (B, groups, S, 2d)
            value_states = head_major_pairs_as_one_head(value_states)
        else:
            # every other cache is shaped by its first write: it stores the (B, groups, T, 2d) states as they are
            key_states = key.reshape(batch, q_len, -1, 2 * d).transpose(1, 2)  # (B, groups, T, 2d) = k1‖k2
            value_states = value.transpose(1, 2)  # (B, groups, T, 2d)
            if cache is not None:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        # q1 -> q1‖0 and q2 -> 0‖q2 in one op: diag_embed puts the map index m on the diagonal of a new
        # (map, half) pair of dims. Maps stay adjacent (2i, 2i+1 = q1, q2 of head i), so a KV group's maps are
        # contiguous, as GQA needs.
        query = query.view(batch, q_len, -1, 2, d).transpose(-1, -2)  # (B, T, heads, d, 2)
        query_states = torch.diag_embed(query, dim1=-3, dim2=-2)  # (B, T, heads, 2, 2, d)
        query_states = query_states.view(batch, q_len, -1, 2 * d).transpose(1, 2)  # (B, 2·heads, T, 2d)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )  # (B, T, 2·heads, 2d), and the maps (B, 2·heads, T, S) from eager

        if attn_weights is not None and attn_weights.dim() != 4:
            attn_weights = None  # flex_attention on an accelerator returns each row's log-sum-exp, not the maps

        # a float32 scalar: as a 0-dim tensor it leaves the dtype of the bf16/fp16 activations it multiplies
        lambda_full = self.lambda_full()
        if attn_weights is not None:
            # CODEPATH: eager (the inspection path). The output is computed from the differential map itself,
            # (A1 - λ·A2)·V, so the map returned as `attentions` is in the autograd graph; this costs one more A·V.
            attn_weights = differential(attn_weights, lambda_full, self.config.lambda_scale, dim=1)  # (B, heads, T, S)
            value_states = repeat_kv(value_states, attn_weights.shape[1] // value_states.shape[1])
            attn_output = self.head_norm(torch.matmul(attn_weights, value_states).transpose(1, 2))  # (B, T, heads, 2d)
        elif self.training and torch.is_grad_enabled():
            # CODEPATH: training. The subtraction and the head norm are recomputed in the backward pass rather than
            # storing their two (B, T, heads, 2d) results: the maps' output is kept by the attention kernel anyway,
            # so this drops two of the four activations V1 adds to Llama's per layer for two elementwise passes.
            attn_output = checkpoint(
                self.differential_head_norm, attn_output, lambda_full, use_reentrant=False, preserve_rng_state=False
            )
        else:
            attn_output = self.differential_head_norm(attn_output, lambda_full)  # (B, T, heads, 2d)
        attn_output = self.o_proj(attn_output.reshape(batch, q_len, -1))
        return attn_output, attn_weights


class DiffTransformerV2Attention(nn.Module):
    """Differential attention of DIFF V2:

        out_h = attn_{2h} - sigmoid(λ_h(x)) · attn_{2h+1},   λ(x) = W_λ x   (per token, per head)

    Query heads 2h and 2h+1 are ordinary softmax heads on the same KV group, so one standard attention call
    computes all of them; there is no per-head norm, and `o_proj` reads `num_attention_heads // 2` heads.
    """

    def __init__(self, config: DiffTransformerConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // 2  # differential (output) heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        self.q_proj = nn.Linear(
            config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias
        )
        self.k_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.v_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        self.lambda_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, q_len = hidden_states.shape[:-1]
        hidden_shape = (batch, q_len, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, 2·heads, T, d)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, kv_heads, T, d)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )  # (B, T, 2·heads, d), and the maps (B, 2·heads, T, S) from eager

        if attn_weights is not None and attn_weights.dim() != 4:
            attn_weights = None  # flex_attention on an accelerator returns each row's log-sum-exp, not the maps

        lambda_gate = torch.sigmoid(self.lambda_proj(hidden_states))  # (B, T, heads)
        if attn_weights is not None:
            # CODEPATH: eager (the inspection path). The output is computed from the differential map itself,
            # (A_2h - λ_h·A_2h+1)·V, so the map returned as `attentions` is in the autograd graph.
            gate = lambda_gate.transpose(1, 2).unsqueeze(-1)  # (B, heads, T, 1)
            attn_weights = differential(attn_weights, gate, self.config.lambda_scale, dim=1)  # (B, heads, T, S)
            value_states = repeat_kv(value_states, attn_weights.shape[1] // value_states.shape[1])
            attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2)  # (B, T, heads, d)
        else:
            gate = lambda_gate.unsqueeze(-1)  # (B, T, heads, 1)
            attn_output = differential(attn_output, gate, self.config.lambda_scale, dim=2)  # (B, T, heads, d)
        attn_output = self.o_proj(attn_output.reshape(batch, q_len, -1))
        return attn_output, attn_weights


class DiffTransformerDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DiffTransformerConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        # CODEPATH: diff_version=1 checkpoints (the paper, DiffLlama conversions) use the paper's attention;
        # diff_version=2 checkpoints (DIFF V2, the default Llama conversion) use the V2 attention.
        attention_class = DiffTransformerV1Attention if config.diff_version == 1 else DiffTransformerV2Attention
        self.self_attn = attention_class(config=config, layer_idx=layer_idx)
        self.mlp = DiffTransformerMLP(config)
        self.input_layernorm = DiffTransformerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DiffTransformerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    # Copied from transformers.models.llama.modeling_llama.LlamaDecoderLayer.forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        # Self Attention
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        # Fully Connected
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


@auto_docstring
class DiffTransformerPreTrainedModel(PreTrainedModel):
    config: DiffTransformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DiffTransformerDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": DiffTransformerDecoderLayer,
        "attentions": [DiffTransformerV1Attention, DiffTransformerV2Attention],
    }

    def post_init(self):
        super().post_init()
        register_checkpoint_names(self.config)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DiffTransformerHeadNorm):
            init.normal_(module.lambda_q1, 0, self.config.lambda_std_dev)
            init.normal_(module.lambda_k1, 0, self.config.lambda_std_dev)
            init.normal_(module.lambda_q2, 0, self.config.lambda_std_dev)
            init.normal_(module.lambda_k2, 0, self.config.lambda_std_dev)
            init.ones_(module.weight)
        elif isinstance(module, DiffTransformerPolyNorm):
            init.constant_(module.weight, 1 / 3)
            init.zeros_(module.bias)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with every head's Auto class in the config's `auto_map`.

        transformers writes only the saved class there; with all heads, a folder saved from any of them loads with
        `trust_remote_code=True` for every task (`AutoModel`, `AutoModelForSequenceClassification`, ...).
        """
        if self.is_remote_code():
            module = type(self).__module__.split(".")[-1]
            config_module = type(self.config).__module__.split(".")[-1]
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoConfig": f"{config_module}.{type(self.config).__name__}",
                **{auto_class.__name__: f"{module}.{head.__name__}" for auto_class, head in HEADS.items()},
            }
        register_checkpoint_names(self.config)
        return super().save_pretrained(save_directory, *args, **kwargs)


@auto_docstring
# Copied from transformers.models.llama.modeling_llama.LlamaModel with Llama->DiffTransformer
class DiffTransformerModel(DiffTransformerPreTrainedModel):
    def __init__(self, config: DiffTransformerConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DiffTransformerDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = DiffTransformerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DiffTransformerRotaryEmbedding(config=config)
        self.gradient_checkpointing = False

        # Initialize weights and apply final processing
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            inputs_embeds: torch.Tensor = self.embed_tokens(input_ids)

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache,
        )


@auto_docstring
class DiffTransformerForCausalLM(DiffTransformerPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    # Copied from transformers.models.llama.modeling_llama.LlamaForCausalLM.__init__ with Llama->DiffTransformer
    def __init__(self, config: DiffTransformerConfig):
        super().__init__(config)
        self.model = DiffTransformerModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        # Initialize weights and apply final processing
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        Example:

        ```python
        >>> import modeling_diff
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer

        >>> model = AutoModelForCausalLM.from_pretrained("path/to/converted-diff-model")
        >>> tokenizer = AutoTokenizer.from_pretrained("path/to/converted-diff-model")
        >>> inputs = tokenizer("The capital of France is", return_tensors="pt")
        >>> output_ids = model.generate(**inputs, max_new_tokens=20)
        ```"""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )

        hidden_states = outputs.last_hidden_state
        hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# The generic heads build their body with `AutoModel.from_config`, which does not know this model in a process that
# loaded it with `trust_remote_code` (nothing registered it there). Each head below builds `DiffTransformerModel`
# itself and keeps the generic forward.


class DiffTransformerForSequenceClassification(GenericForSequenceClassification, DiffTransformerPreTrainedModel):
    def __init__(self, config: DiffTransformerConfig):
        DiffTransformerPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = DiffTransformerModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)

        # Initialize weights and apply final processing
        self.post_init()


class DiffTransformerForTokenClassification(GenericForTokenClassification, DiffTransformerPreTrainedModel):
    def __init__(self, config: DiffTransformerConfig):
        DiffTransformerPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = DiffTransformerModel(config)
        # the generic head's dropout: a config's own classifier_dropout, else 0.1
        classifier_dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if classifier_dropout is None else classifier_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)

        # Initialize weights and apply final processing
        self.post_init()


class DiffTransformerForQuestionAnswering(GenericForQuestionAnswering, DiffTransformerPreTrainedModel):
    def __init__(self, config: DiffTransformerConfig):
        DiffTransformerPreTrainedModel.__init__(self, config)
        self.model = DiffTransformerModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

        # Initialize weights and apply final processing
        self.post_init()


def register_peft_defaults() -> None:
    """Give this model type Llama's default PEFT target modules: its projections and norms have Llama's names.

    PEFT picks `target_modules` when a config leaves them out (`LoraConfig()`, as TRL's examples pass it) from tables
    keyed by `model_type`, and has no call to register one; so each table that has an entry for Llama gets the same
    entry for `diff_transformer`. Without PEFT installed, nothing happens: the import sits under
    `if is_peft_available():`, the one place where transformers' scan of a `trust_remote_code` file lets an optional
    package be imported (it skips such blocks and `try` blocks, and requires every other import to be installed).
    """
    if is_peft_available():
        from peft.utils import constants

        for name, defaults in vars(constants).items():
            if name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(defaults, dict) and "llama" in defaults:
                defaults.setdefault(DiffTransformerConfig.model_type, defaults["llama"])


register_peft_defaults()


# Every head and the Auto class that loads it: `import modeling_diff` registers them, and `save_pretrained` writes all
# of them into `auto_map`.
HEADS = {
    AutoModel: DiffTransformerModel,
    AutoModelForCausalLM: DiffTransformerForCausalLM,
    AutoModelForSequenceClassification: DiffTransformerForSequenceClassification,
    AutoModelForTokenClassification: DiffTransformerForTokenClassification,
    AutoModelForQuestionAnswering: DiffTransformerForQuestionAnswering,
}


__all__ = [
    "DiffTransformerPreTrainedModel",
    "DiffTransformerModel",
    "DiffTransformerForCausalLM",
    "DiffTransformerForSequenceClassification",
    "DiffTransformerForTokenClassification",
    "DiffTransformerForQuestionAnswering",
]

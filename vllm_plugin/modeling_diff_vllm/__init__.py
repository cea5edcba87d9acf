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
"""DiffTransformer (paper V1 and DIFF V2) on vLLM: an out-of-tree model plugin.

Installed, it is found through the `vllm.general_plugins` entry point, so a folder saved by `modeling_diff` serves as
it is, without `trust_remote_code`:

    python -m vllm.entrypoints.openai.api_server --model FOLDER
    LLM(model=FOLDER)

`register()` teaches transformers the `diff_transformer` config (`configuration.py`: the very file `modeling_diff`
ships, `configuration_diff_transformer.py`, linked into this package, so the two cannot drift) and vLLM the
`DiffTransformerForCausalLM` architecture (`modeling_diff_vllm.diff_transformer`). vLLM calls it in every process
it starts.
"""

ARCHITECTURE = "DiffTransformerForCausalLM"


def register() -> None:
    """Register the config with transformers' `AutoConfig` and the model with vLLM's `ModelRegistry` (idempotent)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from .configuration import DiffTransformerConfig

    AutoConfig.register(DiffTransformerConfig.model_type, DiffTransformerConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # a "module:class" string: vLLM imports the model (and torch's kernels) only in the processes that build it
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}.diff_transformer:DiffTransformerForCausalLM")

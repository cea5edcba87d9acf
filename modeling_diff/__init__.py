"""The Differential Transformer (paper V1 and DIFF V2) as a Hugging Face Transformers model.

`import modeling_diff` registers the model with the Auto classes:

    >>> import modeling_diff
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> config = AutoConfig.for_model("diff_transformer", diff_version=2, hidden_size=256, num_attention_heads=8,
    ...                               num_key_value_heads=2, num_hidden_layers=2, intermediate_size=688)
    >>> model = AutoModelForCausalLM.from_config(config)

The classes are also registered "for auto class", so `save_pretrained` writes the code files and an `auto_map` that
names every head, and a saved or Hub copy loads with `trust_remote_code=True` on a machine without this package.
"""

from transformers import AutoConfig

from .configuration_diff_transformer import DiffTransformerConfig
from .modeling_diff_transformer import (
    HEADS,
    DiffTransformerForCausalLM,
    DiffTransformerForQuestionAnswering,
    DiffTransformerForSequenceClassification,
    DiffTransformerForTokenClassification,
    DiffTransformerModel,
    DiffTransformerPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(DiffTransformerConfig.model_type, DiffTransformerConfig, exist_ok=True)
DiffTransformerConfig.register_for_auto_class()
for auto_class, model_class in HEADS.items():
    auto_class.register(DiffTransformerConfig, model_class, exist_ok=True)
    model_class.register_for_auto_class(auto_class.__name__)

__all__ = [
    "DiffTransformerConfig",
    "DiffTransformerPreTrainedModel",
    "DiffTransformerModel",
    "DiffTransformerForCausalLM",
    "DiffTransformerForSequenceClassification",
    "DiffTransformerForTokenClassification",
    "DiffTransformerForQuestionAnswering",
]

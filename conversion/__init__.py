"""Checkpoints in and out (installed as `modeling_diff_conversion`): load any causal LM this project reads, convert a
Llama, DiffLlama or Motif-2.6B checkpoint into a DiffTransformer folder, write output folders safely, upload them.

from modeling_diff_conversion import convert, load_model
report = convert("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-diff", variant="v2")
print(report.summary())
model, tokenizer = load_model("smollm2-diff")
"""

from .convert import convert, target_config
from .loading import load_model, load_tokenizer, resolve_model_path
from .source import ConversionError, open_source
from .writing import ConversionReport

__all__ = [
    "convert",
    "ConversionReport",
    "ConversionError",
    "load_model",
    "load_tokenizer",
    "open_source",
    "resolve_model_path",
    "target_config",
]

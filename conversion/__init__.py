"""Llama / DiffLlama checkpoints -> DiffTransformer (installed as `modeling_diff_conversion`).

from modeling_diff_conversion import convert
report = convert("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-diff", variant="v2")
print(report.summary())
"""

from .convert import ConversionReport, convert, target_config
from .source import ConversionError, open_source

__all__ = ["convert", "ConversionReport", "ConversionError", "open_source", "target_config"]

"""Compare a converted DiffTransformer folder with its source: logits, greedy tokens and perplexity.

The two models are loaded one after the other (the source's outputs are kept, the model freed), so verification
needs the memory of one model, not two.
"""

import gc
import math
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

VERIFY_TEXTS = [
    "The Differential Transformer subtracts two softmax attention maps so that common-mode noise cancels.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of",
]
PERPLEXITY_TEXT = (
    "Python is a programming language that lets you work quickly and integrate systems more effectively. "
    "It is easy to learn, and its clear syntax makes programs short and readable. The standard library "
    "covers text processing, file formats, networking and much more, so that many tasks need no extra package."
)
CHAT_PROMPT = "What is the capital of France? Answer in one sentence."


@dataclass
class VerificationResult:
    """Figures from comparing a converted model with its source on a few fixed sequences."""

    max_abs_logit_diff: float
    greedy_agreement: float  # share of positions whose argmax token agrees
    greedy_identical: bool  # a greedy generation from the source prompt gives the same tokens
    source_ppl: float
    converted_ppl: float
    tolerance: float
    preserves_function: bool
    dtype: str
    source_answer: str = ""
    converted_answer: str = ""

    @property
    def passed(self) -> bool:
        """For a function-preserving conversion: logits within round-off and identical greedy tokens."""
        return self.max_abs_logit_diff <= self.tolerance and self.greedy_identical and self.greedy_agreement == 1.0

    def lines(self) -> list[str]:
        verdict = (
            ("PASS (same function)" if self.passed else "FAIL")
            if self.preserves_function
            else ("reported only (v1 from Llama changes the function)")
        )
        return [
            f"verification in {self.dtype}: {verdict}",
            f"max |Δlogit| = {self.max_abs_logit_diff:.3g} (tolerance {self.tolerance:.3g})",
            f"greedy-token agreement = {self.greedy_agreement:.1%}; greedy generation identical: "
            f"{'yes' if self.greedy_identical else 'no'}",
            f"perplexity on a short text: source {self.source_ppl:.3f}, converted {self.converted_ppl:.3f} "
            f"(gap {self.converted_ppl - self.source_ppl:+.3f})",
        ]


def _inputs(tokenizer, vocab_size: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(sequences for logits, perplexity ids, generation prompt ids)."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        seqs = [torch.randint(0, vocab_size, (1, 24), generator=g) for _ in range(3)]
        return seqs, torch.randint(0, vocab_size, (1, 48), generator=g), seqs[0][:, :8]
    seqs = [tokenizer(t, return_tensors="pt").input_ids for t in VERIFY_TEXTS]
    ppl_ids = tokenizer(PERPLEXITY_TEXT, return_tensors="pt").input_ids
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT_PROMPT}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        prompt = seqs[-1]
    return seqs, ppl_ids, prompt


@torch.no_grad()
def _run(model, seqs, ppl_ids, prompt, pad_token_id, max_new_tokens=16):
    model.eval()
    logits = [model(ids).logits[0].float() for ids in seqs]
    loss = model(ppl_ids, labels=ppl_ids).loss.item()
    generated = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    return logits, math.exp(loss), generated[0, prompt.shape[1] :]


def verification_dtype(n_params: int) -> torch.dtype:
    """float32 when one float32 copy of the model fits comfortably in free memory, else bfloat16."""
    return torch.float32 if n_params * 4 < 0.6 * psutil.virtual_memory().available else torch.bfloat16


def verify(
    source, converted_dir: Path, preserves_function: bool, weight_dtype: torch.dtype, n_params: int
) -> VerificationResult:
    """Run `source` and the converted model on the same inputs and compare them.

    The source's weights are first rounded to `weight_dtype` (the output's), exactly as the conversion rounded them,
    so that a bfloat16 conversion of a float32 source is compared like with like. `n_params`, the source's
    parameter count, decides whether both models run in float32 or, when that would not fit, bfloat16.
    """
    from modeling_diff import DiffTransformerForCausalLM

    tokenizer = source.tokenizer
    config = source.config
    dtype = verification_dtype(n_params)
    seqs, ppl_ids, prompt = _inputs(tokenizer, config.vocab_size)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad = pad if pad is not None else (config.eos_token_id if isinstance(config.eos_token_id, int) else 0)

    src_model = source.load_model(weight_dtype).to(dtype)
    src_logits, src_ppl, src_tokens = _run(src_model, seqs, ppl_ids, prompt, pad)
    del src_model
    source.in_memory_model = None  # a GGUF source's dequantised copy is no longer needed
    gc.collect()

    model = DiffTransformerForCausalLM.from_pretrained(converted_dir, dtype=dtype)
    logits, ppl, tokens = _run(model, seqs, ppl_ids, prompt, pad)
    del model
    gc.collect()

    return compare_runs(
        (src_logits, src_ppl, src_tokens), (logits, ppl, tokens), dtype, tokenizer, preserves_function
    )


def compare_runs(source_run, converted_run, dtype: torch.dtype, tokenizer, preserves_function: bool):
    """The `VerificationResult` of two runs on the same inputs, each (logits per sequence, perplexity, greedy
    tokens): the source's (or a reference's) and the converted model's."""
    src_logits, src_ppl, src_tokens = source_run
    logits, ppl, tokens = converted_run
    max_diff = max((a - b).abs().max().item() for a, b in zip(src_logits, logits))
    agree = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(src_logits, logits))
    total = sum(a.shape[0] for a in src_logits)
    scale = max(a.abs().max().item() for a in src_logits)
    # round-off grows with depth and logit size; bfloat16 keeps ~3 significant digits
    tolerance = (1e-4 if dtype == torch.float32 else 2e-2) * max(1.0, scale)
    decode = (lambda t: tokenizer.decode(t, skip_special_tokens=True).strip()) if tokenizer is not None else str
    return VerificationResult(
        max_abs_logit_diff=max_diff,
        greedy_agreement=agree / total,
        greedy_identical=torch.equal(src_tokens, tokens),
        source_ppl=src_ppl,
        converted_ppl=ppl,
        tolerance=tolerance,
        preserves_function=preserves_function,
        dtype=str(dtype).replace("torch.", ""),
        source_answer=decode(src_tokens),
        converted_answer=decode(tokens),
    )

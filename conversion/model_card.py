"""Render `model_card.md` (the template at the repository root) into a Hub-ready README.md."""

from pathlib import Path
from string import Template

TEMPLATE = Path(__file__).parent / "model_card.md"
VARIANT_NAMES = {1: "V1, the paper's differential attention", 2: "DIFF V2"}


def hub_metadata(base_model: str | None, license_name: str | None, tags: list[str] | None = None) -> str:
    """The YAML front matter the Hub reads: base_model, library_name, tags, pipeline_tag and the licence."""
    lines = []
    if base_model:
        lines += ["base_model:", f"- {base_model}"]
    lines += ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {tag}" for tag in ["diff-transformer", "differential-attention", "custom_code", *(tags or [])]]
    if license_name:
        lines.append(f"license: {license_name}")
    return "\n".join(lines)


def layout_text(config) -> str:
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    return (
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {heads} query heads "
        f"({heads // 2} differential heads) of width {config.head_dim}, {kv} KV heads, "
        f"vocabulary {config.vocab_size}."
    )


def render_model_card(
    config,
    *,
    title,
    summary,
    how,
    results,
    limitations,
    base_model=None,
    license_name=None,
    tags=None,
    repo_id="path/to/this/folder",
) -> str:
    """Fill the template; every argument is markdown text."""
    return Template(TEMPLATE.read_text()).substitute(
        metadata=hub_metadata(base_model, license_name, tags),
        title=title,
        summary=summary,
        variant_name=VARIANT_NAMES[config.diff_version],
        layout=layout_text(config),
        how=how,
        results=results,
        limitations=limitations,
        repo_id=repo_id,
    )


def write_model_card(path: Path, report, source, config):
    """The model card of a conversion: what was converted, how, and the verification figures."""
    base = source.base_model or Path(source.name).name
    if source.architecture == "DiffLlamaForCausalLM":
        how = (
            "Converted from transformers' DiffLlama, which is already the paper's V1 attention with another head "
            "pairing (query head i with i + H/2) and a non-affine per-head norm: heads were permuted into this "
            "layout and the norm weight set to ones, so the model computes exactly the same function."
        )
    elif report.variant == "v2":
        how = (
            "Converted from a Llama checkpoint to DIFF V2 so that it computes *the same function* at "
            "initialization: each Llama query head became both query heads of a differential pair, the λ "
            "projection starts at zero (sigmoid(0) = 1/2) and `o_proj` is doubled. The two heads of a pair "
            "receive opposite gradients, so fine-tuning makes them differential from the first step."
        )
    else:
        how = (
            "Converted from a Llama checkpoint to the paper's V1 layout: the Llama query heads of KV heads 2g and "
            "2g+1 became q1 and q2 of the differential heads of group g, and the two value heads were "
            "concatenated. **This does not preserve the function**: two Llama heads now share one map pair and a "
            "per-head norm, so the model must be fine-tuned (ideally distilled from the source) before use."
        )
    how += f"\n\nSource: `{report.source}` ({report.architecture}). Output dtype: {report.dtype}."
    if report.verification is not None:
        v = report.verification
        rows = [
            "| measure | value |",
            "| --- | --- |",
            f"| verification dtype | {v.dtype} |",
            f"| max \\|Δlogit\\| vs source | {v.max_abs_logit_diff:.3g} |",
            f"| greedy-token agreement | {v.greedy_agreement:.1%} |",
            f"| greedy generation identical | {'yes' if v.greedy_identical else 'no'} |",
            f"| perplexity (short text), source | {v.source_ppl:.3f} |",
            f"| perplexity (short text), converted | {v.converted_ppl:.3f} |",
        ]
        results = "Verification against the source right after conversion:\n\n" + "\n".join(rows)
    else:
        results = "Verification was skipped (`--no-verify`)."
    limitations = "Converted weights only: no training happened in this step. " + (
        "The function is the source's, so are its strengths and weaknesses."
        if report.preserves_function
        else "Expect degraded quality until it is fine-tuned."
    )
    text = render_model_card(
        config,
        title=f"{base} → DiffTransformer ({report.variant})",
        summary=f"A Differential Transformer converted from `{base}` with `diff-transformer convert`.",
        how=how,
        results=results,
        limitations=limitations,
        base_model=source.base_model,
        license_name=source.license,
    )
    path.write_text(text)

"""Evaluation tasks and corpora for causal LMs (installed as `modeling_diff_eval`).

Works on any causal LM folder (Llama, DiffLlama or DiffTransformer): perplexity, multi-needle retrieval,
attention noise and activation outliers, plus the offline text corpora that the CLI and the studies train on.
"""

"""Timing and memory of the models against Llama: `python -m benchmarks.speed.<script>` from the repository root."""

"""Conversion, tensor parallelism, serving and the demo, measured: `python -m benchmarks.system.<script>`."""

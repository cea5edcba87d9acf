"""Benchmarks and studies of the Differential Transformer against Llama (not installed with the package).

Run every script as a module from the repository root, e.g. ``python -m benchmarks.speed.speed --quick``: that puts
the root on ``sys.path``, so the scripts import the shared harness (``benchmarks.harness``) without any path
patching. Folders: ``speed/`` (timing and memory of the models), ``system/`` (conversion, serving, tensor
parallelism, the demo), ``studies/`` (training studies of the paper's claims), ``gpu/`` (the GPU check). Each
benchmark writes its latest results into ``benchmarks/results/<benchmark>/``; ``benchmarks/README.md`` is the index.
"""

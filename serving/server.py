"""Running the app: uvicorn on a socket bound before the model loads, connections that must send their requests in
time, an exit status for a supervisor; and `start_server`, the server in a subprocess (for scripts and tests)."""

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from .app import build_app
from .config import ServeArguments, ServingError
from .engine import Engine

GRACEFUL_SHUTDOWN_S = 5  # requests still running when the server is stopped (SIGTERM, Ctrl-C) get this long
EXIT_MODEL_STOPPED = 3


def bind(host: str, port: int) -> socket.socket:
    """A socket listening on host:port for the server: a taken port is found before the model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise ServingError(f"--host {host}: {getattr(err, 'strerror', None) or err}")
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ServingError(f"cannot listen on {host}:{port} ({err.strerror}): is another server using it? Choose another --port")
    return sock


def serve(engine: Engine, name: str, arguments: ServeArguments, sock: socket.socket | None = None) -> int:
    """Serve `engine` until SIGTERM or Ctrl-C (status 0; Ctrl-C raises KeyboardInterrupt), or until its batch dies
    (status 3, for a supervisor to restart the server). `name` is what clients call the model."""
    import uvicorn
    from transformers.utils import logging as transformers_logging

    sock = sock or bind(arguments.host, arguments.port)
    # transformers' own messages only at --log-level info or debug: a dying batch would print its traceback beside
    # the one `error:` line (continuous batching logs to a logger of its own)
    level = {"debug": logging.DEBUG, "info": logging.INFO}.get(arguments.log_level, logging.CRITICAL)
    transformers_logging.set_verbosity(level)
    logging.getLogger("ContinuousBatchingLogger").setLevel(level)
    app = build_app(engine, name, arguments.api_key, arguments.max_request_bytes, arguments.request_timeout)
    deadlines = Deadlines(app, arguments.request_timeout)

    async def stop_if_the_model_stopped() -> None:
        if not engine.alive:
            server.should_exit = True

    server = uvicorn.Server(
        uvicorn.Config(
            deadlines,
            http=deadlines.protocol,
            log_level=arguments.log_level,
            proxy_headers=False,  # scope["client"] is the connection's own address (Deadlines finds it by that)
            timeout_keep_alive=5,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            callback_notify=stop_if_the_model_stopped,
            timeout_notify=1,
        )
    )
    try:
        server.run(sockets=[sock])
        stopped = not engine.alive
    finally:
        engine.close()
        sock.close()
    if stopped:
        print(
            f"error: the model stopped serving ({engine.failure or 'its batch stopped'}); exiting for a supervisor to "
            "restart the server",
            file=sys.stderr,
        )
        return EXIT_MODEL_STOPPED
    return 0


class Deadlines:
    """The app (ASGI) and uvicorn's HTTP protocol (`protocol`, for its `http=`), dropping connections that hold the
    server without sending a request: the next request's head must arrive within `timeout` seconds of the connection
    opening or of its last answer (uvicorn itself times out idle connections only after an answer, and never a head
    that trickles in). The app marks, by the client's address, when a request runs; its body has its own deadline
    (`BodyLimits`)."""

    def __init__(self, app, timeout: float):
        self.app, self.timeout = app, timeout
        self.connections = {}  # (host, port) -> TimedConnection

    def protocol(self, **kwargs) -> asyncio.Protocol:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return TimedConnection(self, H11Protocol(**kwargs))

    async def __call__(self, scope, receive, send) -> None:
        connection = self.connections.get(tuple(scope.get("client") or ())) if scope["type"] == "http" else None
        if connection is not None:
            connection.disarm()
        try:
            await self.app(scope, receive, send)
        finally:
            if connection is not None:
                connection.arm()


class TimedConnection(asyncio.Protocol):
    """uvicorn's protocol for one connection, closed when its deadline passes (`arm`); `disarm` while a request runs."""

    def __init__(self, deadlines: Deadlines, inner: asyncio.Protocol):
        self.deadlines, self.inner, self.timer, self.client = deadlines, inner, None, None

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = (str(peer[0]), int(peer[1]))
            self.deadlines.connections[self.client] = self
        self.arm()
        self.inner.connection_made(transport)

    def connection_lost(self, exc) -> None:
        self.disarm()
        if self.deadlines.connections.get(self.client) is self:
            del self.deadlines.connections[self.client]
        self.inner.connection_lost(exc)

    def arm(self) -> None:
        self.disarm()
        if not self.transport.is_closing():
            self.timer = asyncio.get_running_loop().call_later(self.deadlines.timeout, self.transport.close)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


# ---------------------------------------------------------------------------------------------------------------------
# The server in a subprocess


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def start_server(model, *flags: str, port: int | None = None, timeout: float = 300, env: dict | None = None):
    """Runs `diff-transformer serve MODEL FLAGS` in a subprocess on 127.0.0.1; yields (its base URL, its
    subprocess.Popen) once /health answers, and stops it on exit. Raises RuntimeError, with the server's output, if it
    exits or does not answer within `timeout` seconds. `read_output(process)` reads what it printed so far."""
    port = port or free_port()
    output = tempfile.TemporaryFile("w+")  # a pipe nobody reads would stop a server that logs much
    process = subprocess.Popen(
        [sys.executable, "-m", "modeling_diff_cli.main", "serve", str(model), "--port", str(port), *map(str, flags)],
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    process.output = output
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{read_output(process)[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/health", timeout=1) as health:
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
def serve_in_background(model, *flags: str, **kwargs):
    """`start_server`, yielding only the base URL."""
    with start_server(model, *flags, **kwargs) as (base, _process):
        yield base


def read_output(process: subprocess.Popen) -> str:
    """What a server `start_server` started has printed so far."""
    process.output.flush()
    process.output.seek(0)
    return process.output.read()

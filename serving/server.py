"""Running the app: uvicorn on a socket bound before the model loads, with a deadline per connection, and an exit
status for a supervisor."""

import asyncio
import logging
import socket
import sys

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

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
        raise ServingError(f"cannot listen on {host}:{port} ({err.strerror}): is another server using it? Choose "
                           "another --port")
    return sock


def serve(engine: Engine, name: str, arguments: ServeArguments, sock: socket.socket | None = None) -> int:
    """Serve `engine` (its model called `name`) until SIGTERM or Ctrl-C (status 0; Ctrl-C raises KeyboardInterrupt),
    or until its batch dies (status 3, for a supervisor to restart the server)."""
    from transformers.utils import logging as transformers_logging

    sock = sock or bind(arguments.host, arguments.port)
    # transformers' own messages only at --log-level info or debug: a dying batch would print its traceback beside
    # the one `error:` line (continuous batching has a logger of its own)
    level = {"debug": logging.DEBUG, "info": logging.INFO}.get(arguments.log_level, logging.CRITICAL)
    transformers_logging.set_verbosity(level)
    logging.getLogger("ContinuousBatchingLogger").setLevel(level)

    async def stop_if_the_model_stopped() -> None:
        server.should_exit = server.should_exit or not engine.alive

    batching = "continuous batching" if engine.manager is not None else "one request at a time"
    print(f"serving {name} at http://{arguments.host}:{arguments.port}/v1 ({batching}). Ctrl-C stops it.", flush=True)
    server = uvicorn.Server(uvicorn.Config(
        build_app(engine, name, arguments), http=TimedConnection, log_level=arguments.log_level,
        timeout_keep_alive=arguments.request_timeout,  # TimedConnection's deadline
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, callback_notify=stop_if_the_model_stopped, timeout_notify=1,
    ))
    try:
        server.run(sockets=[sock])
        stopped = not engine.alive
    finally:
        engine.close()
        sock.close()
    if stopped:
        print(f"error: the model stopped serving ({engine.failure or 'its batch stopped'}); exiting for a supervisor "
              "to restart the server", file=sys.stderr)
        return EXIT_MODEL_STOPPED
    return 0


class TimedConnection(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that has not sent a request's head within --request-timeout
    seconds (uvicorn's `timeout_keep_alive`) of opening or of its last answer: uvicorn alone times out idle
    connections only after an answer, never a head that trickles in."""

    deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.wait_for_a_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.wait_for_a_request()

    def connection_lost(self, exc) -> None:
        self.deadline.cancel()
        super().connection_lost(exc)

    def wait_for_a_request(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        # the last request's cycle: a new request's head makes another
        self.deadline = self.loop.call_later(self.timeout_keep_alive, self.close_if_no_request_came, self.cycle)

    def close_if_no_request_came(self, cycle) -> None:
        if self.cycle is cycle:
            self.transport.close()

"""Running the app: uvicorn on a socket bound before the model loads, behind a `Guard`, and an exit status for a
supervisor."""

import asyncio
import hmac
import logging
import socket
import sys

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import APIError, build_app
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
        Guard(build_app(engine, name), arguments), http=TimedConnection, log_level=arguments.log_level,
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


class Guard:
    """What a request must get right before the app sees it (an ASGI middleware):

    - every route but /health needs `Authorization: Bearer KEY` (the scheme in any case; HTTP 401 before the body is
      read; the key compared in constant time);
    - a body over --max-request-bytes gets HTTP 413, at once when its Content-Length says so;
    - the body must arrive within --request-timeout seconds (HTTP 408).
    """

    def __init__(self, app, arguments: ServeArguments):
        self.app, self.max_bytes, self.timeout = app, arguments.max_request_bytes, arguments.request_timeout
        self.key = arguments.api_key.encode() if arguments.api_key is not None else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            body = await self.read(scope, receive)
        except APIError as refused:
            return await refused.response()(scope, receive, send)
        replayed = False

        async def replay_then_receive():
            nonlocal replayed
            if replayed:
                return await receive()  # the client leaving
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay_then_receive, send)

    async def read(self, scope, receive) -> bytes:
        """The request's body, or APIError."""
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] != "/health":
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                raise APIError(401, "Missing or wrong API key: send the header `Authorization: Bearer KEY`.",
                               {"WWW-Authenticate": "Bearer"})
        too_large = APIError(413, f"The request body is larger than this server's limit of {self.max_bytes} bytes.")
        if headers.get(b"content-length", b"").isdigit() and int(headers[b"content-length"]) > self.max_bytes:
            raise too_large

        async def whole_body() -> bytes:
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise APIError(400, "The client left before its request's body arrived.")  # read by no one
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    raise too_large
            return bytes(body)

        try:
            return await asyncio.wait_for(whole_body(), self.timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"The request body did not arrive within {self.timeout:g} s.")


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

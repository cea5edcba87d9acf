"""Running the app: uvicorn on a socket bound before the model loads, behind a `Guard`, and an exit status for a
supervisor."""

import asyncio
import hmac
import logging
import socket
import sys

import uvicorn
from starlette.datastructures import Headers
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import build_app, error
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
    guard = Guard(build_app(engine, name), arguments.api_key, arguments.max_request_bytes, arguments.request_timeout)

    async def stop_if_the_model_stopped() -> None:
        server.should_exit = server.should_exit or not engine.alive

    batching = "continuous batching" if engine.manager is not None else "one request at a time"
    print(f"serving {name} at http://{arguments.host}:{arguments.port}/v1 ({batching}). Ctrl-C stops it.", flush=True)
    server = uvicorn.Server(uvicorn.Config(
        guard, http=guard.protocol, log_level=arguments.log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        proxy_headers=False,  # scope["client"] is the connection's own address (Guard finds connections by it)
        callback_notify=stop_if_the_model_stopped, timeout_notify=1,
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
    """What a request must get right before the app sees it (an ASGI middleware), and uvicorn's HTTP protocol with a
    deadline per connection (`protocol`, for uvicorn's `http=`):

    - a connection must send each request's head within `timeout` seconds of opening or of its last answer, or it is
      closed (uvicorn alone times out idle connections only after an answer, never a head that trickles in), and
      then the request's body within as long again (HTTP 408);
    - every route but /health needs `Authorization: Bearer KEY` (the scheme in any case; HTTP 401 before the body is
      read; the key compared in constant time);
    - a body over `max_bytes` gets HTTP 413, at once when its Content-Length says so.
    """

    def __init__(self, app, api_key: str | None, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        self.key = api_key.encode() if api_key is not None else None
        self.connections = {}  # (host, port) -> TimedConnection

    def protocol(self, **kwargs) -> asyncio.Protocol:
        return TimedConnection(self, **kwargs)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        connection = self.connections.get(tuple(scope.get("client") or ()))
        if connection is not None:
            connection.disarm()  # a request runs
        try:
            body, refusal = await self.read(scope, receive)
            if refusal is not None:
                return await refusal(scope, receive, send)
            replayed = False

            async def replay_then_receive():
                nonlocal replayed
                if replayed:
                    return await receive()  # the client leaving
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay_then_receive, send)
        finally:
            if connection is not None:
                connection.arm()

    async def read(self, scope, receive):
        """(the body, None), or (None, the response that refuses the request)."""
        headers = Headers(scope=scope)
        if self.key is not None and scope["path"] != "/health":
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), self.key):
                detail = "Missing or wrong API key: send the header `Authorization: Bearer KEY`."
                return None, error(401, detail, {"WWW-Authenticate": "Bearer"})
        too_large = error(413, f"The request body is larger than this server's limit of {self.max_bytes} bytes.")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return None, too_large
        chunks, more = [], True
        deadline = asyncio.get_running_loop().time() + self.timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                return None, error(408, f"The request body did not arrive within {self.timeout:g} s.")
            if message["type"] == "http.disconnect":
                return None, error(400, "The client left before its request's body arrived.")  # read by no one
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
            if sum(map(len, chunks)) > self.max_bytes:
                return None, too_large
        return b"".join(chunks), None


class TimedConnection(H11Protocol):
    """uvicorn's HTTP/1.1 protocol for one connection, closed when its deadline passes (`arm`); `disarm` while a
    request runs."""

    def __init__(self, guard: Guard, **kwargs):
        super().__init__(**kwargs)
        self.guard, self.timer, self.address = guard, None, None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if isinstance(peer := transport.get_extra_info("peername"), tuple):
            self.address = (str(peer[0]), int(peer[1]))
            self.guard.connections[self.address] = self
        self.arm()

    def connection_lost(self, exc) -> None:
        self.disarm()
        if self.guard.connections.get(self.address) is self:
            del self.guard.connections[self.address]
        super().connection_lost(exc)

    def arm(self) -> None:
        self.disarm()
        if not self.transport.is_closing():
            self.timer = asyncio.get_running_loop().call_later(self.guard.timeout, self.transport.close)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

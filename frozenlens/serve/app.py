"""The feature server's HTTP application (FastAPI): images in, served features out.

    POST /v1/features   {"images": [base64 file, ...], "features": ["gather.8:tokens"], "codec": "int8"}
                        -> application/x-safetensors (see frozenlens.serve.codecs)
    GET  /v1/info       backbone name and weights hash, served features and their shapes,
                        codecs with bytes per image, limits
    GET  /v1/health     liveness (no token needed)
    GET  /openapi.json  the OpenAPI description (token needed like every route)
    GET  /docs          renders it, on an insecure (loopback-only) server only

Every request but health needs ``Authorization: Bearer <token>`` unless the app
is created with ``insecure=True``; such an app answers loopback clients only.
Refusals are JSON ``{"detail": "..."}`` with the status that says why: 400
malformed JSON, bad base64 or an undecodable image (or not an allowed raster
format); 401 missing or wrong token; 403 a non-loopback client of an insecure
server; 413 body, batch or image too large; 415 not JSON; 422 a request that
parses but asks for something unknown or not served (a feature, a codec);
429 the queue is full; 503 shutting down. Requests from
concurrent clients are merged into backbone passes (:mod:`frozenlens.serve.batching`).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Sequence

import numpy as np
from fastapi import Depends, FastAPI, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from frozenlens import __version__
from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.taps import Tap
from frozenlens.errors import FrozenlensError
from frozenlens.serve.batching import Admission, Batcher
from frozenlens.serve.codecs import MEDIA_TYPE, encode_payload, get_codec
from frozenlens.serve.engine import FeatureEngine, Job, RequestError

log = logging.getLogger(__name__)

Runner = Callable[[Job], Awaitable[dict[str, np.ndarray]]]
"""Computes one job's features; the plain server batches with :class:`Batcher`, Ray with ``serve.batch``."""


@dataclass
class Limits:
    """What one server accepts, and how it batches.

    Attributes:
        max_body_bytes: request body size (HTTP 413 beyond it).
        max_batch_images: images in one request (413 beyond it).
        max_image_pixels: width x height of one decoded image (413 beyond it).
        max_queued_images: images admitted and not yet answered, all requests together
            (429 beyond it).
        batch_images: images per backbone pass (requests are merged up to this).
        batch_wait_ms: how long a pass waits for more requests to join it.
    """

    max_body_bytes: int = 32 * 2**20
    max_batch_images: int = 64
    max_image_pixels: int = 4096 * 4096
    max_queued_images: int = 256
    batch_images: int = 32
    batch_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0 and name != "batch_wait_ms":
                raise FrozenlensError(f"limit {name}={value}: must be positive")
        if self.max_queued_images < self.max_batch_images:
            raise FrozenlensError(f"max_queued_images={self.max_queued_images} is below max_batch_images="
                                  f"{self.max_batch_images}: a full request could never be admitted")


class FeatureRequest(BaseModel):
    """Body of ``POST /v1/features``."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(description="image files (JPEG, PNG, ...), each base64-encoded")
    features: list[str] = Field(default=["final:cls"], description=(
        "served features to return, e.g. 'gather.8:tokens' (MIST's g_k for k=8) or 'final:cls'; "
        "GET /v1/info lists them"))
    codec: Literal["float32", "float16", "int8"] = Field(default="float16", description=(
        "wire precision; int8 sends int8 values with a float32 scale per token"))


_ERRORS = {
    400: "malformed JSON, bad base64, or an image that cannot be decoded",
    401: "missing or wrong bearer token",
    403: "a non-loopback client of a server started without a token (--insecure)",
    413: "body, batch or image larger than the server's limits",
    415: "the body is not application/json",
    422: "unknown or unserved feature, unknown codec, or a body of the wrong shape",
    429: "queue full: retry after a short wait",
    503: "shutting down",
}


def create_app(
    backbone: FrozenBackbone | FeatureEngine,
    *,
    token: str | None = None,
    insecure: bool = False,
    limits: Limits | None = None,
    taps: Sequence[str | Tap] | None = None,
    runner: Runner | None = None,
) -> FastAPI:
    """The feature server as an ASGI app (run it with uvicorn, or in Ray Serve).

    Args:
        backbone: the frozen backbone (or a prepared :class:`FeatureEngine`).
        token: bearer token every request but health must carry.
        insecure: serve without a token (local use only); required when ``token`` is None.
        limits: request and queue limits, batching (default :class:`Limits`).
        taps: the taps served (ignored for an engine); default
            :func:`~frozenlens.serve.engine.default_taps`, e.g. ``final:cls`` and MIST's gathers.
        runner: how a job is computed; default: this app's own :class:`Batcher`.
    """
    if not token and not insecure:
        raise FrozenlensError("the feature server needs a bearer token (token=...); pass insecure=True "
                              "only to serve without one on a trusted machine")
    engine = backbone if isinstance(backbone, FeatureEngine) else FeatureEngine(backbone, taps)
    limits = limits or Limits()
    state = _ServerState(engine, limits, runner)
    # The OpenAPI description needs the token like every other route; the browsable /docs page
    # (which fetches it without one) exists only on an insecure, loopback-only server.
    app = FastAPI(title="frozenlens feature server", version=__version__, lifespan=state.lifespan,
                  description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                  openapi_url="/openapi.json" if insecure else None,
                  docs_url="/docs" if insecure else None, redoc_url=None)
    app.state.server = state
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    if insecure:
        app.add_middleware(LoopbackOnly)
    app.add_exception_handler(RequestError, _request_error_response)
    check = _bearer_check(token, insecure)
    _add_routes(app, state, check)
    if not insecure:
        @app.get("/openapi.json", dependencies=[Depends(check)], include_in_schema=False)
        async def openapi() -> dict[str, Any]:
            return app.openapi()
    return app


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_insecure_host(host: str, how: str = "--insecure") -> None:
    """Refuse to serve without a token on a non-loopback address (``frozenlens serve`` and Ray's builder)."""
    if not is_loopback(host):
        raise FrozenlensError(f"{how} serves without a token, so only on a loopback host (127.0.0.1, ::1, "
                              f"localhost), not {host!r}; serve with a token instead (--token or "
                              "$FROZENLENS_TOKEN)")


class LoopbackOnly:
    """ASGI middleware of a server without a token: answer loopback clients only (HTTP 403).

    The host check at start covers ``frozenlens serve``; this covers every other way the
    app can end up listening more widely (a Ray Serve proxy, a hand-written uvicorn call).
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        client = scope.get("client")
        if scope["type"] in ("http", "websocket") and not (client and is_loopback(str(client[0]))):
            who = client[0] if client else "an unknown address"
            log.warning("refused a request from %s: this server has no token and answers loopback only", who)
            response = JSONResponse({"detail": "this server runs without a token and answers loopback "
                                               "clients only"}, status_code=403)
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _ServerState:
    """The engine, admission, batcher and shutdown flag of one app."""

    def __init__(self, engine: FeatureEngine, limits: Limits, runner: Runner | None):
        self.engine, self.limits = engine, limits
        self.admission = Admission(limits.max_queued_images)
        self.batcher: Batcher | None = None
        self.runner = runner
        self.closing = False
        self.images_served = 0

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        if self.runner is None:
            self.batcher = Batcher(self.engine.run, max_batch_images=self.limits.batch_images,
                                   max_wait_s=self.limits.batch_wait_ms / 1000)
            await self.batcher.start()
            self.runner = self._batched
        try:
            yield
        finally:  # uvicorn has finished open requests; answer whatever is still queued
            self.closing = True
            if self.batcher is not None:
                await self.batcher.stop()

    async def _batched(self, job: Job) -> dict[str, np.ndarray]:
        assert self.batcher is not None
        return await self.batcher.submit(job)

    def info(self) -> dict[str, Any]:
        info = self.engine.info()
        info["limits"] = asdict(self.limits)
        return info


def _bearer_check(token: str | None, insecure: bool) -> Callable[..., Awaitable[None]]:
    scheme = HTTPBearer(auto_error=False, description="the token the server was started with")
    expected = (token or "").encode()

    async def check(credentials: HTTPAuthorizationCredentials | None = Security(scheme)) -> None:
        if insecure:
            return
        given = credentials.credentials.encode() if credentials else b""
        if not given or not hmac.compare_digest(given, expected):
            raise RequestError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")

    return check


def _add_routes(app: FastAPI, state: _ServerState, check: Callable[..., Awaitable[None]]) -> None:
    @app.get("/v1/health", summary="liveness; no token needed")
    async def health() -> dict[str, Any]:
        return {"status": "closing" if state.closing else "ok", "backbone": state.engine.backbone.name,
                "queued_images": state.admission.pending}

    @app.get("/v1/info", dependencies=[Depends(check)], summary="backbone, features, codecs, limits",
             responses={401: {"description": _ERRORS[401]}})
    async def info() -> dict[str, Any]:
        return state.info()

    @app.post("/v1/features", dependencies=[Depends(check)], summary="features of a batch of images",
              response_class=Response,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": FeatureRequest.model_json_schema()}}}},
              responses={200: {"description": "safetensors file: one tensor per feature (int8 adds "
                                              "'<feature>/scale'), JSON header under 'frozenlens'",
                               "content": {MEDIA_TYPE: {}}},
                         **{code: {"description": text} for code, text in _ERRORS.items()}})
    async def features(request: Request) -> Response:
        return await _features(request, state)


async def _features(request: Request, state: _ServerState) -> Response:
    if state.closing:
        raise RequestError(503, "the server is shutting down; retry later")
    try:
        raw = await request.body()
    except ClientDisconnect:  # the client left (or was cut off by a read deadline): nobody to answer
        raise RequestError(400, "the client disconnected before sending the whole body") from None
    body = _parse_body(raw, request.headers.get("content-type", ""))
    codec = get_codec(body.codec)
    taps = state.engine.resolve(body.features)
    count = len(body.images)
    if count == 0:
        raise RequestError(422, "images is empty: send at least one base64-encoded image file")
    if count > state.limits.max_batch_images:
        raise RequestError(413, f"{count} images in one request; this server accepts at most "
                                f"{state.limits.max_batch_images} (split the batch)")
    state.admission.enter(count)
    try:
        images = await run_in_threadpool(state.engine.preprocess, body.images, state.limits.max_image_pixels)
        assert state.runner is not None
        values = await state.runner(Job(images, taps))
        payload = await run_in_threadpool(encode_payload, values, codec, state.engine.backbone.describe())
    finally:
        state.admission.leave(count)
    state.images_served += count
    return Response(payload, media_type=MEDIA_TYPE, headers={
        "X-Frozenlens-Weights-Hash": state.engine.backbone.weights_hash, "X-Frozenlens-Codec": codec.name})


def _parse_body(raw: bytes, content_type: str) -> FeatureRequest:
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise RequestError(415, f"content type {content_type or 'none'!r}: send the request as "
                                "application/json (see GET /openapi.json)")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:  # also the 4300-digit cap on integers
        raise RequestError(400, f"the body is not valid JSON ({_clip(str(err))})") from None
    except RecursionError:
        raise RequestError(400, "the body is not valid JSON for this server: nested too deeply "
                                "(the request is a flat object of lists of strings)") from None
    try:
        return FeatureRequest.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                             for e in err.errors(include_input=False, include_url=False)[:5])
        raise RequestError(422, f"malformed request: {_clip(problems)}") from None
    except RecursionError:
        raise RequestError(400, "the request is nested too deeply") from None


def _clip(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


async def _request_error_response(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestError)
    headers = {"Retry-After": "1"} if err.status in (429, 503) else {}
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    # a detail may quote the request (a feature name); lone surrogates cannot be encoded as UTF-8
    detail = str(err).encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"detail": detail}, status_code=err.status, headers=headers)


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` (HTTP 413) before reading them whole.

    A declared ``Content-Length`` over the limit is refused at once; a body that
    streams past it (chunked, or lying about its length) is cut off when it does.
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": self._message(declared.decode(errors="replace"))},
                                    status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestError(413, self._message(f"more than {self.max_bytes}"))
            return message

        await self.app(scope, limited_receive, send)

    def _message(self, size: str) -> str:
        return (f"request body of {size} bytes; this server accepts at most {self.max_bytes} bytes "
                "(send fewer or smaller images per request)")


# -- running the app: uvicorn with connection limits ----------------------------------------------


@dataclass
class ConnectionLimits:
    """What one client may hold open before sending a whole request (``frozenlens serve`` flags).

    uvicorn has no header or body read timeout and no cap on open connections of
    its own (``limit_concurrency`` answers 503 to *complete* requests, so it does
    nothing against connections that never finish their headers), so the server
    runs uvicorn's h11 protocol with a guard (:func:`guarded_protocol`):

    Attributes:
        header_timeout_s: a connection must deliver a request's complete headers within
            this many seconds of connecting (or of its previous response); else it is closed.
        body_timeout_s: once the headers are in, the whole body must arrive within this
            many seconds; else the connection is closed.
        max_connections: open connections, all clients together. At the cap a new
            connection closes the oldest one the server is still *waiting on* (idle,
            or sending headers or a body); when every connection is being answered,
            the new one is closed instead. Every closing is logged.
        keep_alive_s: uvicorn's ``timeout_keep_alive``: an idle connection between requests
            is closed after this many seconds.
        max_header_bytes: uvicorn's ``h11_max_incomplete_event_size``: request line plus
            headers beyond this get a 400 and the connection is closed.
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 512
    keep_alive_s: int = 5
    max_header_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise FrozenlensError(f"connection limit {name}={value}: must be positive")


class _RateLimitedLog:
    """Logs each kind of refusal at most once per ``every_s`` seconds, with the count held back.

    An attack of a thousand connections gives a few lines a second, not a thousand.
    """

    def __init__(self, every_s: float = 1.0):
        self.every_s = every_s
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def warning(self, message: str, *args: Any) -> None:
        now, last = time.monotonic(), self.last.get(message, float("-inf"))
        if now - last < self.every_s:
            self.held[message] = self.held.get(message, 0) + 1
            return
        held = self.held.pop(message, 0)
        extra = f" (and {held} more like it in the last {now - last:.1f} s)" if held else ""
        self.last[message] = now
        log.warning(message + extra, *args)


def guarded_protocol(limits: ConnectionLimits) -> type:
    """uvicorn's h11 protocol with header/body read deadlines and a connection cap.

    Each server gets its own subclass (the registry of connections it is waiting
    on is a class attribute), passed to uvicorn as ``http=``.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    refusals = _RateLimitedLog()

    class GuardedH11Protocol(H11Protocol):
        waiting: dict[GuardedH11Protocol, float] = {}  # connections waiting on their client, oldest first
        stats = {"evicted": 0, "refused": 0, "header_timeouts": 0, "body_timeouts": 0}

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline: Any = None
            self._expect_body = False
            self._await_client()
            if len(self.connections) > limits.max_connections:
                self._make_room()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self.waiting.pop(self, None)
            super().connection_lost(exc)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            cycle = self.cycle
            if cycle is not None and cycle is not before and not cycle.response_complete:
                # new request headers are in: the header deadline is met
                self._disarm()
                self._expect_body = cycle.more_body
                if cycle.more_body:
                    self._arm(limits.body_timeout_s, self._body_timeout)
                else:
                    self.waiting.pop(self, None)
            elif self._expect_body and cycle is not None and not cycle.more_body:
                self._expect_body = False
                self._disarm()
                self.waiting.pop(self, None)

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._expect_body = False
                self._await_client()  # the next request's headers are due within the header timeout
            super().on_response_complete()  # may start a pipelined request: handle_events disarms again

        # -- helpers ----------------------------------------------------------------------
        def _await_client(self) -> None:
            self.waiting.pop(self, None)
            self.waiting[self] = time.monotonic()
            self._disarm()
            self._arm(limits.header_timeout_s, self._header_timeout)

        def _arm(self, delay: float, callback: Callable[[], None]) -> None:
            self._deadline = self.loop.call_later(delay, callback)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _peer(self) -> str:
            return "%s:%d" % self.client if self.client else "unknown client"

        def _header_timeout(self) -> None:
            self.stats["header_timeouts"] += 1
            refusals.warning("closed connection from %s: no complete request headers within %.1f s",
                             self._peer(), limits.header_timeout_s)
            self._close()

        def _body_timeout(self) -> None:
            self.stats["body_timeouts"] += 1
            refusals.warning("closed connection from %s: request body not complete within %.1f s",
                             self._peer(), limits.body_timeout_s)
            self._close()

        def _make_room(self) -> None:
            oldest = next((c for c in self.waiting if c is not self and not c.transport.is_closing()), None)
            if oldest is not None:
                self.stats["evicted"] += 1
                refusals.warning("%d connections open (limit %d): closed the oldest one still waiting on "
                                 "its client (%s)", len(self.connections), limits.max_connections,
                                 oldest._peer())
                oldest._close()
            else:
                self.stats["refused"] += 1
                refusals.warning("%d connections open (limit %d), all being answered: refused %s",
                                 len(self.connections), limits.max_connections, self._peer())
                self._close()

        def _close(self) -> None:
            self._disarm()
            self.waiting.pop(self, None)
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def usable_connection_cap(limits: ConnectionLimits, reserve: int = 64) -> ConnectionLimits:
    """``limits`` with ``max_connections`` lowered (and a warning) to fit the open-file limit.

    Each connection is a file descriptor; past ``RLIMIT_NOFILE`` the server could
    not accept anyone, which is the failure the cap exists to prevent.
    """
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return limits
    if soft == resource.RLIM_INFINITY or limits.max_connections + reserve <= soft:
        return limits
    cap = max(1, soft - reserve)
    log.warning("max_connections=%d does not fit the open-file limit %d (ulimit -n); using %d",
                limits.max_connections, soft, cap)
    return replace(limits, max_connections=cap)


def uvicorn_config(app: Any, *, host: str, port: int, connections: ConnectionLimits | None = None,
                   log_level: str = "info", graceful_shutdown_s: int = 30) -> Any:
    """The ``uvicorn.Config`` the feature server runs with (see :class:`ConnectionLimits`)."""
    import uvicorn

    connections = usable_connection_cap(connections or ConnectionLimits())
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_shutdown_s,
        http=guarded_protocol(connections),
        timeout_keep_alive=connections.keep_alive_s,
        h11_max_incomplete_event_size=connections.max_header_bytes,
        # a backstop only: the guard keeps connections at or below the cap, so this answers 503
        # only when requests whose clients already left still hold the backbone
        limit_concurrency=connections.max_connections + 32,
    )


def serve(app: Any, *, host: str, port: int, connections: ConnectionLimits | None = None,
          log_level: str = "info") -> None:
    """Run the app with uvicorn until Ctrl-C / SIGTERM, with the connection guard."""
    import uvicorn

    uvicorn.Server(uvicorn_config(app, host=host, port=port, connections=connections,
                                  log_level=log_level)).run()

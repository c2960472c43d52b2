"""The feature server's HTTP application (FastAPI): images in, gathered features out.

    POST /v1/features   {"images": [base64 file, ...], "features": ["gather.8:tokens"], "codec": "int8"}
                        -> application/x-safetensors (see frozenlens.serve.codecs)
    GET  /v1/info       backbone name and weights hash, served features and their shapes,
                        gather depths k, codecs with bytes per image, limits
    GET  /v1/health     liveness (no token needed)
    GET  /openapi.json  the OpenAPI description; /docs renders it

Every request but health needs ``Authorization: Bearer <token>`` unless the app
is created with ``insecure=True``. Refusals are JSON ``{"detail": "..."}`` with
the status that says why: 400 malformed JSON, bad base64 or an undecodable image;
401 missing or wrong token; 413 body, batch or image too large; 415 not JSON;
422 a request that parses but asks for something unknown (a feature, a gather
depth k, a codec); 429 the queue is full; 503 shutting down. Requests from
concurrent clients are merged into backbone passes (:mod:`frozenlens.serve.batching`).
"""

from __future__ import annotations

import contextlib
import hmac
import json
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Sequence

import numpy as np
from fastapi import Depends, FastAPI, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from frozenlens import __version__
from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.taps import Tap
from frozenlens.errors import FrozenlensError
from frozenlens.serve.batching import Admission, Batcher
from frozenlens.serve.codecs import MEDIA_TYPE, encode_payload, get_codec
from frozenlens.serve.engine import DEFAULT_TAPS, FeatureEngine, Job, RequestError

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
    413: "body, batch or image larger than the server's limits",
    415: "the body is not application/json",
    422: "unknown feature, gather depth k or codec, or a body of the wrong shape",
    429: "queue full: retry after a short wait",
    503: "shutting down",
}


def create_app(
    backbone: FrozenBackbone | FeatureEngine,
    *,
    token: str | None = None,
    insecure: bool = False,
    limits: Limits | None = None,
    taps: Sequence[str | Tap] = DEFAULT_TAPS,
    gather_depths: Sequence[int] | None = None,
    runner: Runner | None = None,
) -> FastAPI:
    """The feature server as an ASGI app (run it with uvicorn, or in Ray Serve).

    Args:
        backbone: the frozen backbone (or a prepared :class:`FeatureEngine`).
        token: bearer token every request but health must carry.
        insecure: serve without a token (local use only); required when ``token`` is None.
        limits: request and queue limits, batching (default :class:`Limits`).
        taps: declared taps served besides MIST's gathers (ignored for an engine).
        gather_depths: k of the ``gather.<k>:tokens`` served (default: MIST's candidates).
        runner: how a job is computed; default: this app's own :class:`Batcher`.
    """
    if not token and not insecure:
        raise FrozenlensError("the feature server needs a bearer token (token=...); pass insecure=True "
                              "only to serve without one on a trusted machine")
    engine = backbone if isinstance(backbone, FeatureEngine) else FeatureEngine(backbone, taps, gather_depths)
    limits = limits or Limits()
    state = _ServerState(engine, limits, runner)
    app = FastAPI(title="frozenlens feature server", version=__version__, lifespan=state.lifespan,
                  description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    app.state.server = state
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.add_exception_handler(RequestError, _request_error_response)
    _add_routes(app, state, _bearer_check(token, insecure))
    return app


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
    body = _parse_body(await request.body(), request.headers.get("content-type", ""))
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
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON ({err})") from None
    try:
        return FeatureRequest.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())
        raise RequestError(422, f"malformed request: {problems}") from None


async def _request_error_response(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestError)
    headers = {"Retry-After": "1"} if err.status in (429, 503) else {}
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"detail": str(err)}, status_code=err.status, headers=headers)


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

"""The edge side: ask a feature server for features, check them, keep them in the local store.

    >>> from frozenlens.serve import FeatureClient, RemoteTaps
    >>> client = FeatureClient("http://127.0.0.1:8765", token="s3cret")
    >>> list(client.info()["features"])     # ['final:cls', 'final:patch_mean', 'gather.4:tokens', ...]
    >>> payload = client.features(["cat.jpg"], ["gather.8:tokens"], codec="int8")
    >>> payload.features["gather.8:tokens"].shape               # (1, 257, 384), float32

:class:`RemoteTaps` is a :class:`frozenlens.store.TapSource`: give it to
:func:`frozenlens.store.extract` (or to :func:`frozenlens.fit` as the backbone)
and the features are fetched once into the activation store, shard by shard,
so an interrupted fetch resumes where it stopped.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import httpx
import numpy as np

from frozenlens.backbones.taps import Tap
from frozenlens.errors import FrozenlensError
from frozenlens.serve.codecs import FeaturePayload, decode_payload, get_codec, verify_payload

_RETRY_STATUS = (429, 503)


class RemoteError(FrozenlensError):
    """The feature server refused a request, or could not be reached."""


class FeatureClient:
    """HTTP client of the feature server that checks every payload it receives.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8765``.
        token: its bearer token (None for a server started with ``--insecure``).
        timeout: seconds per request.
        retries: attempts for a busy (429), closing (503) or unreachable server.
        backoff: first wait between attempts in seconds; doubles each time.
        expect_weights_hash: refuse a server whose backbone has other weights.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 300.0, retries: int = 6,
                 backoff: float = 0.5, expect_weights_hash: str | None = None):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.retries, self.backoff = retries, backoff
        self.expect_weights_hash = expect_weights_hash
        self._info: dict[str, Any] | None = None
        self.bytes_received = 0
        self.images_fetched = 0

    def __enter__(self) -> "FeatureClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``."""
        return self._request("GET", "/v1/health").json()

    def info(self) -> dict[str, Any]:
        """``GET /v1/info`` (fetched once), checked against ``expect_weights_hash``."""
        if self._info is None:
            info = self._request("GET", "/v1/info").json()
            found = info["backbone"]["weights_hash"]
            if self.expect_weights_hash and found != self.expect_weights_hash:
                raise RemoteError(f"{self.url} serves backbone {info['backbone']['name']!r} with weights "
                                  f"{found[:12]}, not the expected {self.expect_weights_hash[:12]}")
            self._info = info
        return self._info

    def features(self, images: Sequence[str | Path | bytes], names: Sequence[str],
                 codec: str = "float16") -> FeaturePayload:
        """Features ``names`` of ``images`` (files or encoded bytes), decoded to float32 and verified.

        The payload must come from the server's backbone (weights hash), in the
        asked codec and wire dtype, with one row per image of each feature's
        advertised shape; anything else raises :class:`~frozenlens.serve.codecs.PayloadError`.
        """
        get_codec(codec)
        info = self.info()
        shapes = {}
        for name in names:
            key = Tap.parse(name).key
            if key not in info["features"]:
                raise RemoteError(f"{self.url} does not serve {key!r}; it serves "
                                  f"{', '.join(info['features'])} (start it with --tap {key})")
            shapes[key] = tuple(info["features"][key])
        body = {"images": [_b64(image) for image in images], "features": list(shapes), "codec": codec}
        response = self._request("POST", "/v1/features", json=body)
        payload = decode_payload(response.content)
        verify_payload(payload, codec=codec, weights_hash=info["backbone"]["weights_hash"],
                       count=len(images), shapes=shapes)
        self.bytes_received += payload.num_bytes
        self.images_fetched += len(images)
        return payload

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        wait = self.backoff
        for attempt in range(self.retries):
            last = attempt == self.retries - 1
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as err:
                if last:
                    raise RemoteError(f"cannot reach the feature server at {self.url} ({type(err).__name__}: "
                                      f"{err}); finished work is kept: run the same command again to "
                                      "resume") from err
            else:
                if response.status_code not in _RETRY_STATUS or last:
                    return _checked(response, self.url)
                wait = max(wait, float(response.headers.get("retry-after", 0) or 0))
            time.sleep(wait)
            wait *= 2
        raise AssertionError("unreachable")


def _checked(response: httpx.Response, url: str) -> httpx.Response:
    if response.is_success:
        return response
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text[:300]
    hint = " (pass the server's token with --token or $FROZENLENS_TOKEN)" if response.status_code == 401 else ""
    raise RemoteError(f"{url} answered {response.status_code}: {detail}{hint}")


def _b64(image: str | Path | bytes) -> str:
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return base64.b64encode(data).decode("ascii")


class RemoteTaps:
    """A :class:`frozenlens.store.TapSource` whose taps a feature server computes.

    Its :meth:`describe` is the server's backbone, so stores and adapters made
    from it record the real backbone and weights hash; its ``origin``
    (``remote:<codec>``) keeps them apart from locally extracted stores.

    Args:
        client: a :class:`FeatureClient`.
        codec: wire codec of every request.
    """

    def __init__(self, client: FeatureClient, codec: str = "float16"):
        self.client = client
        self.codec = get_codec(codec).name
        self.origin = f"remote:{self.codec}"

    @classmethod
    def connect(cls, url: str, token: str | None = None, codec: str = "float16",
                **client_options: Any) -> "RemoteTaps":
        """A source for the server at ``url`` (checks that it answers, and its token)."""
        source = cls(FeatureClient(url, token, **client_options), codec)
        source.client.info()
        return source

    # -- identity of the backbone behind the server ----------------------------------------
    def describe(self) -> dict[str, Any]:
        """The server's backbone description (as :meth:`FrozenBackbone.describe`)."""
        return dict(self.client.info()["backbone"])

    @property
    def name(self) -> str:
        """The backbone's name on the server."""
        return str(self.describe()["name"])

    @property
    def weights_hash(self) -> str:
        """SHA-256 of the server backbone's weights."""
        return str(self.describe()["weights_hash"])

    @property
    def image_size(self) -> int:
        """Input size the server's backbone runs at."""
        return int(self.client.info()["image_size"])

    @property
    def depth(self) -> int:
        """Blocks of the server's backbone."""
        return int(self.describe()["depth"])

    def tap_shape(self, tap: Tap) -> tuple[int, ...]:
        """Per-image shape of ``tap`` as the server advertises it."""
        features = self.client.info()["features"]
        if tap.key not in features:
            raise RemoteError(f"{self.client.url} does not serve {tap.key!r}; it serves {', '.join(features)} "
                              f"(start it with --tap {tap.key})")
        return tuple(features[tap.key])

    def compute_taps(self, image_paths: Sequence[str], taps: Sequence[Tap]) -> Mapping[str, np.ndarray]:
        """Fetch ``taps`` for ``image_paths`` (one request), verified and decoded to float32."""
        payload = self.client.features(list(image_paths), [t.key for t in taps], codec=self.codec)
        return payload.features

    def close(self) -> None:
        """Close the client."""
        self.client.close()

"""A bounded load and fault test of a running feature server (loopback only).

A fixed number of requests from a few concurrent clients, a share of them bad
on purpose: no token, a wrong token, malformed JSON, a wrong content type, bad
base64, an undecodable image, an unknown gather depth, an oversized body, too
many images, an image with too many pixels. Each kind has the one status it
must get; every good request must be answered 200 with, for each image, the
features a lone float32 request for that image returned before the load (so
batching never mixes rows between requests). The test stops by itself when the
requests are spent.

    python benchmarks/loadtest.py http://127.0.0.1:8765 --token T --requests 400 --clients 16
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

from frozenlens.errors import FrozenlensError
from frozenlens.methods.mist import gather_depths_in, gather_key
from frozenlens.serve.codecs import CODECS, decode_payload

TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "int8": 1 / 127}
"""Largest error of a decoded value relative to its token's largest magnitude, per codec."""


@dataclass
class LoadReport:
    """What the load test saw."""

    requests: int = 0
    good: int = 0
    good_correct: int = 0
    bad: Counter = field(default_factory=Counter)
    bad_rejected_right: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images_answered: int = 0

    @property
    def server_errors(self) -> int:
        """Responses with a 5xx status."""
        return sum(count for status, count in self.statuses.items() if status >= 500)

    @property
    def passed(self) -> bool:
        """No 5xx, every bad request refused with its status, every good one answered correctly."""
        return (self.server_errors == 0 and self.good_correct == self.good
                and self.bad == self.bad_rejected_right and not self.failures)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {"requests": self.requests, "good": self.good, "good_correct": self.good_correct,
                "bad": dict(self.bad), "bad_rejected_right": dict(self.bad_rejected_right),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "server_errors": self.server_errors, "passed": self.passed,
                "seconds": round(self.seconds, 2), "images_answered": self.images_answered,
                "failures": self.failures[:20]}


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if not (host in ("localhost", "::1") or host.startswith("127.")):
        raise FrozenlensError(f"the load test only targets a server on this machine (127.0.0.0/8, ::1, "
                              f"localhost), not {host!r}")


def _image(seed: int, size: tuple[int, int] = (48, 40), flat: bool = False) -> bytes:
    rng = np.random.RandomState(seed)
    if flat:
        picture = Image.new("RGB", size, tuple(int(v) for v in rng.randint(0, 255, 3)))
    else:
        picture = Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class LoadTest:
    """The test against one server; :meth:`run` returns a :class:`LoadReport`.

    Args:
        url: the server (loopback only).
        token: its bearer token.
        requests: how many requests in all.
        clients: concurrent clients.
        bad_fraction: share of bad requests.
        pool: distinct images good requests draw from.
        seed: makes the request mix repeatable.
    """

    def __init__(self, url: str, token: str, *, requests: int = 200, clients: int = 8,
                 bad_fraction: float = 0.3, pool: int = 12, seed: int = 0, timeout: float = 120.0):
        _check_loopback(url)
        self.url, self.token, self.requests, self.clients = url.rstrip("/"), token, requests, clients
        self.bad_fraction, self.seed, self.timeout = bad_fraction, seed, timeout
        self.pool = [_image(seed * 1000 + i) for i in range(pool)]
        self.auth = {"Authorization": f"Bearer {token}"}
        self.info: dict[str, Any] = {}
        self.reference: dict[str, np.ndarray] = {}

    def prepare(self) -> None:
        """Read the server's info and each pool image's features alone, in float32 (the reference)."""
        with httpx.Client(base_url=self.url, headers=self.auth, timeout=self.timeout) as http:
            self.info = _ok(http.get("/v1/info")).json()
            gathers = gather_depths_in(self.info["features"])
            self.feature = gather_key(gathers[0]) if gathers else next(iter(self.info["features"]))
            rows = []
            for image in self.pool:
                response = _ok(http.post("/v1/features", json={"images": [_b64(image)],
                                                               "features": [self.feature], "codec": "float32"}))
                rows.append(decode_payload(response.content).features[self.feature][0])
        self.reference = np.stack(rows)

    def bad_kinds(self) -> dict[str, tuple[int, Callable[[httpx.Client], httpx.Response]]]:
        """Each kind of bad request and the status it must get."""
        limits, good = self.info["limits"], _b64(self.pool[0])
        unknown_k = next(k for k in range(1, 10_000) if gather_key(k) not in self.info["features"])
        side = int(limits["max_image_pixels"] ** 0.5) + 2
        return {
            "no token": (401, lambda h: h.post("/v1/features", json={"images": [good]},
                                               headers={"Authorization": ""})),
            "wrong token": (401, lambda h: h.post("/v1/features", json={"images": [good]},
                                                  headers={"Authorization": "Bearer wrong"})),
            "malformed json": (400, lambda h: h.post("/v1/features", content=b'{"images": [',
                                                     headers={"content-type": "application/json"})),
            "wrong content type": (415, lambda h: h.post("/v1/features", content=b"images=1",
                                                         headers={"content-type": "text/plain"})),
            "bad base64": (400, lambda h: h.post("/v1/features", json={"images": ["%%%"]})),
            "undecodable image": (400, lambda h: h.post("/v1/features", json={"images": [_b64(b"GIF89a..")]})),
            "unknown k": (422, lambda h: h.post("/v1/features", json={"images": [good],
                                                                      "features": [f"gather.{unknown_k}:tokens"]})),
            "oversized body": (413, lambda h: h.post("/v1/features", content=b"x" * (limits["max_body_bytes"] + 1),
                                                     headers={"content-type": "application/json"})),
            "too many images": (413, lambda h: h.post("/v1/features",
                                                      json={"images": [good] * (limits["max_batch_images"] + 1)})),
            "too many pixels": (413, lambda h: h.post("/v1/features",
                                                      json={"images": [_b64(_image(1, (side, side), True))]})),
        }

    def run(self) -> LoadReport:
        """Send the requests from ``clients`` threads; stops when they are spent."""
        if not self.info:
            self.prepare()
        rng = random.Random(self.seed)
        kinds = self.bad_kinds()
        plan: list[tuple[str, Any]] = []
        for _ in range(self.requests):
            if rng.random() < self.bad_fraction:
                plan.append(("bad", rng.choice(sorted(kinds))))
            else:
                count = rng.randint(1, min(8, self.info["limits"]["max_batch_images"]))
                plan.append(("good", ([rng.randrange(len(self.pool)) for _ in range(count)],
                                      rng.choice(sorted(CODECS)))))
        report, lock = LoadReport(requests=len(plan)), threading.Lock()
        shares = [plan[i::self.clients] for i in range(self.clients)]
        started = time.perf_counter()
        with ThreadPoolExecutor(self.clients) as pool:
            list(pool.map(lambda share: self._client(share, kinds, report, lock), shares))
        report.seconds = time.perf_counter() - started
        return report

    def _client(self, share: list[tuple[str, Any]], kinds: dict, report: LoadReport, lock: threading.Lock) -> None:
        with httpx.Client(base_url=self.url, headers=self.auth, timeout=self.timeout) as http:
            for kind, detail in share:
                if kind == "bad":
                    status, send = kinds[detail]
                    response = send(http)
                    with lock:
                        report.statuses[response.status_code] += 1
                        report.bad[detail] += 1
                        if response.status_code == status and "detail" in response.json():
                            report.bad_rejected_right[detail] += 1
                        else:
                            report.failures.append(f"{detail}: got {response.status_code}, expected {status}")
                else:
                    self._good(http, *detail, report, lock)

    def _good(self, http: httpx.Client, rows: list[int], codec: str, report: LoadReport,
              lock: threading.Lock) -> None:
        body = {"images": [_b64(self.pool[i]) for i in rows], "features": [self.feature], "codec": codec}
        response = http.post("/v1/features", json=body)
        problem = None
        if response.status_code != 200:
            problem = f"good request answered {response.status_code}: {response.text[:200]}"
        else:
            got = decode_payload(response.content).features[self.feature]
            expected = self.reference[rows]
            peak = np.abs(expected).max(axis=-1, keepdims=True)
            worst = float((np.abs(got - expected) / np.maximum(peak, 1e-12)).max())
            if got.shape != expected.shape or worst > TOLERANCE[codec]:
                problem = f"good request ({codec}) answered wrong features (relative error {worst:.2e})"
        with lock:
            report.statuses[response.status_code] += 1
            report.good += 1
            if problem:
                report.failures.append(problem)
            else:
                report.good_correct += 1
                report.images_answered += len(rows)


def _ok(response: httpx.Response) -> httpx.Response:
    if response.status_code != 200:
        raise FrozenlensError(f"{response.request.url} answered {response.status_code}: {response.text[:300]}")
    return response


def main(argv: list[str] | None = None) -> int:
    """Command line: run the test against a server and print the report as JSON."""
    parser = argparse.ArgumentParser(prog="python benchmarks/loadtest.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--token", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--bad-fraction", type=float, default=0.3)
    args = parser.parse_args(argv)
    report = LoadTest(args.url, args.token, requests=args.requests, clients=args.clients,
                      bad_fraction=args.bad_fraction).run()
    print(json.dumps(report.to_dict(), indent=1))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

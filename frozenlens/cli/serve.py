"""``frozenlens serve`` and the ``--remote`` options of ``fit``/``predict`` (separated tuning).

Nothing here imports FastAPI, uvicorn, Ray or httpx until a command runs them.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import threading
from typing import Any

DEFAULT_PORT = 8765
TOKEN_ENV = "FROZENLENS_TOKEN"

SERVE_DESCRIPTION = """\
Run the frozen backbone as a feature server (MIST's separated tuning): clients
send images and get back only the features they ask for, among the taps it
serves (--tap; by default final:cls, final:patch_mean and the taps methods
offer remote clients: MIST's gathers g_k, gather.<k>:tokens for k in N/3,
2N/3, N, one token map per image) in float32, float16 or int8 (per-token
scale). An edge device then trains and predicts with `frozenlens fit/predict
--remote URL` and never loads the backbone.

Every request needs `Authorization: Bearer TOKEN` (TOKEN from --token,
$FROZENLENS_TOKEN, or generated and printed at start) unless you pass
--insecure, which is allowed on a loopback --host only. Ctrl-C or SIGTERM
stops accepting, answers what is in flight, then exits.
"""

SERVE_EPILOG = """\
examples:
  frozenlens serve                                   # default backbone, 127.0.0.1:8765, prints a token
  FROZENLENS_TOKEN=s3cret frozenlens serve --host 0.0.0.0 --port 9000
  frozenlens serve --insecure --tap final:cls --tap block.11:pool2 --tap gather.6:tokens
  frozenlens serve --ray --replicas 2                # the same app on Ray Serve, dynamic batching

  # then, on the edge:
  frozenlens fit DATA --method mist --remote http://SERVER:8765 --token s3cret --codec int8
  frozenlens predict runs/DATA/mist photo.jpg --remote http://SERVER:8765 --token s3cret

endpoints: POST /v1/features, GET /v1/info, GET /v1/health, GET /openapi.json (token needed;
/docs only with --insecure)
"""


def add_parsers(sub: Any) -> None:
    """Register ``frozenlens serve`` on the CLI's subparsers."""
    from frozenlens.backbones import DEFAULT_BACKBONE

    parser = sub.add_parser("serve", help="run the backbone as a feature server for edge clients",
                            description=SERVE_DESCRIPTION, epilog=SERVE_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    net = parser.add_argument_group("backbone and features")
    net.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"backbone name (default: {DEFAULT_BACKBONE})")
    net.add_argument("--img-size", type=int, help="input size in pixels (default: the backbone's)")
    net.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    net.add_argument("--tap", action="append", dest="taps", metavar="SITE:REDUCE",
                     help="tap to serve, repeatable, e.g. gather.8:tokens (default: final:cls, "
                          "final:patch_mean and the methods' remote taps, MIST's gather.<k>:tokens for "
                          "k in N/3, 2N/3, N)")
    web = parser.add_argument_group("network and security")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    web.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    web.add_argument("--token", help=f"bearer token clients must send (default: ${TOKEN_ENV}, else generated)")
    web.add_argument("--insecure", action="store_true",
                     help="no token at all; only with a loopback --host, for local experiments")
    limits = parser.add_argument_group("limits and batching")
    limits.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit (default: 32)")
    limits.add_argument("--max-batch", type=int, default=64, help="images per request (default: 64)")
    limits.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                        help="width x height of one image (default: 4096*4096)")
    limits.add_argument("--max-queue", type=int, default=256,
                        help="images waiting, all requests together; beyond it 429 (default: 256)")
    limits.add_argument("--batch-images", type=int, default=32, help="images per backbone pass (default: 32)")
    limits.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a pass waits for more requests (default: 5)")
    conn = parser.add_argument_group("connections (slow or half-open clients; see docs/serve.md)")
    conn.add_argument("--header-timeout", type=float, default=10.0,
                      help="seconds a connection has to send a request's headers (default: 10)")
    conn.add_argument("--body-timeout", type=float, default=60.0,
                      help="seconds a request has to send its body once the headers are in (default: 60)")
    conn.add_argument("--max-connections", type=int, default=512,
                      help="open connections, all clients; at the cap the oldest one still sending is "
                           "closed (default: 512)")
    conn.add_argument("--keep-alive", type=int, default=5,
                      help="seconds an idle connection stays open between requests (default: 5)")
    scale = parser.add_argument_group("scale-out")
    scale.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment on a local Ray")
    scale.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (default: 1)")
    parser.set_defaults(run=run_serve)


def add_remote_args(parser: argparse.ArgumentParser, *, codec_default: str | None) -> None:
    """``--remote URL --token T --codec C`` for ``fit`` and ``predict``."""
    group = parser.add_argument_group("separated tuning (a feature server computes the taps)")
    group.add_argument("--remote", metavar="URL",
                       help="fetch features from `frozenlens serve` at URL instead of running the backbone")
    group.add_argument("--token", help=f"the server's bearer token (default: ${TOKEN_ENV})")
    group.add_argument("--codec", choices=["float32", "float16", "int8"], default=codec_default,
                       help="wire precision of the features" + (
                           f" (default: {codec_default})" if codec_default else
                           " (default: the one the adapter was trained with)"))


def remote_source(args: argparse.Namespace, codec: str, expect_weights_hash: str | None = None):
    """The :class:`~frozenlens.serve.client.RemoteTaps` named by ``--remote/--token``."""
    from frozenlens.serve.client import RemoteTaps

    token = args.token or os.environ.get(TOKEN_ENV)
    return RemoteTaps.connect(args.remote, token, codec, expect_weights_hash=expect_weights_hash)


def run_serve(args: argparse.Namespace) -> int:
    """``frozenlens serve``: uvicorn (or Ray Serve) until Ctrl-C / SIGTERM."""
    from frozenlens.serve.app import Limits

    token = _token(args)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_batch_images=args.max_batch,
                    max_image_pixels=args.max_image_pixels, max_queued_images=args.max_queue,
                    batch_images=args.batch_images, batch_wait_ms=args.batch_wait_ms)
    if args.ray:
        return _run_ray(args, token, limits, args.taps)
    return _run_uvicorn(args, token, limits, args.taps)


def _token(args: argparse.Namespace) -> str | None:
    if args.insecure:
        from frozenlens.serve.app import check_insecure_host

        check_insecure_host(args.host)
        return None
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        token = secrets.token_urlsafe(24)
        print(f"no --token or ${TOKEN_ENV} given; generated token: {token}", flush=True)
    return token


def _run_uvicorn(args: argparse.Namespace, token: str | None, limits, taps: list[str] | None) -> int:
    from frozenlens.backbones import load_backbone
    from frozenlens.serve.app import ConnectionLimits, create_app, serve

    connections = ConnectionLimits(header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                                   max_connections=args.max_connections, keep_alive_s=args.keep_alive)
    backbone = load_backbone(args.backbone, img_size=args.img_size, device=args.device)
    app = create_app(backbone, token=token, insecure=token is None, limits=limits, taps=taps)
    _banner(args, app.state.server.engine.info())
    serve(app, host=args.host, port=args.port, connections=connections)
    return 0


def _run_ray(args: argparse.Namespace, token: str | None, limits, taps: list[str] | None) -> int:
    import ray
    from ray import serve

    from frozenlens.serve.ray_app import deployment

    ray.init(include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = deployment(backbone=args.backbone, img_size=args.img_size, token=token, insecure=token is None,
                     limits=limits, taps=taps, replicas=args.replicas)
    serve.run(app, name="frozenlens", route_prefix="/")
    print(f"Ray Serve: {args.replicas} replica(s) of the feature server at http://{args.host}:{args.port} "
          "(Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _banner(args: argparse.Namespace, info: dict[str, Any]) -> None:
    backbone = info["backbone"]
    print(f"serving {backbone['name']} (weights {backbone['weights_hash'][:12]}, {info['num_tokens']} tokens "
          f"x {backbone['dim']}) at http://{args.host}:{args.port}", flush=True)
    print(f"features: {', '.join(info['features'])}; codecs: {', '.join(info['codecs'])}", flush=True)


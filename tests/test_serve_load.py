"""The bounded load and fault test, small: concurrent clients, a third of the requests bad on purpose."""

from __future__ import annotations

import pytest

from benchmarks.loadtest import LoadTest
from frozenlens.errors import FrozenlensError
from frozenlens.serve.app import Limits, create_app
from frozenlens.serve.engine import DEFAULT_TAPS
from tests.test_serve_remote import LiveServer

TOKEN = "load-token"
SERVED = [*DEFAULT_TAPS, "gather.4:tokens", "gather.8:tokens"]


def test_load_with_faults_mixed_in_gives_no_5xx_and_right_answers(tiny_backbone):
    limits = Limits(max_body_bytes=256 * 1024, max_batch_images=8, max_image_pixels=256 * 256,
                    max_queued_images=8 * 8, batch_images=16)
    with LiveServer(create_app(tiny_backbone, token=TOKEN, taps=SERVED, limits=limits)) as live:
        test = LoadTest(live.url, TOKEN, requests=120, clients=8, bad_fraction=0.35, seed=1)
        report = test.run()
        batcher_passes = live.state.batcher.passes
    summary = report.to_dict()
    assert report.passed, summary
    assert report.server_errors == 0 and report.good == report.good_correct > 40
    assert set(report.bad) == set(test.bad_kinds()) and sum(report.bad.values()) > 25
    assert batcher_passes < report.good  # concurrent requests shared backbone passes


def test_load_test_refuses_a_server_off_this_machine():
    with pytest.raises(FrozenlensError, match="only targets a server on this machine"):
        LoadTest("http://10.1.2.3:8765", TOKEN)

"""The separated-tuning benchmark end to end at smoke size: server process, edge processes, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import shared_task

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_run_reports_every_measurement(tmp_path):
    shared_task("cifar10")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "separated_tuning.py"), "--smoke",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "separated_tuning.json").read_text())
    wire = {name: row["wire_bytes_per_image"] for name, row in result["bytes"]["codecs"].items()}
    assert wire["int8"] < wire["float16"] < wire["float32"]
    assert result["bytes"]["codecs"]["float32"]["vit_b_mb_per_image"] == 605_184 / 2**20  # the paper's 0.577
    assert [row["clients"] for row in result["throughput"]["rows"]] == [1, 4, 16]
    assert result["load_test"]["passed"] and result["load_test"]["server_errors"] == 0
    memory = result["edge_memory"]
    streamed, in_memory = "streamed from the store", "in memory"
    assert [(t["batch_size"], t["features_held"]) for t in memory["train"]] == [
        (32, streamed), (16, streamed), (32, in_memory)]
    assert memory["train"][0]["images"] == 60
    assert memory["train"][0]["warm_baseline_mb"] >= memory["train"][0]["baseline_mb"] > 0
    assert memory["predict"]["images"] == 16 and memory["predict"]["codec"] == "int8"
    assert set(result["accuracy"]["codecs"]) == {"float32", "float16", "int8"}
    assert "| int8 |" in (tmp_path / "separated_tuning.md").read_text()

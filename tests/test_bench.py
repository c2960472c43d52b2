"""``frozenlens bench``: end to end on a tiny task, resumable after SIGKILL, few-shot views, errors.

Torch runs on one thread here (and in the benches these tests start): the models are tiny, and on a
busy 2-core machine two spinning threads made the same bench 5x slower. Results do not depend on it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tqdm import tqdm

from frozenlens.bench import BenchConfig, run_bench
from frozenlens.bench.views import draw_shots, fewshot_view
from frozenlens.cli.bench import split_methods
from frozenlens.config_fields import added_setting, keyed_dict, keyed_repr
from frozenlens.data import load_task
from frozenlens.errors import FrozenlensError
from frozenlens.methods import get_method, method_names
from frozenlens.train.trainer import TrainConfig
from tests.conftest import TINY_BACKBONE, make_vtab_task, skip_or_fail_in_ci

MEASURED = {"cell_seconds", "cell_peak_memory_mb", "train_seconds", "peak_memory_mb", "train_seconds_per_seed",
            "grid_seconds", "bench_seconds_this_run"}
"""Report keys that measure this run's machine (time, memory), not results."""


def results_only(value):
    """``value`` without the measured times and memory (what two runs of one bench share)."""
    if isinstance(value, dict):
        return {k: results_only(v) for k, v in value.items() if k not in MEASURED}
    if isinstance(value, list):
        return [results_only(v) for v in value]
    return value


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes; 6 train, 3 val, 4 test images per class; 32 px."""
    root = tmp_path_factory.mktemp("bench") / "colours"
    root.mkdir()
    return make_vtab_task(root, {"train": 6, "val": 3, "test": 4})


def tiny(task: Path, out: Path, methods: list[str], **settings) -> BenchConfig:
    settings = {"backbone": TINY_BACKBONE, "img_size": 32, "seeds": 1, "epochs": 2, "progress": False,
                "grid": {"lr": [0.01, 0.001]}, **settings}
    return BenchConfig([task], methods, out, **settings)


RESUMED = {"seeds": 2, "grid": {"lr": [0.01, 0.001]}}
"""The bench of the end-to-end test, which the SIGKILL test also runs (killed, then resumed)."""


@pytest.fixture(scope="module")
def uninterrupted(bench_task, tmp_path_factory):
    """The report folder of a linear + BitFit bench run once, without interruption."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return run_bench(tiny(bench_task, out, ["linear", "bitfit"], **RESUMED)), out


def test_local_bench_end_to_end(uninterrupted):
    """A store method and an in-loop method: report files, selection on val, costs, plots."""
    report, tmp_path = uninterrupted
    for name in ("report.md", "report.csv", "report.json", "accuracy_vs_params.png", "accuracy_vs_memory.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert [r["method"] for r in report.rows] == ["linear", "bitfit"]
    data = json.loads((tmp_path / "report.json").read_text())
    for entry in data["entries"]:
        assert len(entry["test_accuracies"]) == 2                       # two seeds, each tested once
        best = max(entry["grid"], key=lambda g: g["val_accuracy"])       # chosen on val, first on ties
        assert entry["selected"]["train_config"]["lr"] == best["lr"]
        assert entry["trainable_params"] > 0 and entry["train_step_gflops_per_image"] > 0
    linear, bitfit = report.rows
    assert linear["store_bytes_per_image"] > 0 and linear["extract_gflops_per_image"] > 0
    assert bitfit["store_bytes_per_image"] == 0 and bitfit["train_step_gflops_per_image"] > linear[
        "train_step_gflops_per_image"]                                  # it runs the backbone every step
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [r["method"] for r in rows] == ["linear", "bitfit"]
    assert float(rows[0]["colours acc mean"]) == pytest.approx(linear["tasks"]["colours"]["mean"])
    markdown = (tmp_path / "report.md").read_text()
    assert "never used to select" in markdown and "| linear |" in markdown
    cells = sorted(p.name for p in (tmp_path / "cells").rglob("*.json"))
    assert len(cells) == 2 + 2 + 2           # linear: search, final (2 seeds); bitfit: 2 grid points, 2 seeds


def test_report_shows_where_training_ended(uninterrupted):
    """Each final run keeps its per-epoch loss curve; the report's loss is the mean last epoch."""
    report, tmp_path = uninterrupted
    for row in report.rows:
        finals = [json.loads(p.read_text())["result"] for p in (tmp_path / "cells" / "colours" / row["method"])
                  .rglob("final*.json")]
        curves = [curve for f in finals for curve in f["train_losses"]]
        assert len(curves) == 2 and all(len(c) == 2 for c in curves)          # 2 seeds x 2 epochs
        assert row["final_train_loss"] == pytest.approx(sum(c[-1] for c in curves) / 2)
        assert 0 < row["final_train_loss"] < 10
    entries = json.loads((tmp_path / "report.json").read_text())["entries"]
    assert all(len(e["train_loss_curve"]) == 2 for e in entries)
    assert (tmp_path / "training_loss.png").stat().st_size > 0
    assert "last-epoch train loss" in (tmp_path / "report.md").read_text()
    assert "final_train_loss" in (tmp_path / "report.csv").read_text().splitlines()[0]


def test_bench_reports_which_layers_matter(bench_task, tmp_path):
    """InCA's per-block selection accuracies and VQT's per-block ablation reach the report and plot."""
    report = run_bench(tiny(bench_task, tmp_path, ["inca:layers=1+2", "vqt"], epochs=1, grid={}))
    kinds = {e["method"]: e["layers"]["kind"] for e in report.entries}
    assert kinds == {"inca:layers=1+2": "inca-selection", "vqt": "vqt-ablation"}
    vqt = next(e for e in report.entries if e["method"] == "vqt")["layers"]
    assert len(vqt["blocks"]) == len(vqt["accuracy"]) == 12 and 0 <= vqt["intact"] <= 1
    assert (tmp_path / "accuracy_per_layer.png").stat().st_size > 0
    assert "Which blocks matter" in (tmp_path / "report.md").read_text()


def test_bench_reports_what_each_seed_chose(bench_task, tmp_path):
    """MIST's k and InCA's kept block, chosen by each final model on its own holdout, reach the report."""
    report = run_bench(tiny(bench_task, tmp_path, ["mist", "inca:layers=1+2"], epochs=1, grid={}, seeds=2))
    mist, inca = report.entries
    assert len(mist["choices"]) == len(inca["choices"]) == 2                 # one per seed
    for choice in mist["choices"]:
        assert sorted(map(int, choice["held_out_accuracy"])) == [4, 8, 12]   # N/3, 2N/3, N of 12 blocks
        assert choice["gather_depth"] in (4, 8, 12)
    assert all(choice["layers"][0] in (1, 2) for choice in inca["choices"])
    markdown = (tmp_path / "report.md").read_text()
    assert "Chosen on held-out data" in markdown and "seed 1: gather_depth=" in markdown


def test_search_carries_the_k_mist_chose_on_val_into_the_finals(bench_task, tmp_path):
    """With a grid, each point's fit chooses k on val; the winner's k trains the finals (one
    fit per seed, no reselection on a holdout), as its learning rate does."""
    report = run_bench(tiny(bench_task, tmp_path, ["mist"], epochs=1, seeds=2))
    entry = report.entries[0]
    assert [sorted(row) for row in entry["grid"]] == [["gather_depth", "lr", "val_accuracy"]] * 2
    best = max(entry["grid"], key=lambda row: row["val_accuracy"])
    assert best["gather_depth"] in (4, 8, 12)
    assert entry["selected"]["config"]["gather_depth"] == best["gather_depth"]
    assert "choices" not in entry                         # the finals chose nothing themselves
    final = [cell for cell in (tmp_path / "cells").rglob("final-*.json")]
    assert len(final) == 1
    saved = json.loads(final[0].read_text())
    assert ["gather_depth", best["gather_depth"]] in saved["cell"]["point"]
    assert [len(curve) for curve in saved["result"]["train_losses"]] == [1, 1]   # one epoch, one fit


def test_killed_bench_resumes_without_recomputing(bench_task, tmp_path, uninterrupted):
    """SIGKILL a bench mid-run; the rerun keeps every finished cell file untouched, computes the
    rest, and its report equals an uninterrupted run's (times and memory aside)."""
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "frozenlens.cli", "bench", "--tasks", str(bench_task),
               "--methods", "linear,bitfit", "--backbone", TINY_BACKBONE, "--img-size", "32", "--seeds", "2",
               "--epochs", "2", "--grid", "lr=0.01+0.001", "--out", str(out), "--no-plots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(out.glob("cells/**/*.json"))) >= 2:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the bench finished before it could be killed: " + process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("cells/**/*.json")}
    assert 2 <= len(before) < 2 + 2 + 2 and not (out / "report.json").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(before)} cell(s) already finished" in resumed.stderr
    assert "bitfit:" in resumed.stderr and "epoch/s" in resumed.stderr      # a cell's own epoch bar
    for path, (content, mtime) in before.items():
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime, f"{path} was recomputed"
    assert len(list(out.glob("cells/**/*.json"))) == 2 + 2 + 2
    whole = json.loads((uninterrupted[1] / "report.json").read_text())
    assert results_only(json.loads((out / "report.json").read_text())) == results_only(whole)


def test_a_search_fitted_point_by_point_resumes_from_its_last_saved_point(bench_task, tmp_path, monkeypatch):
    """LAST fits its grid points one by one: each is saved under <out>/parts/ as it finishes, a search
    interrupted in its second point retrains only that point when run again, the parts go once the
    search cell is saved, and the report equals that of the points trained together in lockstep."""
    import frozenlens.protocol as protocol
    from frozenlens.methods.mist import LAST

    real, fitted = protocol._fit_points, []

    def fit_points(probe, data, runs, progress):
        if len(fitted) == fail_at:
            raise KeyboardInterrupt
        fitted.append([cfg.lr for cfg, _ in runs])
        return real(probe, data, runs, progress)

    monkeypatch.setattr(protocol, "_fit_points", fit_points)
    out, fail_at = tmp_path / "resumed", 1
    with pytest.raises(KeyboardInterrupt):
        run_bench(tiny(bench_task, out, ["last"], epochs=1))
    parts = list((out / "parts").rglob("*.json"))
    assert fitted == [[0.01]] and len(parts) == 1 and not list((out / "cells").rglob("search*.json"))
    fail_at = None
    resumed = run_bench(tiny(bench_task, out, ["last"], epochs=1))
    assert fitted == [[0.01], [0.001]]                       # the saved point was not trained again
    assert len(list((out / "cells").rglob("search*.json"))) == 1 and not (out / "parts").exists()

    monkeypatch.setattr(LAST, "trains_together", True)     # both points in one lockstep pass
    together = run_bench(tiny(bench_task, tmp_path / "together", ["last"], epochs=1))
    assert fitted[-1] == [0.01, 0.001]
    assert results_only(resumed.entries) == results_only(together.entries)


def test_a_final_cell_trained_seed_by_seed_resumes_from_its_last_saved_seed(bench_task, tmp_path, monkeypatch):
    """LAST's final cell trains its seeds one after the other, each saved under <out>/parts/ as soon as
    it is tested: a final cell interrupted in its second seed trains only that seed when run again, the
    parts go once the cell is saved, and the report equals that of both seeds trained in lockstep."""
    from frozenlens.bench.workspace import Workspace
    from frozenlens.methods.mist import LAST

    real, computed = Workspace._compute, []

    def compute(self, cell, progress, order_seed=None):
        if cell.stage == "final":
            if len(computed) == fail_at:
                raise KeyboardInterrupt
            computed.append(cell.seeds)
        return real(self, cell, progress, order_seed)

    monkeypatch.setattr(Workspace, "_compute", compute)
    out, fail_at, settings = tmp_path / "resumed", 1, {"epochs": 1, "seeds": 2, "grid": {"lr": [0.01]}}
    with pytest.raises(KeyboardInterrupt):
        run_bench(tiny(bench_task, out, ["last"], **settings))
    parts = list((out / "parts").rglob("*.json"))
    assert computed == [(0,)] and [p.name.split("-")[0] for p in parts] == ["seed=0"]
    assert not list((out / "cells").rglob("final*.json"))
    fail_at = None
    resumed = run_bench(tiny(bench_task, out, ["last"], **settings))
    assert computed == [(0,), (1,)]                           # the saved seed was not trained again
    assert len(list((out / "cells").rglob("final*.json"))) == 1 and not (out / "parts").exists()
    assert len(resumed.entries[0]["test_accuracies"]) == 2

    monkeypatch.setattr(LAST, "trains_together", True)      # both seeds in one lockstep pass
    together = run_bench(tiny(bench_task, tmp_path / "together", ["last"], **settings))
    assert computed[-1] == (0, 1)
    assert results_only(resumed.entries) == results_only(together.entries)


def test_finished_cells_start_the_progress_bar(bench_task, uninterrupted, tmp_path, monkeypatch, caplog):
    """Rerunning a finished bench computes nothing, and every saved cell, final runs included, starts the
    overall bar, so its ETA counts only cells still to compute."""
    import frozenlens.bench.runner as runner

    out = tmp_path / "again"
    shutil.copytree(uninterrupted[1], out)
    cells = {p: p.stat().st_mtime_ns for p in out.glob("cells/**/*.json")}
    bars = []
    monkeypatch.setattr(runner, "tqdm", lambda *args, **kwargs: bars.append(kwargs) or tqdm(*args, **kwargs))
    with caplog.at_level(logging.INFO, logger="frozenlens"):
        run_bench(tiny(bench_task, out, ["linear", "bitfit"], **RESUMED))
    assert len(cells) == 2 + 2 + 2 and bars[0]["initial"] == bars[0]["total"] == len(cells)
    assert f"{len(cells)} cell(s) already finished" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/**/*.json")} == cells


def test_a_setting_added_at_its_default_keeps_every_saved_cell(bench_task, uninterrupted, tmp_path, monkeypatch):
    """A config field declared with ``added_setting`` leaves the cell keys as they were while it holds its
    default: the finished bench resumes with nothing to compute. Any other value keys a new cell."""
    from frozenlens.bench.workspace import Workspace

    linear = get_method("linear")
    grown = dataclasses.make_dataclass(linear.config_class.__qualname__, [("extra", int, added_setting(0))],
                                       bases=(linear.config_class,))
    monkeypatch.setattr(linear, "config_class", grown)
    out = tmp_path / "grown"
    shutil.copytree(uninterrupted[1], out)

    class Recomputed(Exception):
        pass

    def refuse(self, cell, progress=False):
        raise Recomputed(cell.method)

    monkeypatch.setattr(Workspace, "execute", refuse)
    report = run_bench(tiny(bench_task, out, ["linear", "bitfit"], **RESUMED))
    assert results_only(report.entries) == results_only(uninterrupted[0].entries)
    with pytest.raises(Recomputed, match="linear:extra=1"):
        run_bench(tiny(bench_task, out, ["linear:extra=1"], **RESUMED))


def test_a_config_without_added_settings_is_keyed_by_its_own_repr():
    """Keys saved before ``added_setting`` existed hashed ``repr(config)`` and the training dict: the
    keyed forms must equal them for every method's config and the training settings."""
    for name in method_names():
        config = get_method(name).config_class()
        assert keyed_repr(config) == repr(config), name
    train = TrainConfig(lr=0.5, order_seed=3)
    assert keyed_dict(train) == train.to_dict()


def test_report_only_reports_what_is_saved_and_computes_nothing(bench_task, uninterrupted, tmp_path, monkeypatch):
    """--report-only on a finished linear + BitFit bench widened to a second task and to LAST: nothing
    trains and no cell is written, the saved entries come out unchanged, the pairs not run are listed,
    and a method missing a task gets no mean over tasks."""
    from frozenlens.bench.workspace import Workspace

    out = tmp_path / "partial"
    shutil.copytree(uninterrupted[1], out)
    cells = {p: p.stat().st_mtime_ns for p in out.glob("cells/**/*.json")}
    other = tmp_path / "shapes"
    other.mkdir()
    make_vtab_task(other, {"train": 6, "val": 3, "test": 4})
    monkeypatch.setattr(Workspace, "execute", lambda *args, **kwargs: pytest.fail("--report-only trained a cell"))
    config = BenchConfig([bench_task, other], ["linear", "bitfit", "last"], out, backbone=TINY_BACKBONE, img_size=32,
                         epochs=2, progress=False, report_only=True, **RESUMED)
    report = run_bench(config)
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/**/*.json")} == cells
    assert results_only(report.entries) == results_only(uninterrupted[0].entries)
    assert report.context["unfinished"] == ["colours last", "shapes linear", "shapes bitfit", "shapes last"]
    assert [r["method"] for r in report.rows] == ["linear", "bitfit"]
    assert all(list(r["tasks"]) == ["colours"] and r["group_mean"] is None for r in report.rows)
    markdown = (out / "report.md").read_text()
    assert "**Unfinished**" in markdown and "| not run | — |" in markdown
    assert ",,," in (out / "report.csv").read_text().splitlines()[1]      # shapes mean, std and the mean: empty


def test_ray_engine_matches_the_local_engine(bench_task, tmp_path, uninterrupted, monkeypatch):
    """The same bench on a local Ray cluster (2 CPUs): a Ray Data pipeline fills a store byte-identical
    to the local extraction's (same key), cells run as Ray tasks, and the report equals the local one."""
    pytest.importorskip("ray")
    try:
        import ray.data  # noqa: F401
    except ImportError as err:
        skip_or_fail_in_ci(f"Ray Data is not installed ({err}); install frozenlens[ray] with ray[data]")
    local_cache = Path(os.environ["FROZENLENS_CACHE"])
    monkeypatch.setenv("FROZENLENS_CACHE", str(tmp_path / "cache"))   # extract again, on Ray
    report = run_bench(tiny(bench_task, tmp_path / "out", ["linear", "bitfit"], engine="ray", ray_num_cpus=2,
                            plots=False, **RESUMED))
    ours, theirs = results_only(report.to_dict()), results_only(json.loads((uninterrupted[1] / "report.json")
                                                                           .read_text()))
    assert ours["context"].pop("engine") == "ray" and theirs["context"].pop("engine") == "local"
    assert ours == theirs
    (store,) = (tmp_path / "cache" / "stores").iterdir()
    shards = sorted(p.relative_to(store) for p in store.rglob("*.npy"))
    assert shards and all((store / p).read_bytes() == (local_cache / "stores" / store.name / p).read_bytes()
                          for p in shards)


def test_fewshot_views_draw_fixed_shots_and_hold_some_out(bench_task):
    task = load_task(bench_task)
    picked = draw_shots(task, 4, draw=1)
    assert picked == draw_shots(task, 4, draw=1) != draw_shots(task, 4, draw=2)
    labels = [task.split("trainval")[i].label for i in picked]
    assert sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4
    view = fewshot_view(task, 4, draw=1)
    assert len(view.split("trainval")) == 12 and len(view.split("val")) == 3 and len(view.split("train")) == 9
    assert {i.path for i in view.split("val")} <= {i.path for i in view.split("trainval")}
    assert view.split("test") == task.split("test")
    assert "val" not in fewshot_view(task, 1, draw=0).splits           # one shot: nothing to hold out
    with pytest.raises(FrozenlensError, match="fewer than 10 shots"):
        draw_shots(task, 10, draw=0)


def test_fewshot_bench_reports_each_number_of_shots(bench_task, tmp_path):
    report = run_bench(tiny(bench_task, tmp_path, ["linear"], protocol="fewshot", shots=[1, 2], seeds=2))
    assert len(report.entries) == 2 * 2                                 # shots x draws
    one_shot = [e for e in report.entries if e["shots"] == 1]
    assert all(e["grid"] == [] for e in one_shot)                       # defaults: no held-out shot
    assert all(len(e["grid"]) == 2 for e in report.entries if e["shots"] == 2)
    row = report.rows[0]["shots"]
    assert set(row) == {"1", "2"} and row["2"]["tasks"]["colours"]["runs"] == 2
    assert (tmp_path / "accuracy_vs_shots.png").stat().st_size > 0
    assert "2-shot" in (tmp_path / "report.csv").read_text().splitlines()[0]


def test_methods_argument_keeps_settings_with_their_method():
    assert split_methods(["linear,head2toe:keep_fraction=0.2,group_lasso=1e-3,vqt", "lora"]) == [
        "linear", "head2toe:keep_fraction=0.2,group_lasso=1e-3", "vqt", "lora"]


@pytest.mark.parametrize("change, message", [
    ({"protocol": "vtab1k"}, "protocol 'vtab1k'"),
    ({"engine": "spark"}, "engine 'spark'"),
    ({"seeds": 0}, "seeds=0"),
    ({"protocol": "fewshot", "shots": [0]}, "shots=\\[0\\]"),
    ({"grid": {"lr": []}}, "grid="),
])
def test_bad_settings_are_refused_before_any_work(bench_task, tmp_path, change, message):
    with pytest.raises(FrozenlensError, match=message):
        run_bench(tiny(bench_task, tmp_path, ["linear"], **change))


def test_two_tasks_with_one_name_are_refused(bench_task, tmp_path):
    other = tmp_path / "elsewhere" / "colours"
    other.mkdir(parents=True)
    with pytest.raises(FrozenlensError, match="same folder name"):
        run_bench(BenchConfig([bench_task, other], ["linear"], tmp_path / "out", backbone=TINY_BACKBONE))

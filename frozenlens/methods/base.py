"""What every method is: a config dataclass, the taps it reads, an ``nn.Module``, a fit.

A method registers itself by name (:func:`register`). The registry builds it
from a name, a config (dataclass or plain dict, e.g. read back from an
adapter file), the backbone's description and the number of classes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.taps import Tap
from frozenlens.backbones.text import MASK_KEY, TextBackbone
from frozenlens.errors import FrozenlensError
from frozenlens.train.data import TapData
from frozenlens.train.stacked import train_many
from frozenlens.train.trainer import TrainConfig, seeded, train

_REGISTRY: dict[str, type["Method"]] = {}


class Method(nn.Module):
    """Base class of methods that train on stored taps.

    Subclasses set ``name``, ``config_class`` (a dataclass), ``train_defaults``
    and ``grid`` (the VTAB search space, names of :class:`TrainConfig` fields),
    and implement :meth:`taps` and :meth:`forward`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    summary: ClassVar[str] = ""
    train_defaults: ClassVar[TrainConfig] = TrainConfig()
    grid: ClassVar[dict[str, list[Any]]] = {}
    in_loop: ClassVar[bool] = False
    """True for methods that run the frozen backbone in the training loop (PETL, TOAST).

    They read no stored taps (:meth:`taps` is empty): batches hold preprocessed
    images under ``"images"`` (:class:`frozenlens.train.images.ImageData`), and
    they change the backbone's computation only through
    :mod:`frozenlens.backbones.hooks`, on :attr:`frozen_backbone`. They must be
    built with the :class:`FrozenBackbone` itself, not its description.
    """

    validation_choices: ClassVar[tuple[str, ...]] = ()
    """Config fields that ``fit`` chooses on validation data when left open (MIST's ``gather_depth``).

    During a grid search ``fit`` gets the val split, so each grid point's choice is made on
    val; the protocol records it beside the point and the final runs train with the winning
    point's choice fixed, as they do with its learning rate (:func:`frozenlens.protocol.search_grid`).
    Without a grid search, a final fit makes the choice itself on a holdout of its data."""

    modalities: ClassVar[tuple[str, ...]] = ("image",)
    """Kinds of backbone the method works on: ``"image"`` (a ViT, :class:`FrozenBackbone`) and/or
    ``"text"`` (a :class:`~frozenlens.backbones.text.TextBackbone`, whose taps come with a padding
    mask under :data:`~frozenlens.backbones.text.MASK_KEY`). :func:`build_method` refuses the others."""

    trains_together: ClassVar[bool] = False
    """True when :meth:`fit_many` trains several configurations in one pass over the stored taps
    (stacked, or in lockstep sharing each minibatch) and that pass is much faster than fitting
    them one at a time. A grid search then trains its points together; otherwise it fits them
    one by one and can save each as it finishes (:func:`frozenlens.protocol.search_grid`'s
    ``memo``), so an interrupted search loses at most one point."""

    needs_backbone_modules: ClassVar[bool] = False
    """True for store-trained methods that also run some of the backbone's own modules
    (VQT passes its queries through every frozen block): they train only where the
    backbone is loaded, not from a ``--remote`` feature server's taps."""

    def __init__(self, config: Any, backbone: dict[str, Any], num_classes: int):
        super().__init__()
        self.config = config
        self.backbone_info = backbone
        self.num_classes = num_classes
        self._frozen: list[FrozenBackbone] = []  # a list: not a submodule, not in the state dict

    def bind(self, backbone: FrozenBackbone) -> None:
        """Give the method the frozen backbone whose modules it reuses (e.g. VQT's blocks).

        The backbone is not registered as a submodule: adapters never hold its weights.
        """
        if backbone.weights_hash != self.backbone_info["weights_hash"]:
            raise FrozenlensError(f"{self.name}: bound backbone differs from the one it was built for")
        self._frozen[:] = [backbone]

    @property
    def frozen_backbone(self) -> FrozenBackbone:
        """The bound frozen backbone (see :meth:`bind`)."""
        if not self._frozen:
            raise FrozenlensError(f"method {self.name!r} needs the frozen backbone: build it with "
                                  "build_method(..., backbone=<FrozenBackbone>)")
        return self._frozen[0]

    def backbone_source(self) -> "FrozenBackbone | dict[str, Any]":
        """What :func:`build_method` needs to build a sibling of this method."""
        return self._frozen[0] if self._frozen else self.backbone_info

    @classmethod
    def taps(cls, config: Any, backbone: dict[str, Any]) -> list[Tap]:
        """Activations the method reads, given the backbone's description."""
        raise NotImplementedError

    @classmethod
    def served_taps(cls, backbone: dict[str, Any]) -> list[Tap]:
        """Taps a feature server offers this method's remote clients by default (none unless the
        method computes a tap of its own there, like MIST's gathers); ``backbone`` is its description."""
        return []

    def tap_keys(self) -> list[str]:
        """Keys of the features this instance reads: its :meth:`taps`, and on a text backbone the
        padding mask as well (:data:`~frozenlens.backbones.text.MASK_KEY`, last)."""
        keys = [t.key for t in self.taps(self.config, self.backbone_info)]
        if keys and backbone_modality(self.backbone_info) == "text":
            keys.append(MASK_KEY)
        return keys

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        """Logits from a batch of tap values."""
        raise NotImplementedError

    def choices(self) -> dict[str, Any]:
        """What fitting chose on held-out data (e.g. MIST's k), for reports; empty when the
        method chooses nothing itself (grid points are the protocol's choice, not the model's)."""
        return {}

    def regularization(self) -> torch.Tensor:
        """Extra loss term added by the trainer (none by default)."""
        return torch.zeros(())

    def reset_trainable(self, seed: int) -> None:
        """Re-initialise every module that owns trainable parameters, from ``seed``.

        Fitting starts here, so the same seed gives the same model. The global
        random state is forked, so the caller's is left as it was.
        """
        with seeded(seed):
            for module in self.modules():
                owns = any(p.requires_grad for p in module.parameters(recurse=False))
                if owns and hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    def fit(self, data: TapData, cfg: TrainConfig, *, val: TapData | None = None,
            progress: bool = False) -> list[float]:
        """Train on ``data`` from a seeded initialisation with the shared trainer.

        ``val`` is given during the grid search, for methods that select something
        on validation data (the base method ignores it); the final runs get None.
        """
        self.reset_trainable(cfg.seed)
        return train(self, data, cfg, progress=progress, desc=self.name)

    @classmethod
    def fit_many(cls, models: Sequence["Method"], data: Any, cfgs: Sequence[TrainConfig], *,
                 val: Any = None, progress: bool = False) -> list[list[float]]:
        """Fit ``models[i]`` with ``cfgs[i]`` on the same ``data``, together where the method can.

        What :meth:`fit` does for each, but every minibatch is read once for all of them
        (:func:`frozenlens.train.stacked.train_many`): the VTAB grid and the final seeds
        become one pass each. A method whose :meth:`fit` does more than the shared
        trainer overrides this too; until it does, its models are fitted one at a time.
        """
        if cls.fit is not Method.fit:
            return [m.fit(data, c, val=val, progress=progress) for m, c in zip(models, cfgs)]
        for model, cfg in zip(models, cfgs):
            model.reset_trainable(cfg.seed)
        return train_many(models, data, cfgs, progress=progress, desc=cls.name)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    if name not in _REGISTRY:
        raise FrozenlensError(f"unknown method {name!r}: choose from {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_for_config(config: Any) -> str:
    """Name of the method whose config class is exactly ``type(config)``."""
    for name, cls in _REGISTRY.items():
        if type(config) is cls.config_class:
            return name
    raise FrozenlensError(f"{type(config).__name__} is not the config of any method; "
                          f"methods: {', '.join(sorted(_REGISTRY))}")


def method_names() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def make_config(name: str, values: dict[str, Any] | None = None) -> Any:
    """Config of method ``name`` with ``values`` (strings are converted to the field type)."""
    config_class = get_method(name).config_class
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    kwargs = {}
    for key, value in (values or {}).items():
        if key not in fields:
            raise FrozenlensError(
                f"method {name!r} has no setting {key!r}; settings: {', '.join(fields)}"
            )
        default = getattr(config_class(), key)
        kwargs[key] = convert_setting(value, default, key) if isinstance(value, str) else value
    return config_class(**kwargs)


def build_method(name: str, config: Any, backbone: "FrozenBackbone | dict[str, Any]",
                 num_classes: int) -> Method:
    """Instantiate method ``name``; ``config`` may be a dataclass, a dict or None (defaults).

    ``backbone`` is the frozen backbone (bound to the method, for methods that
    reuse its modules) or just its :meth:`~FrozenBackbone.describe` dict.
    """
    if config is None or isinstance(config, dict):
        config = make_config(name, config)
    method_class = get_method(name)
    local = isinstance(backbone, (FrozenBackbone, TextBackbone))
    info = backbone.describe() if local else backbone
    modality = backbone_modality(info)
    if modality not in method_class.modalities:
        readers = sorted(n for n, c in _REGISTRY.items() if modality in c.modalities)
        raise FrozenlensError(f"method {name!r} does not work on {modality} backbones yet "
                              f"({info.get('name', 'this backbone')}); methods that do: {', '.join(readers)}")
    if method_class.in_loop and not local:
        raise FrozenlensError(
            f"method {name!r} runs the backbone in the training loop: it needs the backbone itself on "
            "this machine (build_method(..., backbone=<FrozenBackbone>); no --remote feature server)"
        )
    method = method_class(config, info, num_classes)
    if local:
        method.bind(backbone)
    return method


def backbone_modality(info: dict[str, Any]) -> str:
    """``"text"`` or ``"image"``: the kind of backbone described by ``info`` (its ``describe()``)."""
    return str(info.get("modality", "image"))


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-able dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(config)


def convert_setting(text: str, default: Any, key: str) -> Any:
    """``text`` converted to the type of ``default`` (bool, tuple, int, float, str); clear error otherwise."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, (tuple, list)):
            kind = type(default[0]) if default else float
            return tuple(kind(part) for part in re.split(r"[+,]", text) if part.strip())
        return type(default)(text) if default is not None else text
    except ValueError as err:
        raise FrozenlensError(
            f"setting {key}={text!r}: expected a value like {default!r}"
        ) from err

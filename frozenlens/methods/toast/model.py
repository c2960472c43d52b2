"""TOAST, Top-Down Attention Steering (Shi et al., 2023), on a frozen timm ViT.

Inference has four steps (paper, Section 3.1); the architecture-independent pieces
(feature selection, feedback layers, the variational loss) are in :mod:`.core`, shared
with the language-model (:mod:`.lm`) and ConvNeXt (:mod:`.convnext`) variants:

1. **Pass 1**: the frozen backbone runs as usual; ``z`` are its final normed tokens.
2. **Feature selection**: ``z~_i = sim(z_i, xi) * z_i P`` with ``sim`` the cosine
   similarity clamped to ``[0, 1]``, a task embedding ``xi`` (token selection) and a
   channel transform ``P`` initialised to the identity (channel selection).
3. **Feedback path**: one :class:`FeedbackLayer` per block, run from the top block
   down. Each holds two bias-free ``d x d`` maps: ``h_l = feed_down(h_{l+1})`` feeds
   the next lower layer (``h`` of the top layer is ``z~``) and
   ``td_l = top_down(h_l)`` is block ``l``'s top-down signal.
4. **Pass 2**: the backbone runs again with every attention taking the top-down
   signal into its values only, ``V = W_v (X + X_td)``, ``Q, K`` from ``X`` alone
   (:func:`frozenlens.backbones.hooks.attention`, installed per forward through
   :mod:`frozenlens.backbones.hooks`). A linear head reads the CLS token of pass 2
   (``pool=mean``: the mean token instead; on text the default is the masked mean).

The same method runs on a frozen BERT-family text encoder
(:class:`~frozenlens.backbones.text.TextBackbone`, ``Method.modalities``): batches are
tokenized texts (:mod:`frozenlens.train.texts`) and the passes are :mod:`.bert`'s
(value-input edits of every ``BertSelfAttention``, padding masked out of the feature
selection, the pooling and the variational loss); everything else is shared.

The backbone stays frozen; TOAST trains the feature selection (``xi`` and ``P``),
the feedback path and the head, as the paper tunes the whole top-down module in
both stages (``tune_p=false`` keeps ``P`` at the identity, as the reference code
does). TOAST-Lite freezes the feedback weights and trains rank-4 LoRA factors on
them, plus ``xi``, ``P`` and the head.
Early feedback feeds back from a middle block (pass 1 stops there); late feedback
sends top-down signals to the upper half only and reuses pass 1's lower half.
Pre-tuning (:func:`pretune`) trains the modules on a general image collection with
task loss + 0.03 x the variational loss (each feedback layer reconstructs its
block's input from the block's output); ``variational_weight`` adds the same loss to
fitting (off by default: the paper tunes with the task loss alone). ``docs/methods/toast.md``
has the defaults, the measured FLOPs and the deviations from the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.hooks import Edits, edited_model, run_blocks, value_input
from frozenlens.backbones.text import MASK_KEY, TextBackbone
from frozenlens.errors import AdapterError, FrozenlensError
from frozenlens.methods.base import Method, backbone_modality, register
from frozenlens.methods.layers import init_kaiming_head, init_zero_head
from frozenlens.methods.toast.core import FeatureSelection, FeedbackLayer, run_feedback, variational_loss
from frozenlens.train.stacked import train_many
from frozenlens.train.trainer import Objective, TrainConfig, cross_entropy_objective, seeded, train

__all__ = ["TOAST", "TOASTLite", "TOASTConfig", "TOASTLiteConfig", "TOASTPasses", "FeatureSelection",
           "FeedbackLayer", "FeedbackPlan", "run_feedback", "steering_objective", "variational_loss"]

FEEDBACK_MODES = ("full", "early", "late")
POOLS = ("auto", "cls", "mean")
HEAD_INITS = ("reference", "zero")


# -- which blocks take part -----------------------------------------------------------
@dataclass(frozen=True)
class FeedbackPlan:
    """Which blocks pass 1 runs, which get top-down signals, where pass 2 starts.

    Attributes:
        source: block whose output (through the final norm) is fed back.
        layers: blocks with a feedback layer / top-down signal, ascending.
        pass2_start: first block pass 2 runs; below it, pass 1's outputs are reused.
    """

    source: int
    layers: tuple[int, ...]
    pass2_start: int

    @classmethod
    def make(cls, mode: str, depth: int, middle: int = 0) -> "FeedbackPlan":
        """Plan for ``mode`` (``full``, ``early``, ``late``) on ``depth`` blocks.

        ``middle`` is the number of blocks in the lower half (0: ``depth // 2``).
        """
        if mode not in FEEDBACK_MODES:
            raise FrozenlensError(f"feedback={mode!r}: use one of {', '.join(FEEDBACK_MODES)}")
        middle = middle or depth // 2
        if mode != "full" and not 0 < middle < depth:
            raise FrozenlensError(f"middle={middle}: must be in 1..{depth - 1} for {mode} feedback "
                                  f"(0 means depth // 2 = {depth // 2})")
        if mode == "early":
            return cls(middle - 1, tuple(range(middle)), 0)
        if mode == "late":
            return cls(depth - 1, tuple(range(middle, depth)), middle)
        return cls(depth - 1, tuple(range(depth)), 0)


# -- the method -----------------------------------------------------------------------
@dataclass
class TOASTConfig:
    """TOAST settings.

    Attributes:
        feedback: ``"full"`` (from the last block into every block, 2x the backbone's
            FLOPs), ``"early"`` (feed back the output of block ``middle - 1``; pass 1
            stops there) or ``"late"`` (top-down signals into blocks ``middle..N-1``
            only; pass 2 reuses pass 1's lower half). Early and late cost ~1.5x.
        middle: blocks in the lower half for early/late feedback (0: ``depth // 2``).
        pretuned: folder written by ``frozenlens pretune toast``: fitting starts from
            its feature selection and feedback path (the head is always new).
        tune_p: train the channel transform ``P`` (paper: the whole top-down module,
            ``P`` included, is tuned in pre-tuning and tuning; its ablation freezing
            ``P`` with the feedback path loses 11.5 points). False keeps ``P`` at its
            start (the identity, or the pre-tuned ``P``), as the reference code's TOAST.
        pool: what the head reads from pass 2: ``"cls"`` (the class token, as the paper and
            its reference code; the mean token on backbones without one), ``"mean"`` (the
            mean token: over the patch tokens of an image; over the real tokens of a text,
            ``[CLS]`` and ``[SEP]`` included and padding excluded, as sentence-transformers
            pools) or ``"auto"`` (default: ``cls`` on images, ``mean`` on text, the pooling
            each backbone was trained to be read with; all-MiniLM-L6-v2 was trained on its
            mean token, and its CLS output never was).
        variational_weight: weight of the variational loss (every feedback layer
            reconstructs its layer's input from its output) added to the task loss when
            fitting. 0 (default): the paper's tuning stage, task loss only (it uses the
            loss in pre-tuning, weight 0.03); TOAST-LM trains with 0.01.
        head_init: ``"reference"`` (default: Kaiming-normal fan-out weights and bias
            ``-log(99)``, as the reference code's head; with few classes its logits start
            large, e.g. a cross-entropy near 17 on 10 classes of DINOv2-S) or ``"zero"``
            (every class starts at the same logit, loss ln C, as frozenlens' PETL baselines).
    """

    feedback: str = "full"
    middle: int = 0
    pretuned: str = ""
    tune_p: bool = True
    pool: str = "auto"
    variational_weight: float = 0.0
    head_init: str = "reference"

    def __post_init__(self) -> None:
        """Refuse a pooling, head start or variational weight that cannot work (the message names the value)."""
        if self.pool not in POOLS:
            raise FrozenlensError(f"pool={self.pool!r}: use one of {', '.join(POOLS)}")
        if self.head_init not in HEAD_INITS:
            raise FrozenlensError(f"head_init={self.head_init!r}: use one of {', '.join(HEAD_INITS)}")
        weight = self.variational_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise FrozenlensError(f"variational_weight={weight!r}: use a number of 0 or more (0: off)")


@dataclass
class TOASTLiteConfig(TOASTConfig):
    """TOAST-Lite settings: TOAST's, plus the LoRA on the feedback maps.

    Attributes:
        lora_rank: rank r of the LoRA factors on every feedback map (paper: 4).
        lora_alpha: LoRA scaling numerator; the update is ``alpha / r * B A``
            (loralib's default alpha 1, as the reference code uses).
    """

    lora_rank: int = 4
    lora_alpha: float = 1.0


@dataclass
class TOASTPasses:
    """Everything one TOAST forward computed.

    Attributes:
        logits: ``(B, classes)`` from pass 2.
        tokens: ``(B, T, D)`` pass 2's final normed tokens (what the head reads).
        token_weights: ``(B, T)`` feature selection's token relevance (the similarity map).
        block_inputs, block_outputs: pass 2's input and output of every block with a
            feedback layer (only when asked: the variational loss reads them).
        attention: ``{"pass1": ..., "pass2": ...}`` attention probabilities
            ``(B, heads, T, T)`` of the last block each pass ran (only when asked; images).
        mask: ``(B, T)`` boolean, True at real tokens (text); None for images. Padded
            positions of ``tokens`` and ``token_weights`` are zero.
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    token_weights: torch.Tensor
    block_inputs: dict[int, torch.Tensor]
    block_outputs: dict[int, torch.Tensor]
    attention: dict[str, torch.Tensor]
    mask: torch.Tensor | None = None


@register
class TOAST(Method):
    """Top-down attention steering: select output features, feed them back, run again."""

    name = "toast"
    in_loop = True
    modalities = ("image", "text")
    config_class = TOASTConfig
    summary = ("top-down attention steering: pass 1, feature selection, feedback into every "
               "attention's values, pass 2 (backbone in the loop, 2x FLOPs; feedback=early|late ~1.5x)")
    train_defaults = TrainConfig(optimizer="sgd", lr=0.01, weight_decay=1e-4, momentum=0.9,
                                 epochs=100, warmup_epochs=10, batch_size=32)
    grid = {"lr": [lr / 256 * 32 for lr in (1.0, 0.5, 0.25, 0.1, 0.05, 0.025, 0.01)],
            "weight_decay": [1e-2, 1e-3, 1e-4, 0.0]}

    def __init__(self, config: TOASTConfig, backbone: dict[str, Any], num_classes: int):
        super().__init__(config, backbone, num_classes)
        dim = backbone["dim"]
        self.modality = backbone_modality(backbone)
        self.pool = config.pool if config.pool != "auto" else ("mean" if self.modality == "text" else "cls")
        self._steering: list[Any] = []  # the text encoder's passes (bert.EncoderSteering), once bound
        self.plan = FeedbackPlan.make(config.feedback, backbone["depth"], config.middle)
        rank, alpha = getattr(config, "lora_rank", 0), getattr(config, "lora_alpha", 1.0)
        if isinstance(config, TOASTLiteConfig) and rank < 1:
            raise FrozenlensError(f"lora_rank={rank}: TOAST-Lite's LoRA rank must be at least 1 (paper: 4)")
        self.selection = FeatureSelection(dim)
        self.feedback = nn.ModuleDict({str(i): FeedbackLayer.linear(dim, rank, alpha) for i in self.plan.layers})
        self.head = nn.Linear(dim, num_classes)
        self.selection.channel_transform.requires_grad_(config.tune_p)
        _init_head(self.head, self.config.head_init)

    @classmethod
    def taps(cls, config: TOASTConfig, backbone: dict[str, Any]) -> list:
        """None: TOAST runs the backbone itself (in the loop)."""
        return []

    def bind(self, backbone: FrozenBackbone | TextBackbone) -> None:
        """Bind the frozen backbone; the top-down signal needs timm's standard ``Attention``
        (image) or supported value projections (text, :func:`.bert.encoder_value_sites`)."""
        if self.modality == "text":
            from frozenlens.methods.toast.bert import EncoderSteering

            steering = EncoderSteering(backbone.model)
            super().bind(backbone)
            self._steering[:] = [steering]
            return
        from timm.layers import Attention

        for index, block in enumerate(backbone.model.blocks):
            if not isinstance(getattr(block, "attn", None), Attention):
                raise FrozenlensError(
                    f"{self.name}: block {index} of {backbone.name!r} has attention "
                    f"{type(getattr(block, 'attn', None)).__name__}; the top-down value input needs "
                    "timm's Attention (a plain timm ViT such as vit_* or DINOv2)")
        super().bind(backbone)

    # -- initialisation ---------------------------------------------------------------
    def reset_trainable(self, seed: int) -> None:
        """Fresh modules from ``seed`` (xi normal, P identity, feedback truncated normal,
        head as the reference), then the pre-tuned modules when ``config.pretuned`` is set."""
        with seeded(seed):
            self.selection.reset_parameters()
            for layer in self.feedback.values():
                layer.reset_parameters()
            _init_head(self.head, self.config.head_init)
        if self.config.pretuned:
            self.load_pretuned(self.config.pretuned)

    def load_pretuned(self, folder: str) -> None:
        """Copy the feature selection and feedback maps of a pre-tuned TOAST adapter folder.

        LoRA factors and the head are not taken (they are new for every task).
        """
        from safetensors.torch import load_file

        from frozenlens.adapter import WEIGHTS_FILE, read_adapter_meta

        meta = read_adapter_meta(folder)
        if meta["method"] not in ("toast", "toast-lite"):
            raise AdapterError(f"pretuned={folder}: holds a {meta['method']!r} adapter; pass the --out "
                               "folder of `frozenlens pretune toast`")
        if meta["backbone"]["weights_hash"] != self.backbone_info["weights_hash"]:
            raise AdapterError(f"pretuned={folder} was pre-tuned on backbone {meta['backbone']['name']!r}, "
                               f"not on {self.backbone_info['name']!r}: pre-tune on this backbone")
        stored = load_file(str(Path(folder) / WEIGHTS_FILE))
        wanted = [k for k in self.state_dict() if k.startswith(("selection.", "feedback."))
                  and ".lora_" not in k]
        missing = [k for k in wanted if k not in stored]
        if missing:
            raise AdapterError(f"pretuned={folder} lacks {', '.join(missing[:4])}: it was pre-tuned with "
                               "other feedback layers; pre-tune with feedback=full, which covers every block")
        with torch.no_grad():
            own = self.state_dict()
            for key in wanted:
                own[key].copy_(stored[key])

    # -- forward --------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of pass 2 for ``batch["images"]`` (preprocessed, ``(B, 3, H, W)``) on an image
        backbone, or a tokenized batch (``input_ids``, ``attention_mask``[, ``token_type_ids``]:
        :func:`frozenlens.train.texts.text_batch`) on a text backbone."""
        return self.run(batch).logits

    def run(self, batch: dict[str, torch.Tensor], *, record_blocks: bool = False) -> TOASTPasses:
        """:meth:`passes` (images) or :meth:`text_passes` (text) of one batch, by the backbone's modality."""
        if self.modality == "text":
            return self.text_passes(batch, record_blocks=record_blocks)
        return self.passes(batch["images"], record_blocks=record_blocks)

    def passes(self, images: torch.Tensor, *, record_blocks: bool = False,
               keep_attention: bool = False) -> TOASTPasses:
        """Pass 1, feature selection, feedback and pass 2 for a batch of images."""
        kept: dict[str, list[torch.Tensor]] = {"pass1": [], "pass2": []} if keep_attention else {}
        lower, z = self._first_pass(images, kept.get("pass1"))
        signals = self.feedback_signals(self.selection(z))
        inputs: dict[int, torch.Tensor] | None = {} if record_blocks else None
        outputs: dict[int, torch.Tensor] | None = {} if record_blocks else None
        tokens = self._second_pass(lower, signals, kept.get("pass2"), inputs, outputs)
        logits = self.head(_pooled(tokens, self.frozen_backbone.num_prefix_tokens, self.pool))
        return TOASTPasses(logits, tokens, self.selection.token_weights(z), _only(inputs, signals),
                           _only(outputs, signals), {name: weights[0] for name, weights in kept.items()})

    def text_passes(self, batch: dict[str, torch.Tensor], *, record_blocks: bool = False) -> TOASTPasses:
        """Pass 1, feature selection, feedback and pass 2 for a tokenized text batch.

        Padded positions are zeroed before the feature selection (so their top-down
        signal is zero too) and in pass 2's tokens; the pooling and the variational loss
        read real tokens only, and attention never reads a padded key (the model's mask).
        """
        if not self._steering:
            raise FrozenlensError(f"{self.name}: bind the text backbone first (build_method(..., backbone=...))")
        steering, plan = self._steering[0], self.plan
        inputs = steering.inputs(batch)
        mask = inputs[MASK_KEY].bool()
        padded = ~mask.unsqueeze(-1)
        first = steering.first_pass(inputs, plan.source, plan.pass2_start)
        z = first.z.masked_fill(padded, 0)
        signals = self.feedback_signals(self.selection(z))
        block_inputs: dict[int, torch.Tensor] | None = {} if record_blocks else None
        block_outputs: dict[int, torch.Tensor] | None = {} if record_blocks else None
        tokens = steering.second_pass(inputs, signals, first, plan.pass2_start, block_inputs, block_outputs)
        tokens = tokens.masked_fill(padded, 0)
        logits = self.head(_pooled(tokens, self.frozen_backbone.num_prefix_tokens, self.pool, mask))
        return TOASTPasses(logits, tokens, self.selection.token_weights(z), block_inputs or {}, block_outputs or {},
                           {}, mask)

    @torch.no_grad()
    def _first_pass(self, images: torch.Tensor, keep: list[torch.Tensor] | None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain pass 1 up to the feedback source: ``(input of pass 2's first block, z)``.

        Nothing before the feature selection trains, so it runs without autograd.
        """
        net, plan = self.frozen_backbone, self.plan
        model = net.model
        if keep is not None:
            keeping = {f"blocks.{plan.source}.attn": value_input(None, keep)}
            model = edited_model(model, Edits(modules=keeping))
        lower = run_blocks(model, net.embed(images), stop=plan.pass2_start)
        top = run_blocks(model, lower, start=plan.pass2_start, stop=plan.source + 1)
        return lower, net.model.norm(top)

    def _second_pass(self, lower: torch.Tensor, signals: dict[int, torch.Tensor],
                     keep: list[torch.Tensor] | None, inputs: dict[int, torch.Tensor] | None,
                     outputs: dict[int, torch.Tensor] | None) -> torch.Tensor:
        """Pass 2 from ``lower`` with every block's top-down value input: final normed tokens."""
        net = self.frozen_backbone
        last = net.depth - 1
        blocks = set(signals) | ({last} if keep is not None else set())
        edits = {f"blocks.{i}.attn": value_input(signals.get(i), keep if i == last else None) for i in blocks}
        model = edited_model(net.model, Edits(modules=edits))
        x = run_blocks(model, lower, start=self.plan.pass2_start, inputs=inputs, outputs=outputs)
        return model.norm(x)

    def feedback_signals(self, selected: torch.Tensor) -> dict[int, torch.Tensor]:
        """Top-down signal of every block with a feedback layer, from the selected tokens."""
        return run_feedback(self.feedback, reversed(self.plan.layers), selected)

    def variational_loss(self, passes: TOASTPasses) -> torch.Tensor:
        """The variational loss of ``passes`` (made with ``record_blocks=True``; real tokens only)."""
        return variational_loss(self.feedback, passes.block_inputs, passes.block_outputs, passes.mask)

    # -- fitting ------------------------------------------------------------------------
    def fit(self, data: Any, cfg: TrainConfig, *, val: Any = None, progress: bool = False) -> list[float]:
        """Train from a seeded start with the shared trainer: cross-entropy, plus
        ``variational_weight`` x the variational loss when set (:func:`steering_objective`)."""
        self.reset_trainable(cfg.seed)
        return train(self, data, cfg, progress=progress, desc=self.name, objective=_objective([self]))

    @classmethod
    def fit_many(cls, models: Sequence["Method"], data: Any, cfgs: Sequence[TrainConfig], *,
                 val: Any = None, progress: bool = False) -> list[list[float]]:
        """:meth:`fit` of each model, in lockstep over one minibatch order (:func:`train_many`)."""
        for model, cfg in zip(models, cfgs):
            model.reset_trainable(cfg.seed)
        return train_many(models, data, cfgs, progress=progress, desc=cls.name, objective=_objective(models))


@register
class TOASTLite(TOAST):
    """TOAST-Lite: TOAST with frozen feedback maps adapted by rank-4 LoRA; P trains."""

    name = "toast-lite"
    config_class = TOASTLiteConfig
    summary = ("TOAST with LoRA (r=4) on the feedback maps: xi, P, LoRA factors and head train "
               "(about 1% of the backbone's parameters)")


def _init_head(linear: nn.Linear, how: str = "reference") -> None:
    """``"reference"``: Kaiming-normal (fan out) weights, bias ``-log(99)`` (prior probability
    0.01), as the reference code's head (its MLP with ``special_bias``); ``"zero"``: zeros."""
    if how == "zero":
        init_zero_head(linear)
        return
    init_kaiming_head(linear)
    nn.init.constant_(linear.bias, -math.log((1 - 0.01) / 0.01))


def _only(blocks: dict[int, torch.Tensor] | None, keep: dict[int, Any]) -> dict[int, torch.Tensor]:
    """The entries of ``blocks`` whose block index is in ``keep`` (none when not recorded)."""
    return {i: t for i, t in (blocks or {}).items() if i in keep}


def _pooled(tokens: torch.Tensor, num_prefix_tokens: int, pool: str = "cls",
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """What the head reads (``pool``, see :class:`TOASTConfig`): the class token, or the mean token
    (without a class token, or with ``pool="mean"``): over the real tokens when ``mask`` is given
    (text; padded rows of ``tokens`` must be zero), else over the tokens after the prefix."""
    if pool == "cls" and num_prefix_tokens:
        return tokens[:, 0]
    if mask is None:
        return tokens[:, num_prefix_tokens:].mean(dim=1)
    return tokens.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1).to(tokens.dtype)


def steering_objective(model: nn.Module, features: dict[str, torch.Tensor], labels: torch.Tensor,
                       label_smoothing: float) -> tuple[torch.Tensor, float]:
    """Cross-entropy of pass 2 plus ``config.variational_weight`` x the variational loss (an
    :data:`~frozenlens.train.trainer.Objective`; pass 2 runs once for both)."""
    passes = model.run(features, record_blocks=True)
    loss = F.cross_entropy(passes.logits, labels, label_smoothing=label_smoothing)
    loss = loss + model.config.variational_weight * model.variational_loss(passes)
    return loss, float(loss.detach())


def _objective(models: Sequence[Method]) -> Objective:
    """The shared trainer's cross-entropy when no model adds the variational loss, else
    :func:`steering_objective` (with weight 0 it is the cross-entropy alone)."""
    if any(m.config.variational_weight for m in models):
        return steering_objective
    return cross_entropy_objective

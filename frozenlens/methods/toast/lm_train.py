"""Instruction data and the training loop of TOAST on causal language models.

Data: a JSONL file, one ``{"instruction": ..., "response": ...}`` object a line
(an optional ``"input"`` is the Alpaca format's context). Each example becomes the
Stanford Alpaca prompt (:data:`PROMPT`, the recipe the paper trains with) followed
by the response and the end-of-sequence token; the next-token loss is taken on the
response tokens (and the end token) only.

Training (:func:`train_lm`): AdamW, linear warm-up over ``warmup_ratio`` of the
steps then cosine decay (the shared :func:`frozenlens.train.trainer.warmup_cosine`),
loss = next-token loss + ``variational_weight`` x variational loss
(:meth:`~.lm.TOASTForCausalLM.loss`). Defaults are the Stanford Alpaca recipe the
paper and the reference code use (lr 2e-5, weight decay 0, warm-up 3 %, 3 epochs),
with a small batch for one machine.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from frozenlens.errors import FrozenlensError
from frozenlens.methods.toast.lm import IGNORE_INDEX, TOASTForCausalLM
from frozenlens.train.trainer import seeded, warmup_cosine

_log = logging.getLogger("frozenlens")

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
"""The Stanford Alpaca prompts (with and without an ``input``)."""


@dataclass(frozen=True)
class Instruction:
    """One example: the prompt text and the response text; ``source`` is ``file:line``."""

    instruction: str
    response: str
    context: str = ""
    source: str = ""

    @property
    def prompt(self) -> str:
        """The Alpaca prompt of this example."""
        if self.context:
            return PROMPT_WITH_INPUT.format(instruction=self.instruction, input=self.context)
        return PROMPT.format(instruction=self.instruction)


def read_instructions(path: str | Path) -> list[Instruction]:
    """Examples of a JSONL file (blank lines skipped).

    Raises:
        FrozenlensError: naming the file and line of a line that is not a JSON object with
            string ``instruction`` and ``response`` (and optionally ``input``), or an empty file.
    """
    file = Path(path)
    if not file.is_file():
        raise FrozenlensError(f"{file}: no such file; pass a JSONL file of "
                              '{"instruction": ..., "response": ...} lines')
    examples = []
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                record = json.loads(line)
            except ValueError as err:
                raise FrozenlensError(f"{where}: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise FrozenlensError(f"{where}: expected a JSON object with instruction and response")
            for key in ("instruction", "response"):
                if not isinstance(record.get(key), str):
                    raise FrozenlensError(f"{where}: {key!r} is {'missing' if key not in record else 'not a string'}; "
                                          'each line needs {"instruction": "...", "response": "..."}')
            context = record.get("input", "")
            if not isinstance(context, str):
                raise FrozenlensError(f"{where}: 'input' must be a string (the optional Alpaca context)")
            examples.append(Instruction(record["instruction"], record["response"], context, where))
    if not examples:
        raise FrozenlensError(f"{file}: no examples (every line is blank)")
    return examples


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example and its labels (:data:`IGNORE_INDEX` on the prompt)."""

    ids: list[int]
    labels: list[int]


def encode(tokenizer: Any, example: Instruction, max_length: int) -> Encoded | None:
    """Prompt + response + end token as ids; labels only on the response part.

    The prompt and the response are tokenised apart (so the label boundary is exact)
    and the sequence is cut to ``max_length``; None when no response token survives.
    """
    prompt = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return Encoded(ids, labels)


def encode_all(tokenizer: Any, examples: Sequence[Instruction], max_length: int) -> list[Encoded]:
    """:func:`encode` of every example; examples whose prompt fills ``max_length`` are dropped (logged).

    Raises:
        FrozenlensError: no example keeps a response token.
    """
    encoded = [encode(tokenizer, e, max_length) for e in examples]
    dropped = [e.source for e, x in zip(examples, encoded) if x is None]
    if dropped:
        _log.warning("%d example(s) have no response token within max_length=%d and are skipped (first: %s)",
                     len(dropped), max_length, dropped[0])
    kept = [x for x in encoded if x is not None]
    if not kept:
        raise FrozenlensError(f"no example keeps a response token within max_length={max_length}; raise --max-length")
    return kept


def collate(batch: Sequence[Encoded], pad_id: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ``(B, T)``."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.ids)
        ids[row, :n] = torch.tensor(example.ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def batches(data: Sequence[Encoded], batch_size: int, pad_id: int, *, shuffle: bool = False,
            generator: torch.Generator | None = None, device: str | torch.device = "cpu",
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Minibatches of ``data`` (shuffled with ``generator`` when asked)."""
    order = torch.randperm(len(data), generator=generator).tolist() if shuffle else range(len(data))
    order = list(order)
    for start in range(0, len(order), batch_size):
        yield collate([data[i] for i in order[start:start + batch_size]], pad_id, device)


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's padding id (its end token when it has none, as Alpaca's recipe pads)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


@dataclass
class LMTrainConfig:
    """Optimisation of TOAST on instruction data (defaults: the Stanford Alpaca recipe, small batch).

    Attributes:
        epochs, batch_size, lr, weight_decay: AdamW settings (Alpaca: 3 epochs, lr 2e-5, wd 0;
            its batch is 128: use ``accumulate`` to reach it).
        warmup_ratio: fraction of the optimiser steps with a linear warm-up (Alpaca: 0.03).
        accumulate: minibatches per optimiser step (gradient accumulation).
        max_length: tokens per example (prompt + response), longer ones are cut.
        seed: initialisation of TOAST's modules and the minibatch order.
        device: where TOAST trains (the model's device).
    """

    epochs: int = 3
    batch_size: int = 4
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    accumulate: int = 1
    max_length: int = 512
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accumulate", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FrozenlensError(f"{name}={value!r}: use a whole number of at least 1")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise FrozenlensError(f"lr={self.lr!r}: use a finite learning rate above 0, e.g. 2e-5")
        if not 0 <= self.warmup_ratio < 1:
            raise FrozenlensError(f"warmup_ratio={self.warmup_ratio!r}: use a fraction from 0 to below 1")


def train_lm(toast: TOASTForCausalLM, data: Sequence[Encoded], pad_id: int, cfg: LMTrainConfig, *,
             progress: bool = True) -> list[float]:
    """Train TOAST's modules on encoded examples from a seeded start; returns each epoch's mean loss."""
    with seeded(cfg.seed):
        for module in (toast.selection, *toast.feedback.values()):
            module.reset_parameters()
    params = [p for p in toast.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(math.ceil(len(data) / cfg.batch_size) / cfg.accumulate)
    scheduler = warmup_cosine(optimizer, math.ceil(cfg.warmup_ratio * steps), steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    toast.train()
    losses = []
    bar = tqdm(total=cfg.epochs * math.ceil(len(data) / cfg.batch_size), desc="toast-lm", unit="batch",
               disable=None if progress else True, leave=False)
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        total, count, pending = 0.0, 0, 0
        for batch in batches(data, cfg.batch_size, pad_id, shuffle=True, generator=generator, device=cfg.device):
            loss = toast.loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
            (loss.total / cfg.accumulate).backward()
            pending += 1
            if pending == cfg.accumulate:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                pending = 0
            rows = batch["input_ids"].shape[0]
            total += float(loss.total.detach()) * rows
            count += rows
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.next_token.detach()):.3f}")
        if pending:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        losses.append(total / count)
        _log.info("toast-lm epoch %d/%d: mean loss %.4f (%.0fs)", epoch + 1, cfg.epochs, losses[-1],
                  time.perf_counter() - started)
    bar.close()
    toast.eval()
    return losses


@torch.no_grad()
def evaluate_lm(toast: TOASTForCausalLM, data: Sequence[Encoded], pad_id: int, *, batch_size: int = 4,
                device: str | torch.device = "cpu", progress: bool = False) -> dict[str, float]:
    """Mean next-token loss per response token, of TOAST and of the plain model, and their perplexities."""
    from torch.nn import functional as F

    toast.eval()
    sums = {"toast": 0.0, "plain": 0.0}
    tokens = 0
    for batch in tqdm(list(batches(data, batch_size, pad_id, device=device)), desc="evaluating", unit="batch",
                      disable=None if progress else True, leave=False):
        labels = batch["labels"][:, 1:].reshape(-1)
        plain = toast.frozen_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for name, logits in (("toast", toast(batch["input_ids"], batch["attention_mask"])), ("plain", plain)):
            shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            sums[name] += float(F.cross_entropy(shifted, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((labels != IGNORE_INDEX).sum())
    result = {"response_tokens": float(tokens)}
    for name, value in sums.items():
        result[f"{name}_loss"] = value / tokens
        result[f"{name}_perplexity"] = math.exp(min(value / tokens, 50.0))
    return result


def train_config_record(cfg: LMTrainConfig) -> dict[str, Any]:
    """``cfg`` as JSON for the adapter file."""
    return asdict(cfg)

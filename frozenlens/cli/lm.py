"""``frozenlens toast-lm``: TOAST on a frozen Hugging Face causal language model.

    frozenlens toast-lm train data.jsonl --model ./llama-folder --out runs/toast-lm   # train, save the adapter
    frozenlens toast-lm eval runs/toast-lm test.jsonl                                # response loss vs the plain model
    frozenlens toast-lm generate runs/toast-lm "Name three primary colours."          # answer an instruction

Needs the ``[text]`` extra (transformers). ``docs/methods/toast_lm.md`` has the details.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from frozenlens.cli.common import positive_int

_log = logging.getLogger("frozenlens")


def add_parsers(sub: Any) -> None:
    """Register ``toast-lm`` with its ``train``, ``eval`` and ``generate`` commands."""
    group = sub.add_parser(
        "toast-lm", help="TOAST on a causal language model (LLaMA, Mistral, GPT-2, ...): train, eval, generate",
        description="Top-down attention steering on a frozen Hugging Face causal LM: the model runs twice; "
        "the second pass's value projections read a top-down signal fed back from the first pass's output. "
        "Only TOAST's modules train, on instruction data (JSONL lines {\"instruction\": ..., \"response\": ...}, "
        "optional \"input\"), with the next-token loss on the response tokens plus the variational loss.")
    commands = group.add_subparsers(dest="lm_command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train TOAST's modules on instruction data and save the adapter")
    train.add_argument("data", help="JSONL file of {\"instruction\", \"response\"} lines")
    train.add_argument("--model", required=True,
                       help="causal LM: a local folder (offline) or a Hugging Face hub name")
    train.add_argument("--out", required=True, help="adapter folder to write (adapter.safetensors + adapter.json)")
    train.add_argument("--val", help="JSONL file to report the response loss on after training")
    train.add_argument("--epochs", type=positive_int, default=3, help="default: 3 (Stanford Alpaca recipe)")
    train.add_argument("--batch-size", type=positive_int, default=4, help="default: 4")
    train.add_argument("--accumulate", type=positive_int, default=1,
                       help="minibatches per optimiser step (Alpaca's batch 128 = --batch-size 4 --accumulate 32)")
    train.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default: 2e-5, Alpaca)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--warmup-ratio", type=float, default=0.03)
    train.add_argument("--max-length", type=positive_int, default=512, help="tokens per example (default: 512)")
    train.add_argument("--variational-weight", type=float, default=0.01,
                       help="weight of the variational loss (default: 0.01, the reference LLaMA code's)")
    train.add_argument("--lora-rank", type=int, default=0, help="TOAST-Lite: LoRA rank on the feedback maps (paper: 4)")
    train.add_argument("--freeze-p", action="store_true", help="keep the channel transform P at the identity")
    train.add_argument("--seed", type=int, default=0)
    _add_model_args(train)
    train.set_defaults(run=run_train)

    evaluate = commands.add_parser("eval", help="mean response-token loss and perplexity, TOAST vs the plain model")
    evaluate.add_argument("adapter", help="folder written by `frozenlens toast-lm train`")
    evaluate.add_argument("data", help="JSONL file of {\"instruction\", \"response\"} lines")
    evaluate.add_argument("--model", help="override the model recorded in the adapter")
    evaluate.add_argument("--batch-size", type=positive_int, default=4)
    evaluate.add_argument("--max-length", type=positive_int, default=512)
    _add_model_args(evaluate)
    evaluate.set_defaults(run=run_eval)

    generate = commands.add_parser("generate", help="answer instructions with the TOAST-steered model")
    generate.add_argument("adapter", help="folder written by `frozenlens toast-lm train`")
    generate.add_argument("instructions", nargs="+", help="instruction text(s), each wrapped in the Alpaca prompt")
    generate.add_argument("--model", help="override the model recorded in the adapter")
    generate.add_argument("--max-new-tokens", type=positive_int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0,
                          help="0: greedy (default); the paper samples at 0.7")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    _add_model_args(generate)
    generate.set_defaults(run=run_generate)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the LM's weights (TOAST's own stay float32; default: float32)")


def run_train(args: argparse.Namespace) -> int:
    """``frozenlens toast-lm train``."""
    from frozenlens.methods.toast.lm import TOASTForCausalLM, TOASTLMConfig, load_causal_lm
    from frozenlens.methods.toast.lm_train import (
        LMTrainConfig,
        encode_all,
        evaluate_lm,
        pad_id_of,
        read_instructions,
        train_config_record,
        train_lm,
    )

    cfg = LMTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                        warmup_ratio=args.warmup_ratio, accumulate=args.accumulate, max_length=args.max_length,
                        seed=args.seed, device=args.device)
    config = TOASTLMConfig(variational_weight=args.variational_weight, tune_p=not args.freeze_p,
                           lora_rank=args.lora_rank)
    examples = read_instructions(args.data)
    val_examples = read_instructions(args.val) if args.val else None
    model, tokenizer = load_causal_lm(args.model, device=args.device, dtype=args.dtype)
    toast = TOASTForCausalLM(model, config)
    data = encode_all(tokenizer, examples, cfg.max_length)
    pad = pad_id_of(tokenizer)
    trainable = sum(p.numel() for p in toast.parameters() if p.requires_grad)
    _log.info("TOAST-LM: %d examples, %d trainable parameters (%.1f%% of the model's %d)", len(data), trainable,
              100 * trainable / sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters()))
    losses = train_lm(toast, data, pad, cfg)
    extra: dict[str, Any] = {"train": {"data": str(args.data), "examples": len(data), "epoch_losses": losses,
                                       "config": train_config_record(cfg), "trainable_parameters": trainable,
                                       "dtype": args.dtype}}
    if val_examples is not None:
        extra["val"] = evaluate_lm(toast, encode_all(tokenizer, val_examples, cfg.max_length), pad,
                                   batch_size=cfg.batch_size, device=args.device)
        _log.info("validation: response loss %.4f (plain model %.4f)", extra["val"]["toast_loss"],
                  extra["val"]["plain_loss"])
    out = toast.save(args.out, model_name=args.model, extra=extra)
    print(f"TOAST-LM adapter in {out}/; try: frozenlens toast-lm generate {out} \"<instruction>\"")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """``frozenlens toast-lm eval``: prints a JSON object."""
    from frozenlens.methods.toast.lm import load_lm_adapter
    from frozenlens.methods.toast.lm_train import encode_all, evaluate_lm, pad_id_of, read_instructions

    examples = read_instructions(args.data)
    toast, tokenizer, _ = load_lm_adapter(args.adapter, model=args.model, device=args.device, dtype=args.dtype)
    data = encode_all(tokenizer, examples, args.max_length)
    result = evaluate_lm(toast, data, pad_id_of(tokenizer), batch_size=args.batch_size, device=args.device,
                         progress=True)
    print(json.dumps(result, indent=2))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    """``frozenlens toast-lm generate``: one answer per instruction."""
    import torch

    from frozenlens.methods.toast.lm import load_lm_adapter
    from frozenlens.methods.toast.lm_train import Instruction

    toast, tokenizer, _ = load_lm_adapter(args.adapter, model=args.model, device=args.device, dtype=args.dtype)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for text in args.instructions:
        prompt = Instruction(text, "").prompt
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=args.device)
        new = toast.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             eos_token_id=tokenizer.eos_token_id, generator=generator)
        print(tokenizer.decode(new[0].tolist(), skip_special_tokens=True))
    return 0

"""Results files: one JSON with everything, one Markdown table for people."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from frozenlens.atomic import write_json, write_text
from frozenlens.methods import config_to_dict
from frozenlens.protocol import MethodResult

COLUMNS = ["method", "test acc", "best val acc", "epochs", "trainable params", "train time (s)",
           "peak mem (MB)", "taps KB/img"]


def result_record(label: str, result: MethodResult, store_bytes_per_image: float) -> dict[str, Any]:
    """JSON-able summary of one method's result; ``store_bytes_per_image`` counts the taps it reads."""
    best_val = max((row["val_accuracy"] for row in result.grid), default=None)
    return {
        "label": label,
        "method": result.method,
        "config": config_to_dict(result.config),
        "train_config": result.train_config.to_dict(),
        "grid": result.grid,
        "best_val_accuracy": best_val,
        "test_accuracies": result.test_accuracies,
        "test_accuracy_mean": result.test_mean,
        "test_accuracy_std": result.test_std,
        "trainable_params": result.trainable_params,
        "train_seconds": result.train_seconds,
        "train_losses": result.train_losses,
        "peak_memory_mb": result.peak_memory_mb,
        "store_bytes_per_image": store_bytes_per_image,
    }


def _fmt_acc(record: dict[str, Any]) -> str:
    mean, std = record["test_accuracy_mean"], record["test_accuracy_std"]
    if mean is None:
        return "n/a (no test split)"
    runs = len(record["test_accuracies"])
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if runs > 1 else f"{100 * mean:.2f}"


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table (accuracies in %)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        val = "—" if r["best_val_accuracy"] is None else f"{100 * r['best_val_accuracy']:.2f}"
        cells = [r.get("spec", r["label"]), _fmt_acc(r), val, str(r["train_config"]["epochs"]),
                 f"{r['trainable_params']:,}", f"{r['train_seconds']:.1f}", f"{r['peak_memory_mb']:.0f}",
                 f"{r['store_bytes_per_image'] / 1024:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out_dir: Path, records: Sequence[dict[str, Any]], context: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir`` atomically; returns both paths.

    Raises:
        FrozenlensError: a file cannot be written (e.g. the disk is full); the
            previous results files, if any, are unchanged.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    write_json(json_path, {"context": context, "results": list(records)})
    header = [f"# frozenlens results: {context.get('task', '')}", ""]
    header += [f"- {k}: {v}" for k, v in context.items() if not isinstance(v, (dict, list))]
    note = ("Test accuracy is of models retrained on train+val with the hyper-parameters "
            "chosen on val (never on test; '—' in 'best val acc': no grid search, defaults used); "
            "mean ± std over seeds. 'taps KB/img': stored activations the method reads.")
    write_text(md_path, "\n".join(header + ["", markdown_table(records), "", note, ""]))
    return json_path, md_path

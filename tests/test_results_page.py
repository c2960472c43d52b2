"""The results page's verdicts: a claim holds only when the better method's mean is higher, the 224-px
column covers only the store claims that run has both methods for, and grid choices at a grid's edge
are flagged."""

from __future__ import annotations

from benchmarks.results_page import CLAIMS, full_runs_verdict, full_store_verdict, selections, verdict
from frozenlens.bench.report import BenchReport

VQT_OVER_HEAD2TOE = next(c for c in CLAIMS if c[2] == ("vqt", "head2toe"))
TOAST_OVER_LORA = next(c for c in CLAIMS if c[2] == ("toast", "lora"))
MIST_OVER_LINEAR = next(c for c in CLAIMS if c[2] == ("mist", "linear"))


def _report(means: dict[str, dict[str, float]], size: int = 224, grids: dict[str, list[dict]] | None = None
            ) -> BenchReport:
    tasks = sorted({t for per_task in means.values() for t in per_task})
    rows = [{"method": m, "group_mean": sum(per_task.values()) / len(per_task), "trainable_params": 10,
             "final_train_loss": 0.1, "tasks": {t: {"mean": a} for t, a in per_task.items()}}
            for m, per_task in means.items()]
    entries = []
    for m, grid in (grids or {}).items():       # as the bench records them: the best val point selected
        best = max(grid, key=lambda p: p["val_accuracy"])
        entries.append({"task": tasks[0], "method": m, "grid": grid, "best_val_accuracy": best["val_accuracy"],
                        "selected": {"train_config": {k: v for k, v in best.items() if k != "val_accuracy"},
                                     "config": {}}})
    return BenchReport({"image_size": size, "tasks": tasks}, entries, rows)


def test_a_claim_holds_only_when_the_better_method_is_ahead():
    ahead = _report({"vqt": {"a": 0.70, "b": 0.60}, "head2toe": {"a": 0.65, "b": 0.62}})
    behind = _report({"vqt": {"a": 0.60}, "head2toe": {"a": 0.65}})
    assert verdict(VQT_OVER_HEAD2TOE, {"store": ahead})[1].startswith("**holds** (+1.50 points; better on 1 of 2")
    assert verdict(VQT_OVER_HEAD2TOE, {"store": behind})[1].startswith("**does not hold** (-5.00 points")
    assert verdict(VQT_OVER_HEAD2TOE, {"store": _report({"vqt": {"a": 0.6}})})[1] == "not checked (head2toe not run)"


def test_the_224_px_column_covers_only_the_store_claims_it_ran():
    report = _report({"vqt": {"cifar10": 0.6477}, "head2toe": {"cifar10": 0.6533}, "lora": {"cifar10": 0.7}})
    text, tasks = full_store_verdict(VQT_OVER_HEAD2TOE, report)
    assert text.startswith("vqt 64.77 vs head2toe 65.33: **does not hold**") and tasks == "cifar10"
    assert full_store_verdict(TOAST_OVER_LORA, report) == ("—", "")


def test_a_224_px_verdict_from_a_run_on_fewer_tasks_names_them():
    main = _report({"vqt": {"aid": 0.8, "cifar10": 0.64}, "linear": {"aid": 0.78, "cifar10": 0.63}})
    side = _report({"mist": {"cifar10": 0.66}, "linear": {"cifar10": 0.63}})
    assert full_runs_verdict(MIST_OVER_LINEAR, [main, side]).startswith("on cifar10 only: mist 66.00 vs linear 63.00")
    assert full_runs_verdict(VQT_OVER_HEAD2TOE, [main, side]) == "—"
    assert "only" not in full_runs_verdict(next(c for c in CLAIMS if c[2] == ("vqt", "linear")), [main, side])


def test_a_method_run_on_some_tasks_is_compared_on_those_only():
    """A run where LAST has reached one task of two: its claims compare means over that task alone, while
    claims between methods that ran both tasks keep both."""
    side = _report({"mist": {"aid": 0.83, "cifar10": 0.63}, "linear": {"aid": 0.78, "cifar10": 0.64},
                    "last": {"aid": 0.80}})
    last = next(r for r in side.rows if r["method"] == "last")
    last["group_mean"] = None                                   # as the bench writes a row missing a task
    mist_over_last = next(c for c in CLAIMS if c[2] == ("mist", "last"))
    assert full_runs_verdict(mist_over_last, [side]) == (
        "on aid only: mist 83.00 vs last 80.00: **holds** (+3.00 points; better on 1 of 1 tasks)")
    assert full_runs_verdict(MIST_OVER_LINEAR, [side]) == (
        "mist 73.00 vs linear 71.00: **holds** (+2.00 points; better on 1 of 2 tasks)")


def test_a_choice_at_the_edge_of_its_grid_is_flagged():
    grid = [{"lr": lr, "weight_decay": wd, "val_accuracy": acc}
            for (lr, wd), acc in zip([(a, b) for a in (0.5, 0.1, 0.01) for b in (1e-2, 0.0)],
                                     [0.5, 0.6, 0.7, 0.65, 0.4, 0.3])]
    text = selections(_report({"vqt": {"c": 0.5}}, grids={"vqt": grid}))
    assert text == "Chosen on val200: c vqt: lr=0.1, weight_decay=0.01, val200 70.0."  # 2-value axes: no edge
    grid[0]["val_accuracy"] = 0.9
    assert "(at the edge of its grid in lr)" in selections(_report({"vqt": {"c": 0.5}}, grids={"vqt": grid}))


def test_what_a_fit_chose_for_itself_is_no_grid_edge():
    """MIST's k joins each search row (chosen on val by the fit); k = N is not the edge of a grid."""
    grid = [{"lr": lr, "gather_depth": k, "val_accuracy": acc}
            for lr, k, acc in [(3e-3, 4, 0.5), (1e-3, 12, 0.7), (3e-4, 8, 0.6)]]
    text = selections(_report({"mist": {"c": 0.5}}, grids={"mist": grid}))
    assert text == "Chosen on val200: c mist: gather_depth=12, lr=0.001, val200 70.0."

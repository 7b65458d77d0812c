"""The benchmark suites at tiny size: every row present, plots written, same seed same numbers.

These tests pin the shape of the report, never which coefficient variant wins.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import nanmerge
from nanmerge.bench import run_suite
from nanmerge.bench._data_informed import ADAMERGING, ADAMERGING_SCALE
from nanmerge.bench._digits import SCENARIOS
from nanmerge.bench._lsq import FAMILIES
from nanmerge.bench._lsq import SIZES as LSQ_SIZES
from nanmerge.bench._merging import (
    COEFFICIENTS,
    LINES,
    LINES_METHODS,
    PAIR_LABEL,
    coefficient_variants,
    merge_methods,
)
from nanmerge.bench._report import _tick_label
from nanmerge.bench._run import collect


def _run(name: str, tmp: Path, cache: str) -> dict[str, Any]:
    return run_suite(
        name, out_dir=tmp / "out", cache_dir=tmp / cache, seeds=1, size="tiny", progress=False
    )


@pytest.fixture(scope="module")
def lsq(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run("lsq", tmp_path_factory.mktemp("lsq"), "cache")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    tmp = tmp_path_factory.mktemp("digits")
    return _run("digits", tmp, "cache"), tmp


def _same(a: Any, b: Any) -> bool:
    """Equality that treats NaN cells (n/a) as equal to each other."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _keys(result: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    return {(r["problem"], r["method"], r["coefficients"], r["scale_mode"]) for r in result["rows"]}


def test_lsq_reports_every_method_coefficient_and_reference_row(lsq: dict[str, Any]) -> None:
    keys = _keys(lsq)
    methods = merge_methods(LSQ_SIZES["tiny"].tasks)
    assert {"weight_average", "task_arithmetic", "ties"} <= set(methods)
    for family in FAMILIES:
        for name in methods:
            modes = ("default", "best") if "scale" in nanmerge.METHODS[name].params else ("-",)
            for coef in coefficient_variants(name):
                for mode in modes:
                    assert (family, name, coef, mode) in keys
        assert (family, "joint optimum", "-", "-") in keys
        for coef in COEFFICIENTS:
            assert (family, "regmean (alpha 1.0)", coef, "-") in keys
        assert (family, "pretrained", "-", "-") in keys
    assert len(keys) == len(lsq["rows"])


def test_lsq_no_merge_beats_the_closed_form_joint_optimum(lsq: dict[str, Any]) -> None:
    # The optimum minimizes the joint training loss, so every ratio is >= 1 (float32 slack).
    assert all(r["loss_ratio"] >= 1 - 1e-6 for r in lsq["rows"])


def test_lsq_regmean_reproduces_the_joint_least_squares_optimum(lsq: dict[str, Any]) -> None:
    # Per-task least-squares models: RegMean's Gram solve is the joint normal equations. The
    # ratio's denominator is the pooled least-squares fit, computed without nanmerge.
    for family in ("ols", "ols_noisy"):
        (row,) = [
            r
            for r in lsq["rows"]
            if r["problem"] == family
            and r["method"].startswith("regmean")
            and r["coefficients"] == "uniform"
        ]
        assert row["loss_ratio"] == pytest.approx(1.0, rel=1e-6, abs=0)
        assert f"{family} " in lsq["markdown"].split("loss ratio − 1")[1]


def test_digits_reports_every_registered_method_per_scenario(
    digits: tuple[dict[str, Any], Path],
) -> None:
    result, _ = digits
    keys = _keys(result)
    for scenario in SCENARIOS:
        for name, spec in nanmerge.METHODS.items():
            if spec.max_models == 1:  # passthrough copies one model: no merge to score
                continue
            method = name if spec.max_models is None else f"{name} {PAIR_LABEL}"
            modes = ("default", "best") if "scale" in spec.params else ("-",)
            for coef in coefficient_variants(name):
                for mode in modes:
                    assert (scenario, method, coef, mode) in keys
        assert (scenario, "pretrained", "-", "-") in keys
        assert (scenario, "fine-tuned (individual)", "-", "-") in keys
    assert all(0.0 <= r["avg_acc"] <= 1.0 for r in result["rows"])


def test_digits_reports_lines_rows_with_beta_chosen_on_validation(
    digits: tuple[dict[str, Any], Path],
) -> None:
    result, _ = digits
    keys = _keys(result)
    for scenario in SCENARIOS:
        for method in LINES_METHODS:
            for coef in COEFFICIENTS:
                assert (scenario, method + LINES, coef, "best") in keys
    chosen = {r["scale"] for r in result["rows"] if r["method"].endswith(LINES)}
    assert chosen == {0.5}  # the tiny size's one-point beta grid


def test_digits_reports_adamerging_rows_per_scenario(
    digits: tuple[dict[str, Any], Path],
) -> None:
    keys = _keys(digits[0])
    for scenario in SCENARIOS:
        for (granularity, _), label in ADAMERGING.items():
            method = f"adamerging {granularity}-wise (task_arithmetic, scale {ADAMERGING_SCALE})"
            assert (scenario, method, label, "-") in keys


def test_digits_writes_report_and_plots(digits: tuple[dict[str, Any], Path]) -> None:
    result, _ = digits
    text = Path(result["report"]).read_text(encoding="utf-8")
    for scenario in SCENARIOS:
        assert scenario in text
    for path in result["plots"].values():
        assert Path(path).stat().st_size > 1000


def test_digits_equal_data_control_has_equal_oracle_weights(
    digits: tuple[dict[str, Any], Path],
) -> None:
    result, _ = digits
    control = next(i for i in result["infos"] if i["problem"] == "c_equal_data")
    assert control["coefficients"]["oracle n_i"] == [1.0] * len(control["names"])
    assert math.isnan(control["spearman_theta"])


def _collect(tmp: Path, cache: str) -> dict[str, Any]:
    """The raw rows of a rerun, without redrawing the plots (the slow part at tiny size)."""
    return collect("digits", cache_dir=tmp / cache, seeds=1, size="tiny", progress=False)


def test_digits_same_seed_gives_same_numbers_without_the_cache(
    digits: tuple[dict[str, Any], Path],
) -> None:
    first, tmp = digits
    second = _collect(tmp, "fresh-cache")
    assert _same(first["rows"], second["rows"])
    assert _same(first["infos"], second["infos"])


def test_second_run_reuses_cached_checkpoints(digits: tuple[dict[str, Any], Path]) -> None:
    first, tmp = digits
    cached = sorted((tmp / "cache").rglob("*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = _collect(tmp, "cache")
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert _same(again["rows"], first["rows"])


def test_plot_labels_mark_only_two_model_methods_as_two_tasks() -> None:
    assert _tick_label(f"slerp {PAIR_LABEL}") == "slerp (2 tasks)"
    adamerging = f"adamerging task-wise (task_arithmetic, scale {ADAMERGING_SCALE})"
    assert _tick_label(adamerging) == "adamerging task-wise"
    assert _tick_label("ties (best scale on val)") == "ties"
    assert _tick_label("regmean") == "regmean"


def test_unknown_suite_and_size_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown suite"):
        run_suite("nope", out_dir=tmp_path, cache_dir=tmp_path, seeds=1)
    with pytest.raises(ValueError, match="unknown size"):
        run_suite("lsq", out_dir=tmp_path, cache_dir=tmp_path, seeds=1, size="huge")

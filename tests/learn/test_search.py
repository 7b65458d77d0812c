"""`nanmerge search` on a local Ray with 2 CPUs: sweeps, CMA-ES, resuming, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import nanmerge
from nanmerge.bench._search_suites import lsq
from nanmerge.cli import main
from nanmerge.learn._search import search
from tests.conftest import Family, build_family

pytestmark = pytest.mark.usefixtures("local_ray")  # one local Ray per module (conftest)

NAN_TAU = {"estimator": "nan", "norm_of": "task_vector"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return build_family(tmp_path_factory.mktemp("search") / "inputs")


def _objective_file(folder: Path, body: str) -> str:
    """A `file.py:objective` the trials load; it sees the merged state dict."""
    path = folder / "objective.py"
    path.write_text(f"import os, signal\nfrom pathlib import Path\n\n\n{body}")
    return f"{path}:objective"


def _function_spec(models: Family, function: str, **extra: Any) -> dict[str, Any]:
    return {
        "recipe": {
            "base": str(models.base),
            "models": [str(p) for p in models.models],
            "method": "task_arithmetic",
        },
        "space": {"parameters": {"scale": {"uniform": [0.1, 1.0]}}},
        "objective": {"function": function, "metrics": {"score": "min"}},
        **extra,
    }


def test_a_grid_finds_the_best_of_a_plain_loop_over_the_same_grid(tmp_path: Path) -> None:
    scales = [0.1, 0.3, 0.6, 1.0]
    estimators: list[Any] = ["uniform", NAN_TAU]
    spec = {
        "recipe": {"method": "task_arithmetic"},
        "space": {"parameters": {"scale": scales}, "coefficients": estimators},
        "objective": {"suite": "lsq", "options": {"size": "tiny"}},
        "strategy": "grid",
    }
    result = search(spec, out=tmp_path / "out", cache=tmp_path / "cache")

    suite = lsq(cache=tmp_path / "cache", size="tiny")
    loop = {
        (scale, json.dumps(coef)): suite.score(
            nanmerge.merge(
                {
                    **suite.models,
                    "method": "task_arithmetic",
                    "parameters": {"scale": scale},
                    "coefficients": coef,
                }
            )
        )["val_loss"]
        for scale in scales
        for coef in estimators
    }
    best = result.table.best()
    assert best is not None and result.complete and len(result.table.rows) == len(loop)
    found = (best["recipe"]["parameters"]["scale"], json.dumps(best["recipe"]["coefficients"]))
    assert found == min(loop, key=loop.__getitem__)
    assert best["metrics"]["val_loss"] == pytest.approx(min(loop.values()), rel=1e-12)
    # every trial's recipe reruns alone to the same score
    for row in result.table.rows:
        rerun = suite.score(nanmerge.merge(row["recipe"]))["val_loss"]
        assert rerun == pytest.approx(row["metrics"]["val_loss"], rel=1e-12)
    written = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    assert written["parameters"] == best["recipe"]["parameters"]
    assert written["output"].endswith(f"trial_{best['trial']:04d}")
    assert {"results.csv", "results.json", "search.png"} <= {p.name for p in result.files}


def test_cmaes_improves_on_its_first_generation(tmp_path: Path) -> None:
    """Four per-model coefficients, generations of 5: the fourth generation's mean loss beats
    the first's (a sampler that does not learn would only match it), and so does its best."""
    spec = {
        "recipe": {"method": "task_arithmetic", "parameters": {"scale": 1.0}},
        "space": {"model_coefficients": {"uniform": [0.0, 1.0]}},
        "objective": {"suite": "lsq", "options": {"size": "tiny", "family": "ols"}},
        "strategy": "cmaes",
        "budget": {"trials": 20},
        "population": 5,
        "workers": 1,  # generations in trial order, so the run is the same every time
    }
    result = search(spec, out=tmp_path / "out", cache=tmp_path / "cache")
    losses = [r["metrics"]["val_loss"] for r in result.table.rows]
    assert len(losses) == 20 and result.table.count("finished") == 20
    assert np.mean(losses[15:]) < np.mean(losses[:5])
    assert min(losses[5:]) < min(losses[:5])


def test_layer_coefficients_search_one_schedule_over_depth_per_model(tmp_path: Path) -> None:
    """Three blocks and three knots: block l takes knot l of each model exactly (t = l / 2),
    so each trial's merge is base + sum_i knot[i][l] * tau_i, written out here again."""
    shapes = {f"model.layers.{layer}.mlp.weight": (3, 2) for layer in range(3)}
    family = build_family(tmp_path / "inputs", m=2, shapes={**shapes, "lm_head.weight": (2, 3)})
    body = (
        "def objective(state):\n"
        f"    return {{'score': float(sum(state[k].square().sum() for k in {sorted(shapes)!r}))}}\n"
    )
    spec = {
        "recipe": {
            "base": str(family.base),
            "models": [str(p) for p in family.models],
            "method": "task_arithmetic",
            "parameters": {"scale": 1.0},
        },
        "space": {"layer_coefficients": {"knots": 3, "uniform": [0.0, 1.0]}},
        "objective": {"function": _objective_file(tmp_path, body), "metrics": {"score": "min"}},
        "strategy": "random",
        "budget": {"trials": 3},
    }
    result = search(spec, out=tmp_path / "out")
    assert result.table.count("finished") == 3
    for row in result.table.rows:
        recipe = row["recipe"]
        assert recipe["coefficients"] == "manual"
        knots = [m["coefficient"]["schedule"] for m in recipe["models"]]
        assert len(knots) == 2 and all(len(k) == 3 and 0 <= min(k) <= max(k) <= 1 for k in knots)
        score = sum(
            float(
                (
                    family.base_tensors[name]
                    + sum(
                        knots[i][layer]
                        * (family.model_tensors[i][name] - family.base_tensors[name])
                        for i in range(2)
                    )
                )
                .square()
                .sum()
            )
            for layer, name in enumerate(sorted(shapes))
        )
        assert row["metrics"]["score"] == pytest.approx(score, rel=1e-5)
    best = result.table.best()
    assert best is not None
    written = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    written.pop("output")
    rerun = nanmerge.merge(written)
    again = float(sum(rerun[k].square().sum() for k in shapes))
    assert again == pytest.approx(best["metrics"]["score"], rel=1e-6)


def test_a_killed_search_resumes_without_redoing_finished_trials(
    tmp_path: Path, models: Family
) -> None:
    """The third trial interrupts the driver as Ctrl+C would (SIGUSR1, which Tune handles
    the same way); the resumed search runs only what had not finished."""
    log = tmp_path / "calls.txt"
    body = (
        "def objective(state):\n"
        "    value = float(state['layer.weight'].sum())\n"
        f"    log = Path({str(log)!r})\n"
        "    with log.open('a') as f:\n"
        "        f.write(repr(value) + '\\n')\n"
        "    if len(log.read_text().splitlines()) == 3:\n"
        f"        os.kill({os.getpid()}, signal.SIGUSR1)\n"
        "    return {'score': value}\n"
    )
    spec = _function_spec(
        models,
        _objective_file(tmp_path, body),
        strategy="random",
        budget={"trials": 6},
        workers=1,
    )
    first = search(spec, out=tmp_path / "out")
    assert not first.complete
    done = [r["metrics"]["score"] for r in first.table.rows if r["status"] == "finished"]
    assert 1 <= len(done) < 6

    second = search(spec, out=tmp_path / "out", resume=True)
    assert second.complete and second.table.count("finished") == 6
    calls = [float(v) for v in log.read_text().split()]
    assert all(calls.count(v) == 1 for v in done), (done, calls)
    assert len(calls) <= 7  # six trials, and at most the one cut short run again


def test_a_failing_objective_fails_its_trial_and_the_search_goes_on(
    tmp_path: Path, models: Family
) -> None:
    flag = tmp_path / "failed_once"
    body = (
        "def objective(state):\n"
        f"    flag = Path({str(flag)!r})\n"
        "    if not flag.exists():\n"
        "        flag.touch()\n"
        "        raise ValueError('the evaluator broke on this model')\n"
        "    return {'score': float(state['layer.weight'].sum())}\n"
    )
    spec = _function_spec(models, _objective_file(tmp_path, body), strategy="grid", workers=1)
    spec["space"] = {"parameters": {"scale": [0.2, 0.4, 0.6]}}
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["search", _write(tmp_path, spec), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 trial(s)" in result.output and "2 finished, 1 failed" in result.output
    summary = json.loads((out / "results.json").read_text())
    failed = [r for r in summary["rows"] if r["status"] == "failed"]
    assert summary["failed"] == 1 and len(failed) == 1
    assert "ValueError: the evaluator broke on this model" in failed[0]["error"]
    assert "objective.py" in failed[0]["error"]  # the worker's traceback, not just the message
    assert summary["best"] is not None and summary["best"] != failed[0]["trial"]


def _write(folder: Path, spec: dict[str, Any]) -> str:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"method": ["task_arithmetic", "tie"]}, "unknown merge method 'tie' (did you mean"),
        ({"parameters": {"density": {"uniform": [0.5, 1.5]}}, "method": ["ties"]}, "density"),
        ({"parameters": {"densty": [0.5]}, "method": ["ties"]}, "'densty': no method searched"),
        ({"coefficients": ["uniform", "nann"]}, "nann"),
        (  # the family's tensors (layer.weight, head.weight) sit in no numbered block
            {"layer_coefficients": {"knots": 2, "uniform": [0.0, 1.0], "points": 2}},
            "no tensor is in a numbered block",
        ),
    ],
)
def test_a_bad_space_is_refused_before_any_trial(
    tmp_path: Path, models: Family, space: dict[str, Any], expected: str
) -> None:
    spec = _function_spec(models, f"{tmp_path}/never.py:objective", strategy="grid")
    spec["space"] = space
    (tmp_path / "never.py").write_text("def objective(state):\n    raise AssertionError\n")
    with pytest.raises(nanmerge.MergeError, match="search space is refused") as caught:
        search(spec, out=tmp_path / "out")
    assert expected in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"space": {"parameters": {"scale": {"loguniform": [-1, 1]}}}}, "must be positive"),
        ({"space": {"parameters": {"scale": {"uniform": [1, 0.5]}}}}, "lo < hi"),
        ({"space": {"parameters": {"scale": {"uniform": [0, 1]}}}}, "a grid needs `points`"),
        ({"strategy": "random"}, "needs budget.trials or budget.minutes"),
        ({"spaec": {}}, "unknown field (did you mean 'space'?)"),
        ({"space": {"layer_coefficients": {"knots": 1, "uniform": [0, 1]}}}, "knots is 1"),
        (
            {
                "space": {
                    "layer_coefficients": {"knots": 2, "uniform": [0, 1], "points": 2},
                    "model_coefficients": [0.5, 1.0],
                }
            },
            "search one of the two",
        ),
    ],
)
def test_a_bad_spec_is_refused_in_words(
    tmp_path: Path, models: Family, change: dict[str, Any], expected: str
) -> None:
    (tmp_path / "never.py").write_text("def objective(state):\n    raise AssertionError\n")
    spec = {**_function_spec(models, f"{tmp_path}/never.py:objective", strategy="grid"), **change}
    with pytest.raises(nanmerge.MergeError) as caught:
        search(spec, out=tmp_path / "out")
    assert expected in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_an_unreachable_address_fails_in_one_line_at_once(tmp_path: Path, models: Family) -> None:
    spec = _function_spec(models, "math:fabs", strategy="grid")
    spec["space"] = {"parameters": {"scale": [0.5]}}
    start = time.perf_counter()
    result = CliRunner().invoke(
        main,
        ["search", _write(tmp_path, spec), "--address", "127.0.0.1:9", "--out", str(tmp_path)],
    )
    assert time.perf_counter() - start < 15
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cannot reach a Ray cluster at 127.0.0.1:9" in lines[0]


PROBE = """
import json, sys
from click.testing import CliRunner
sys.modules["ray"] = None  # as if Ray were not installed
from nanmerge.cli import main

help = CliRunner().invoke(main, ["search", "--help"])
loaded = sorted(m for m in ("torch", "ray.tune") if m in sys.modules)
run = CliRunner().invoke(main, ["search", sys.argv[1]])
print(json.dumps({"help": help.exit_code, "loaded": loaded, "code": run.exit_code,
                  "output": run.output}))
"""


def test_search_without_ray_says_so_in_one_line_and_help_loads_nothing(tmp_path: Path) -> None:
    spec = {"recipe": {}, "space": {}, "objective": {"suite": "lsq"}, "strategy": "grid"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, _write(tmp_path, spec)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout)
    assert result["help"] == 0 and result["loaded"] == []
    assert result["code"] == 2
    assert result["output"].strip() == (
        "error: nanmerge search needs ray, which is not installed: pip install 'nanmerge[ray]'"
    )

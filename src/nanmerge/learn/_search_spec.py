"""The search spec: a base recipe, the space searched around it, the objective and the budget.

Plain pydantic models like the recipe's (unknown keys rejected), so a misspelt key fails before
Ray starts. What a trial merges is `trial_recipe(spec, config)`: the base recipe with the
sampled choices written in, a recipe any trial can be rerun from on its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nanmerge._params import did_you_mean
from nanmerge._types import MergeError
from nanmerge._yaml import read_yaml

RANGES = ("uniform", "loguniform", "integer")
# Keys of a trial's config (what Ray Tune samples): choices are sampled as indices, so a
# choice may be any recipe value (an estimator mapping) and every searcher can sample it.
METHOD, COEFFICIENTS, PARAM, MODEL = "method", "coefficients", "param:", "model:"
LAYER = "layer:"  # `layer:i:k`: knot k of model i's coefficient schedule over depth


class Dimension(BaseModel):
    """One searched value: `choice: [...]` (or a bare list), or a range `uniform: [lo, hi]`,
    `loguniform: [lo, hi]`, `integer: [lo, hi]` (inclusive); a grid takes `points` from a range."""

    model_config = ConfigDict(extra="forbid")

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = None
    points: int | None = Field(None, ge=2, description="grid points over a range")

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, data: Any) -> Any:
        return {"choice": data} if isinstance(data, list) else data

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        kinds = [k for k in ("choice", *RANGES) if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                f"give exactly one of choice, {', '.join(RANGES)} (got {kinds or 'none'})"
            )
        if self.range is not None:
            lo, hi = self.range
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"{kinds[0]} range [{lo}, {hi}] must be finite with lo < hi")
            if self.loguniform is not None and lo <= 0:
                raise ValueError(f"loguniform range [{lo}, {hi}] must be positive")
        elif self.points is not None:
            raise ValueError("`points` applies to a range, not to a choice")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", *RANGES) if getattr(self, k) is not None)

    @property
    def range(self) -> tuple[float, float] | None:
        return self.uniform or self.loguniform or self.integer

    def grid(self) -> list[Any]:
        """The values a grid search visits: the choices, or `points` spaced over the range."""
        if self.choice is not None:
            return list(range(len(self.choice)))  # indices, decoded by `value`
        if self.points is None or self.range is None:
            raise MergeError(f"a grid needs `points` for a {self.kind} range")
        lo, hi = self.range
        if self.integer is not None:
            return sorted({round(v) for v in np.linspace(lo, hi, self.points)})
        spaced = np.geomspace if self.loguniform is not None else np.linspace
        return [float(v) for v in spaced(lo, hi, self.points)]

    def ends(self) -> list[Any]:
        """The config entries checked before any trial: every choice's index, or both ends."""
        return list(range(len(self.choice))) if self.choice is not None else list(self.range or ())

    def value(self, sampled: Any) -> Any:
        """The recipe value of a sampled config entry."""
        if self.choice is not None:
            return self.choice[int(sampled)]
        return int(sampled) if self.integer is not None else float(sampled)


class Knots(Dimension):
    """A range (or choice) drawn `knots` times per model: that model's coefficient schedule
    over depth, `{schedule: [v0, ..., v(knots-1)]}`, first at layer 0 and last at the last."""

    knots: int = Field(description="values per model, spaced evenly over depth")

    @model_validator(mode="after")
    def _two_knots(self) -> Knots:
        if self.knots < 2:
            raise ValueError(
                f"knots is {self.knots}: a schedule over depth needs at least 2 (a first and a "
                "last layer); for one value per model use model_coefficients"
            )
        return self


class Space(BaseModel):
    """What varies between trials; anything not named here is the base recipe's."""

    model_config = ConfigDict(extra="forbid")

    method: Dimension | None = Field(None, description="a choice of merge methods")
    parameters: dict[str, Dimension] = Field(default_factory=dict)
    coefficients: Dimension | None = Field(
        None, description="a choice of estimators, each a name or a mapping with options"
    )
    model_coefficients: Dimension | None = Field(
        None, description="one coefficient per model, each drawn from this (estimator manual)"
    )
    layer_coefficients: Knots | None = Field(
        None, description="per model, a schedule over depth of `knots` values (estimator manual)"
    )

    @model_validator(mode="after")
    def _choices(self) -> Space:
        for name in ("method", "coefficients"):
            dim = getattr(self, name)
            if dim is not None and dim.choice is None:
                raise ValueError(f"{name} must be a choice (a list), not a {dim.kind} range")
        for name in ("model_coefficients", "layer_coefficients"):
            if getattr(self, name) is not None and self.coefficients is not None:
                raise ValueError(
                    f"{name} are read by the manual estimator; drop `coefficients` "
                    "from the space, or search one of the two"
                )
        if self.model_coefficients is not None and self.layer_coefficients is not None:
            raise ValueError(
                "model_coefficients and layer_coefficients both set each model's coefficient; "
                "search one of the two (a schedule with equal knots is one value per model)"
            )
        return self


class Objective(BaseModel):
    """A bundled suite (lsq, digits) or a user function `module:function` / `file.py:function`
    that takes the merged model (state dict, or folder) and returns a dict of metrics."""

    model_config = ConfigDict(extra="forbid")

    suite: Literal["lsq", "digits"] | None = None
    function: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="the suite's settings")
    input: Literal["state_dict", "folder"] = Field(
        "state_dict", description="what the function receives: the merged tensors, or a folder"
    )
    metrics: dict[str, Literal["min", "max"]] = Field(
        default_factory=dict, description="metric -> min | max; the first is the searched one"
    )

    @model_validator(mode="after")
    def _one_source(self) -> Objective:
        if (self.suite is None) == (self.function is None):
            raise ValueError("give exactly one of `suite` (lsq, digits) or `function`")
        if self.function is not None:
            if ":" not in self.function:
                raise ValueError(f"function {self.function!r}: write module:function")
            if not self.metrics:
                raise ValueError("a function objective needs `metrics: {name: min | max}`")
            if self.options:
                raise ValueError("`options` are a suite's settings; a function takes none")
        return self


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trials: int | None = Field(None, ge=1)
    minutes: float | None = Field(None, gt=0)


class SearchSpec(BaseModel):
    """`nanmerge search SPEC.yaml`: the file's schema."""

    model_config = ConfigDict(extra="forbid")

    recipe: dict[str, Any] = Field(description="the base recipe; a suite supplies base and models")
    space: Space
    objective: Objective
    strategy: Literal["grid", "random", "cmaes"] = "random"
    budget: Budget = Field(default_factory=lambda: Budget(trials=None, minutes=None))
    seed: int = Field(0, description="the searcher's seed (merges use the recipe's `seed`)")
    workers: int | None = Field(None, ge=1, description="trials at once (default: one per CPU)")
    population: int | None = Field(
        None, ge=2, description="cmaes: trials per generation (default 4 + 3 ln(dimensions))"
    )

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpec:
        if "output" in self.recipe:
            raise ValueError("recipe: trials merge in memory; drop `output`")
        if self.objective.suite is not None and {"base", "models"} & set(self.recipe):
            raise ValueError("recipe: the suite supplies `base` and `models`; drop them")
        if self.strategy != "grid" and self.budget.trials is None and self.budget.minutes is None:
            raise ValueError(f"strategy {self.strategy} needs budget.trials or budget.minutes")
        if self.population is not None and self.strategy != "cmaes":
            raise ValueError("`population` is the size of a cmaes generation; drop it")
        if self.strategy == "cmaes" and len(self.objective.metrics) > 1:
            raise ValueError(
                "cmaes searches one metric; use grid or random for a Pareto front of several"
            )
        return self

    def dimensions(self, models: int) -> dict[str, Dimension]:
        """Every searched dimension by its config key (one per model for model_coefficients,
        `knots` per model for layer_coefficients)."""
        dims: dict[str, Dimension] = {}
        if self.space.method is not None:
            dims[METHOD] = self.space.method
        dims.update({PARAM + k: v for k, v in self.space.parameters.items()})
        if self.space.coefficients is not None:
            dims[COEFFICIENTS] = self.space.coefficients
        if self.space.model_coefficients is not None:
            dims.update({f"{MODEL}{i}": self.space.model_coefficients for i in range(models)})
        layered = self.space.layer_coefficients
        if layered is not None:
            keys = [f"{LAYER}{i}:{k}" for i in range(models) for k in range(layered.knots)]
            dims.update(dict.fromkeys(keys, layered))
        return dims


@dataclass(frozen=True)
class Suite:
    """A bundled objective: the models it merges (`base`, `models` recipe entries) and its score."""

    models: dict[str, Any]
    score: Callable[[Mapping[str, Any]], dict[str, float]]
    metrics: dict[str, Literal["min", "max"]]


def load_spec(source: SearchSpec | Mapping[str, Any] | str | os.PathLike[str]) -> SearchSpec:
    """A SearchSpec from an object, a mapping or a YAML file; every error at once."""
    if isinstance(source, SearchSpec):
        return source
    where = "search spec"
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise MergeError(f"search spec not found: {path}")
        source, where = read_yaml(path), str(path)
        if not isinstance(source, Mapping):
            raise MergeError(f"{where} must be a YAML mapping with recipe, space and objective")
    try:
        return SearchSpec.model_validate(dict(source))
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
        raise MergeError(f"{where} has {exc.error_count()} error(s):\n{lines}") from None


def _describe(error: Any) -> str:
    loc = error["loc"]
    where = ".".join(str(p) for p in loc) or "spec"
    if error["type"] == "extra_forbidden":
        owners: dict[Any, type[BaseModel]] = {
            "space": Space,
            "objective": Objective,
            "budget": Budget,
        }
        owner = owners.get(loc[0], SearchSpec)
        if loc[0] == "space" and len(loc) > 2:
            owner = Knots if loc[1] == "layer_coefficients" else Dimension
        return f"{where}: unknown field{did_you_mean(str(loc[-1]), owner.model_fields)}"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


def trial_recipe(
    spec: SearchSpec,
    config: Mapping[str, Any],
    models: Mapping[str, Any],
    accepts: Callable[[str], frozenset[str]],
) -> dict[str, Any]:
    """The recipe one trial merges: the base recipe, the suite's models, the sampled values.

    `accepts(method)` names the method's parameters: a searched parameter the trial's method
    does not take (density, for task_arithmetic) is left out of that trial's recipe.
    """
    recipe = {**spec.recipe, **models}
    dims = spec.dimensions(len(recipe.get("models", [])))
    if METHOD in config:
        recipe["method"] = dims[METHOD].value(config[METHOD])
    taken = accepts(str(recipe.get("method")))
    params = {**recipe.get("parameters", {})}
    for key, dim in dims.items():
        if key.startswith(PARAM) and key in config:
            params[key.removeprefix(PARAM)] = dim.value(config[key])
    recipe["parameters"] = {k: v for k, v in params.items() if k in taken}
    if COEFFICIENTS in config:
        recipe["coefficients"] = dims[COEFFICIENTS].value(config[COEFFICIENTS])
    layered = spec.space.layer_coefficients
    if spec.space.model_coefficients is not None or layered is not None:
        entries = [e if isinstance(e, Mapping) else {"path": e} for e in recipe["models"]]
        recipe["models"] = [
            {**entry, "coefficient": _coefficient(dims, config, i, layered)}
            for i, entry in enumerate(entries)
        ]
        recipe["coefficients"] = "manual"
    return recipe


def _coefficient(
    dims: Mapping[str, Dimension], config: Mapping[str, Any], i: int, layered: Knots | None
) -> Any:
    """Model i's sampled coefficient: one value, or its knots as a schedule over depth."""
    if layered is None:
        return dims[f"{MODEL}{i}"].value(config[f"{MODEL}{i}"])
    keys = [f"{LAYER}{i}:{k}" for k in range(layered.knots)]
    return {"schedule": [dims[key].value(config[key]) for key in keys]}

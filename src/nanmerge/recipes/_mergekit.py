"""mergekit recipes: translate mergekit's YAML schema into a nanmerge recipe, or say what cannot be.

One pure function, `from_mergekit`, maps the methods both tools share onto nanmerge's
methods with mergekit's own defaults made explicit (mergekit's density defaults to 1.0, its
`lambda` to 1.0, `normalize` depends on the method), so a translated recipe computes what
mergekit computes. Its sparsifying methods run with `conventions: mergekit` (mergekit's keep
counts, tie order, sign election and divisors) and its `rescale` flag (`l1` or `none`);
nanmerge's own recipes keep nanmerge's conventions. Everything it cannot express is
collected and reported in one error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nanmerge._schedule import varies
from nanmerge._types import MergeError
from nanmerge.recipes._mergekit_output import FIELDS, output_fields
from nanmerge.recipes._mergekit_values import (
    check_epsilon,
    falls_back,
    model_path,
    numeric,
    parameters,
    scalar,
    slice_sources,
    spread,
)


@dataclass(frozen=True)
class _Method:
    """How one mergekit method maps: nanmerge name, mergekit defaults, which knobs it has."""

    name: str
    task_vectors: bool  # base + combine(tau): the base model's own entry is skipped
    normalize: bool | None  # mergekit's default; None: no such parameter
    rescale: bool | None
    consensus: bool = False
    density: bool = False
    gamma: bool = False
    # base_model beyond task vectors: "listed" merges it only where `models` lists it;
    # "origin" (optional) and "required" skip its entry; "point" merges it as one more model
    base: str = "listed"
    epsilon: bool = False  # DELLA's per-model epsilon
    knobs: tuple[str, ...] = ()  # mergekit parameters nanmerge takes under the same name
    weighted: bool = True  # takes mergekit's per-model `weight` (as coefficients)
    # runs with `conventions: mergekit` (its keep counts, tie order, sign election, divisors)
    conventions: bool = False
    defaults: tuple[tuple[str, Any], ...] = ()  # mergekit's where nanmerge's default differs


def _own(name: str, base: str, *knobs: str, weighted: bool = False, **more: Any) -> _Method:
    """A method with its own parameters, which nanmerge takes under mergekit's names."""
    return _Method(name, False, None, None, base=base, knobs=knobs, weighted=weighted, **more)


def _sparsified(
    name: str,
    normalize: bool,
    rescale: bool,
    *,
    consensus: bool = False,
    gamma: bool = False,
    epsilon: bool = False,
) -> _Method:
    """A task-vector method that sparsifies (mergekit's defaults for normalize and rescale),
    run with mergekit's conventions."""
    return _Method(
        name,
        True,
        normalize,
        rescale,
        consensus,
        density=True,
        gamma=gamma,
        epsilon=epsilon,
        conventions=True,
    )


SHARED: dict[str, _Method] = {
    "linear": _Method("weight_average", False, normalize=True, rescale=None),
    "task_arithmetic": _Method("task_arithmetic", True, normalize=False, rescale=False),
    "ties": _sparsified("ties", True, False, consensus=True),
    "dare_linear": _sparsified("dare_linear", False, True),
    "dare_ties": _sparsified("dare_ties", False, True, consensus=True),
    "breadcrumbs": _sparsified("breadcrumbs", False, False, gamma=True),
    "breadcrumbs_ties": _sparsified("breadcrumbs_ties", False, False, consensus=True, gamma=True),
    "della": _sparsified("della", True, True, consensus=True, epsilon=True),
    "della_linear": _sparsified("della_linear", False, True, epsilon=True),
    "sce": _own(
        "sce", "required", "select_topk", conventions=True, defaults=(("select_topk", 1.0),)
    ),
    "slerp": _Method("slerp", False, normalize=None, rescale=None),
    "passthrough": _Method("passthrough", False, normalize=None, rescale=None),
    "multislerp": _own("multislerp", "origin", "normalize_weights", "eps", weighted=True),
    "nuslerp": _own("nuslerp", "origin", "nuslerp_flatten", "nuslerp_row_wise", weighted=True),
    "karcher": _own("karcher", "point", "max_iter", "tol"),
    # mergekit averages the pairs' cosines (nanmerge's `angle` may default otherwise)
    "model_stock": _own(
        "model_stock", "required", "filter_wise", defaults=(("angle", "mean_cosine"),)
    ),
    "nearswap": _own("nearswap", "required", "t"),
    "arcee_fusion": _own("arcee_fusion", "required"),
}
UNSUPPORTED_FIELDS = {"modules": "modules (per-module sub-merges)"}
_MERGEKIT_FIELDS = {"merge_method", "base_model", "models", "slices", "parameters", *FIELDS}
_OURS_REPLACED = {"base": "base_model", "method": "merge_method"}
_NUMBERS = {"weight", "density", "gamma", "epsilon", "lambda", "t", "select_topk"}
INT8_MASK_NOTE = (
    "int8_mask: mergekit keeps its sign masks as int8 to save memory; nanmerge's masks do "
    "not change its float32 math, so the setting changes nothing"
)


def from_mergekit(data: Mapping[str, Any], *, where: str = "recipe") -> dict[str, Any]:
    """The nanmerge recipe (a dict for `Recipe`) that does what mergekit recipe `data` does.

    Keys that are nanmerge recipe fields (`coefficients`, `output`, `seed`, ...) pass through,
    so `coefficients: nan` works in a mergekit recipe. Raises one MergeError that lists every
    feature nanmerge cannot reproduce.
    """
    problems: list[str] = []
    merge_method = data.get("merge_method")
    spec = SHARED.get(merge_method) if isinstance(merge_method, str) else None
    if spec is None:
        problems.append(
            f"merge_method '{merge_method}' (shared with nanmerge: {', '.join(SHARED)})"
        )
    problems += [text for key, text in UNSUPPORTED_FIELDS.items() if data.get(key) is not None]
    problems += [
        f"`{ours}` next to mergekit's `{theirs}` (write one schema)"
        for ours, theirs in _OURS_REPLACED.items()
        if ours in data
    ]
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        problems.append(f"base_model {base!r} (only a path or repo id string is supported)")
    mergekit_only = _MERGEKIT_FIELDS | set(UNSUPPORTED_FIELDS) | set(_OURS_REPLACED)
    extras = {k: v for k, v in data.items() if k not in mergekit_only}

    glob: dict[str, Any] = {}
    for key, value in parameters(data.get("parameters"), "parameters", problems).items():
        glob[key] = scalar(value, f"'{key}'", problems)
    entries: list[tuple[Any, dict[str, Any]]] = []
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        if data.get("slices") is None:
            problems.append("no `models` list (mergekit's models: [{model: PATH}, ...])")
        raw_models = []
    for i, entry in enumerate(raw_models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            problems.append(f"models[{i}] is not a mapping with a `model` key")
            continue
        unknown = sorted(set(entry) - {"model", "parameters"})
        if unknown:
            problems.append(f"models[{i}] fields {', '.join(unknown)}")
        params = {
            k: scalar(v, f"'{k}' of models[{i}]", problems)
            for k, v in parameters(
                entry.get("parameters"), f"parameters of models[{i}]", problems
            ).items()
        }
        entries.append((model_path(entry["model"], base, problems), params))

    recipe: dict[str, Any] = {}
    if spec is not None and data.get("slices") is not None:
        recipe = _slices(data, str(merge_method), spec, base, glob, extras, problems)
    elif spec is not None:
        recipe = _translate(str(merge_method), spec, base, glob, entries, extras, problems)
    notes: list[str] = [INT8_MASK_NOTE] if glob.get("int8_mask") else []
    recipe |= output_fields(data, base, problems, notes)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise MergeError(
            f"{where} is a mergekit recipe (it has `merge_method`) using {len(problems)} "
            f"feature(s) nanmerge does not support:\n{listed}\n"
            "Rewrite those parts, or use nanmerge's own recipe schema (see README)"
        )
    if notes:
        recipe["notes"] = notes
    return {**extras, **recipe}


def _translate(
    merge_method: str,
    spec: _Method,
    base: Any,
    glob: dict[str, Any],
    entries: list[tuple[Any, dict[str, Any]]],
    extras: dict[str, Any],
    problems: list[str],
) -> dict[str, Any]:
    """The method, models, parameters and coefficients of one shared method."""
    if spec.task_vectors:
        if base is None:
            problems.append(f"{merge_method} without base_model (task vectors need one)")
        entries = [(path, params) for path, params in entries if path != base]
    if spec.base == "required" and base is None:
        problems.append(f"{merge_method} without base_model (mergekit requires one)")
    if spec.base in ("origin", "required"):
        entries = [(path, params) for path, params in entries if path != base]
    elif spec.base == "point" and base is not None and all(path != base for path, _ in entries):
        entries = [(base, {}), *entries]  # mergekit merges base_model as one more input
    if merge_method == "slerp":
        others = [(path, params) for path, params in entries if path != base]
        if base is None or len(others) != 1:
            problems.append(
                "slerp needs base_model plus exactly one other model (t = 0 gives base_model)"
            )
        else:
            entries = [(base, {}), *others]
    tensor_params = {"weight"} if spec.weighted and merge_method != "slerp" else set()
    tensor_params |= {"density"} if spec.density else set()
    tensor_params |= {"gamma"} if spec.gamma else set()
    tensor_params |= {"epsilon"} if spec.epsilon else set()
    knobs = {"int8_mask", "normalize", "rescale", "lambda"} if spec.task_vectors else set()
    knobs |= {"int8_mask"} if spec.conventions else set()
    knobs |= {"normalize"} if merge_method == "linear" else set()
    knobs |= {"t"} if merge_method == "slerp" else set()
    knobs |= set(spec.knobs)
    for key in glob:
        if key not in tensor_params | knobs:
            problems.append(f"parameter '{key}' (nanmerge maps none such for {merge_method})")
    for path, params in entries:
        for key in params:
            if key not in tensor_params:
                problems.append(
                    f"parameter '{key}' of model {path} (nanmerge maps none such for "
                    f"{merge_method})"
                )
    if not entries:
        problems.append(f"{merge_method} with no models besides base_model")
        return {}
    wrong = [
        f"'{key}' = {value!r}{where}"
        for params, where in [(glob, ""), *((p, f" of model {path}") for path, p in entries)]
        for key, value in params.items()
        if key in _NUMBERS and value is not None and not numeric(value)
    ]
    if wrong:
        problems.append(f"parameters that must be numbers: {', '.join(wrong)}")
        return {}

    def per_model(name: str) -> list[Any]:
        return [falls_back(params.get(name), glob.get(name)) for _, params in entries]

    problems += [
        f"a gradient or filter list for `{key}` (nanmerge takes one value)"
        for key in ("normalize", "rescale", "int8_mask")
        if varies(glob.get(key))
    ]

    parameters: dict[str, Any] = {}
    own: list[dict[str, Any]] = [{} for _ in entries]  # each model's own values
    if spec.density:
        densities = [falls_back(d, 1.0) for d in per_model("density")]  # mergekit's 1.0
        spread("density", densities, parameters, own)
    if spec.gamma:  # where gamma + density > 1, mergekit's conventions drop fewer outliers
        spread("gamma", [falls_back(g, 0.01) for g in per_model("gamma")], parameters, own)
    if spec.epsilon:
        epsilons = [falls_back(e, 0.15) for e in per_model("epsilon")]  # mergekit's 0.15
        for (path, _), epsilon, density in zip(entries, epsilons, densities, strict=True):
            check_epsilon(epsilon, density, path, problems)
        spread("epsilon", epsilons, parameters, own)
    if spec.task_vectors:
        parameters["scale"] = falls_back(glob.get("lambda"), 1.0)
    if merge_method == "slerp":
        if glob.get("t") is None:
            problems.append("slerp without a global `t` (mergekit requires it)")
        parameters["t"] = glob.get("t")
    parameters |= dict(spec.defaults) | {key: glob[key] for key in spec.knobs if key in glob}
    normalize = glob.get("normalize", spec.normalize)
    if merge_method == "linear" and not normalize:
        parameters["normalize"] = False  # sum_i w_i theta_i, not divided by sum_i w_i
    if spec.consensus:
        parameters["merge"] = "mean" if normalize else "sum"
    rescale = spec.rescale if glob.get("rescale") is None else glob["rescale"]
    if spec.density and isinstance(rescale, bool):  # true: kept entries to tau's L1 norm
        parameters["rescale"] = "l1" if rescale else "none"
    elif spec.density and not varies(rescale):  # a gradient or filter list is reported above
        problems.append(f"rescale {rescale!r} on {merge_method} (true or false)")
    if spec.conventions:
        parameters["conventions"] = "mergekit"

    weights = per_model("weight")
    given = [w for w in weights if w is not None]
    estimator = extras.get("coefficients", "manual")
    estimated = estimator != "manual" and estimator != {"estimator": "manual"}
    recipe = {"method": spec.name, "base": base, "parameters": parameters}
    models: list[dict[str, Any]] = [
        {"path": path} | ({"parameters": values} if values else {})
        for (path, _), values in zip(entries, own, strict=True)
    ]
    if merge_method == "slerp" and given:
        problems.append("per-model `weight` on slerp (mergekit's slerp takes only `t`)")
    elif estimated:
        if len({repr(w) for w in given}) > 1 or any(varies(w) for w in given):
            problems.append(
                "per-model `weight` that differs between models together with `coefficients` "
                "(the estimator sets the weights; remove one of them)"
            )
        elif normalize and spec.task_vectors and not spec.consensus:
            problems.append(f"normalize: true on {merge_method} together with `coefficients`")
        elif given and glob.get("normalize_weights") is False:
            problems.append("per-model `weight` with normalize_weights: false and `coefficients`")
        elif given and varies(parameters["scale"]) and spec.task_vectors:
            problems.append("a per-model `weight` with a varying `lambda` and `coefficients`")
        elif given and spec.task_vectors and not (spec.consensus and normalize):
            # One shared weight is a common scale; where mergekit normalizes, it cancels.
            parameters["scale"] = parameters["scale"] * given[0]
    elif given and len(given) != len(weights):
        missing = [str(path) for (path, _), w in zip(entries, weights, strict=True) if w is None]
        problems.append(f"`weight` missing on model(s) {', '.join(missing)} (mergekit needs it)")
    elif normalize and spec.task_vectors and not spec.consensus and any(map(varies, given)):
        problems.append(
            f"normalize: true with varying per-model `weight` on {merge_method} (mergekit "
            "divides by the weights' sum tensor by tensor; set normalize: false or use ties)"
        )
    elif given:
        if normalize and spec.task_vectors and not spec.consensus:
            total = sum(given)  # mergekit divides the weighted sum by this (unless ~0)
            given = [w / total for w in given] if abs(total) >= 1e-8 else given
        for model, weight in zip(models, given, strict=True):
            model["coefficient"] = weight
        recipe["coefficients"] = "manual"
    return {**recipe, "models": models}


def _slices(
    data: Mapping[str, Any],
    merge_method: str,
    spec: _Method,
    base: Any,
    glob: dict[str, Any],
    extras: dict[str, Any],
    problems: list[str],
) -> dict[str, Any]:
    """mergekit's `slices` as nanmerge slices: each slice translated as a merge of its
    sources (mergekit's per-model `weight` becomes the source's `coefficient`)."""
    if data.get("models") is not None:
        problems.append("both `models` and `slices` (mergekit takes exactly one of them)")
    slices = data["slices"] if isinstance(data["slices"], list) else []
    out = []
    for i, piece in enumerate(slices):
        sources = slice_sources(piece, f"slices[{i}]", base, problems)
        spans = {path: span for path, _, span in sources}
        if len(sources) < len(piece.get("sources", [])):
            continue  # a malformed source is reported; merging the rest would add follow-ons
        if len(spans) < len(sources):
            problems.append(f"slices[{i}] lists one model twice (nanmerge names sources by model)")
            continue
        own = parameters(piece.get("parameters"), f"parameters of slices[{i}]", problems)
        entries = [(path, params) for path, params, _ in sources]
        scope = {
            **glob,
            **{k: scalar(v, f"'{k}' of slices[{i}]", problems) for k, v in own.items()},
        }
        merged = _translate(merge_method, spec, base, scope, entries, extras, problems)
        if not merged:
            continue
        differing = sorted({k for m in merged["models"] for k in m.get("parameters", {})})
        if differing:
            problems.append(
                f"slices[{i}]: per-model {', '.join(differing)} that differs between sources "
                "(nanmerge's slices take one value per slice)"
            )
            continue
        kept = [m["path"] for m in merged["models"]]
        if spec.task_vectors and base in spans and spans[base] != spans[kept[0]]:
            problems.append(
                f"slices[{i}]: base_model's layer_range {spans[base]} differs from its models' "
                f"{spans[kept[0]]} (nanmerge takes the base's layers where the models' are)"
            )
        out.append(
            {
                "sources": [
                    {"model": m["path"], "layers": spans[m["path"]]}
                    | ({"coefficient": m["coefficient"]} if "coefficient" in m else {})
                    for m in merged["models"]
                ],
                "parameters": merged["parameters"],
            }
        )
    if not slices:
        problems.append("`slices` is not a list of {sources: [...]} (mergekit's slices)")
    return {"method": spec.name, "base": base, "slices": out}

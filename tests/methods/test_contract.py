"""Contracts every registered method keeps, from one table: one row per method, with example
parameters, the published formula at uniform coefficients (written out here, independently
of the library), and whether the output ignores the models' order.

A new method adds one row here (a test fails until it does) and one line to the README's
table; the registry-wide tests below then cover it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanmerge.methods import METHODS, STATISTIC_KINDS, tensor_generator
from tests.methods import subspace_formulas
from tests.methods.test_competition import magmax_reference, pcb_reference
from tests.methods.test_widen import widen_reference


@dataclass(frozen=True)
class Inputs:
    tensors: torch.Tensor  # (M, *shape)
    base: torch.Tensor
    statistics: dict[str, torch.Tensor]  # keyword -> (M, ...) stacked


Formula = Callable[[Inputs, Mapping[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class Row:
    examples: tuple[dict[str, Any], ...] = ({},)  # parameters beyond the defaults
    formula: Formula | None = None
    symmetric: bool = True  # permuting the models (and their statistics) permutes nothing
    # how close a permuted merge must come: float32 SVDs of permuted stacks round differently
    # (measured: up to 3e-5 on the small integer inputs, over 1,300 seeds and orders)
    tolerance: float = 1e-5


SVD = 1e-4


def _kept(n: int, fraction: float) -> int:
    """Entries a trim keeps: fraction · n rounded half up, at least one."""
    return max(1, math.floor(fraction * n + 0.5))


def _band(tau: torch.Tensor, density: float, gamma: float = 0.0) -> torch.Tensor:
    """tau with only its band of magnitudes: the top round(gamma n) dropped, the next kept."""
    flat = tau.reshape(-1)
    n = flat.numel()
    order = flat.abs().argsort(descending=True)
    top = math.floor(gamma * n + 0.5) if gamma else 0
    keep = order[top : top + _kept(n, density)]
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(tau.shape)


def _elect(taus: torch.Tensor, merge: str = "mean") -> torch.Tensor:
    """TIES' merge at uniform coefficients: the sum of the entries agreeing with the sign of
    their sum, or their mean (0 where none agrees)."""
    elected = taus.sum(0).sign()
    agree = (taus.sign() == elected) & (taus != 0)
    total = (taus * agree).sum(0)
    if merge == "sum":
        return total
    count = agree.sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _task_vectors(x: Inputs) -> torch.Tensor:
    return x.tensors - x.base


def _slerp(x: Inputs, p: Mapping[str, Any]) -> torch.Tensor:
    a, b = (v.reshape(-1).double() for v in x.tensors)
    t = p["t"]
    cos = float(a @ b / (a.norm() * b.norm()))
    omega = math.acos(cos)
    out = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    return out.float().reshape(x.tensors.shape[1:])


def _regmean(x: Inputs, p: Mapping[str, Any]) -> torch.Tensor:
    """With alpha = 1, the joint least-squares weight: W = (sum W_i G_i)(sum G_i)^-1."""
    grams = x.statistics["gram"].double()
    weights = x.tensors.double()
    numerator = sum(w @ g for w, g in zip(weights, grams, strict=True))
    return (numerator @ torch.linalg.inv(grams.sum(0))).float()


def _fisher(x: Inputs, p: Mapping[str, Any]) -> torch.Tensor:
    f = x.statistics["fisher"] + p["eps"]
    return (f * x.tensors).sum(0) / f.sum(0)


def _ties(x: Inputs, p: Mapping[str, Any]) -> torch.Tensor:
    trimmed = torch.stack([_band(t, p["density"]) for t in _task_vectors(x)])
    return x.base + p["scale"] * _elect(trimmed, p["merge"])


def _breadcrumbs(x: Inputs, p: Mapping[str, Any]) -> torch.Tensor:
    kept = [_band(t, p["density"], p["gamma"]) for t in _task_vectors(x)]
    return x.base + p["scale"] * torch.stack(kept).sum(0)


def _subspace(update: Callable[..., torch.Tensor], *keys: str) -> Formula:
    """base + scale * the reference's update of the task vectors (tests' own rewrite)."""
    return lambda x, p: x.base + p["scale"] * update(_task_vectors(x), *map(p.get, keys)).float()


def _multislerp(x: Inputs, p: Mapping[str, Any]) -> torch.Tensor:
    """Relative to the base: the mean of the unit task vectors, normalized, at their mean norm."""
    taus = _task_vectors(x).reshape(len(x.tensors), -1).double()
    norms = taus.norm(dim=1)
    direction = (taus / (norms + p["eps"]).unsqueeze(1)).mean(0)
    return (x.base + (direction / direction.norm() * norms.mean()).reshape(x.base.shape)).float()


def _nuslerp(x: Inputs, p: Mapping[str, Any]) -> torch.Tensor:
    """Relative to the base: the arc's midpoint sin(θ/2) (a + b) / sin θ, per vector."""
    a, b = (tau.double() for tau in _task_vectors(x))
    if p["nuslerp_flatten"]:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif p["nuslerp_row_wise"]:
        a, b = a.T, b.T
    theta = torch.acos(
        (a * b).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True))
    )
    out = torch.sin(theta / 2) * (a + b) / torch.sin(theta)
    out = out.T if p["nuslerp_row_wise"] and not p["nuslerp_flatten"] else out
    return (x.base + out.reshape(x.base.shape)).float()


def _karcher_start(x: Inputs, p: Mapping[str, Any]) -> torch.Tensor:
    """With no iteration: the normalized mean of the unit vectors at the mean norm."""
    v = x.tensors.reshape(len(x.tensors), -1).double()
    mean = (v / v.norm(dim=1, keepdim=True)).mean(0)
    return (mean / mean.norm() * v.norm(dim=1).mean()).reshape(x.base.shape).float()


def _model_stock(x: Inputs, p: Mapping[str, Any]) -> torch.Tensor:
    """t · average + (1 - t) · base, t = k cos θ / (1 + (k - 1) cos θ) per tensor or row."""
    k = len(x.tensors)
    taus = _task_vectors(x).double()
    rows = taus if p["filter_wise"] else taus.reshape(k, 1, -1)
    pairs = torch.stack(
        [
            (rows[i] * rows[j]).sum(-1) / (rows[i].norm(dim=-1) * rows[j].norm(dim=-1))
            for i in range(k)
            for j in range(i + 1, k)
        ]
    )
    cos = pairs.mean(0) if p["angle"] == "mean_cosine" else torch.cos(torch.acos(pairs).mean(0))
    t = (k * cos / (1 + (k - 1) * cos)).unsqueeze(-1)
    average = x.tensors.double().mean(0).reshape(rows.shape[1:])
    start = x.base.double().reshape(rows.shape[1:])
    return (t * average + (1 - t) * start).reshape(x.base.shape).float()


def _nearswap(x: Inputs, p: Mapping[str, Any]) -> torch.Tensor:
    weight = (p["t"] / (x.tensors[0] - x.base).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * x.tensors[0] + (1 - weight) * x.base


def _arcee_fusion(x: Inputs, p: Mapping[str, Any]) -> torch.Tensor:
    """The model's entries whose importance |Δ| · KL(softmax rows) is >= median + 1.5 IQR."""
    model, base = x.tensors[0].double(), x.base.double()
    soft_m, soft_b = torch.softmax(model, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    importance = (model - base).abs() * (soft_m * (soft_m / soft_b).log()).sum(-1, keepdim=True)
    ordered = sorted(importance.reshape(-1).tolist())
    q1, median, q3 = (ordered[math.floor(f * (len(ordered) - 1))] for f in (0.25, 0.5, 0.75))
    return torch.where(importance >= median + 1.5 * (q3 - q1), x.tensors[0], x.base)


def _consensus(x: Inputs, p: Mapping[str, Any]) -> torch.Tensor:
    """base + scale * tau_MTL where >= k TALL masks |tau_t| > lambda |tau_MTL - tau_t| agree."""
    taus = _task_vectors(x)
    mtl = taus.sum(0)
    count = sum((t.abs() > p["tall_lambda"] * (mtl - t).abs()).int() for t in taus)
    return x.base + p["scale"] * torch.where(count >= p["k"], mtl, torch.zeros_like(mtl))


def _sce(x: Inputs, p: Mapping[str, Any]) -> torch.Tensor:
    """The top select_topk of the entries of nonzero variance across models kept; weights
    m_i / sum m_j (m_i: mean square); entries against sign(sum tau) erased; weighted mean."""
    taus = _task_vectors(x).reshape(len(x.tensors), -1)
    if p["select_topk"] < 1:
        var = taus.var(0, unbiased=False)
        k = math.floor(p["select_topk"] * int((var != 0).sum()) + 0.5)
        keep = torch.zeros_like(var)
        keep[var.argsort(descending=True, stable=True)[:k]] = 1
        taus = taus * keep
    m = taus.square().mean(1)
    w = (m / m.sum()).unsqueeze(1) * ((taus.sign() == taus.sum(0).sign()) & (taus != 0))
    total = w.sum(0)
    merged = torch.where(total > 0, (w * taus).sum(0) / total, torch.zeros_like(total))
    return x.base + p["scale"] * merged.reshape(x.base.shape)


def _emr(x: Inputs, p: Mapping[str, Any]) -> torch.Tensor:
    """base + sign(sum tau) * the largest |tau_t| among the tasks agreeing with that sign."""
    taus = _task_vectors(x)
    sign = taus.sum(0).sign()
    agreeing = [torch.where(t * sign > 0, t.abs(), torch.zeros_like(t)) for t in taus]
    return x.base + sign * torch.stack(agreeing).max(0).values


ROWS: dict[str, Row] = {
    "weight_average": Row(formula=lambda x, p: x.tensors.mean(0)),
    "passthrough": Row(formula=lambda x, p: x.tensors[0]),
    "task_arithmetic": Row(formula=lambda x, p: x.base + p["scale"] * _task_vectors(x).sum(0)),
    # trim_scope=model on one tensor (called directly) is the per-tensor trim, without ties;
    # merge=count is merge=mean at uniform coefficients
    "ties": Row(
        examples=({}, {"density": 0.7, "merge": "sum"}, {"trim_scope": "model", "merge": "count"}),
        formula=_ties,
    ),
    "breadcrumbs": Row(
        examples=(
            {"density": 0.6, "gamma": 0.2},
            {"density": 0.6, "gamma": 0.2, "trim_scope": "model"},
        ),
        formula=_breadcrumbs,
    ),
    # at density 1 nothing is dropped: task arithmetic, and TIES without its trim
    "dare_linear": Row(
        examples=({"density": 1.0},),
        formula=lambda x, p: x.base + p["scale"] * _task_vectors(x).sum(0),
        symmetric=False,
    ),
    "dare_ties": Row(
        examples=({"density": 1.0}, {"density": 1.0, "merge": "sum"}),
        formula=lambda x, p: x.base + p["scale"] * _elect(_task_vectors(x), p["merge"]),
        symmetric=False,
    ),
    "slerp": Row(examples=({"t": 0.3}, {}), formula=_slerp, symmetric=False),
    "fisher": Row(formula=_fisher),
    "regmean": Row(examples=({"alpha": 1.0},), formula=_regmean),
    "consensus": Row(
        examples=({}, {"k": 1, "tall_lambda": 0.3}, {"k": 3, "export_masks": True}),
        formula=_consensus,
    ),
    "emr": Row(formula=_emr),
    # ties of magnitude (+x against -x) go to the later model: the order matters there
    "magmax": Row(
        examples=({}, {"scale": 1.0}),
        formula=lambda x, p: magmax_reference(x.tensors, x.base, p["scale"]),
        symmetric=False,
    ),
    "pcb": Row(
        examples=({}, {"density": 0.5, "clip": 0.1, "scale": 0.7}),
        formula=lambda x, p: pcb_reference(x.tensors, x.base, **p),
    ),
    "widen": Row(
        examples=({}, {"threshold": 0.5, "calibration": 0.8}),
        formula=lambda x, p: widen_reference(x.tensors, x.base, p["threshold"], p["calibration"]),
    ),
    "multislerp": Row(examples=({}, {"eps": 1e-3}), formula=_multislerp),
    "nuslerp": Row(
        examples=(
            {},
            {"nuslerp_flatten": False},
            {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        ),
        formula=_nuslerp,
    ),
    "karcher": Row(examples=({"max_iter": 0},), formula=_karcher_start),
    "model_stock": Row(
        examples=({}, {"filter_wise": True}, {"angle": "mean_angle"}), formula=_model_stock
    ),
    "nearswap": Row(examples=({"t": 0.2},), formula=_nearswap),
    "arcee_fusion": Row(formula=_arcee_fusion),
    "tsv": Row(
        examples=({}, {"scale": 0.5}),
        formula=_subspace(subspace_formulas.tsv_update),
        tolerance=SVD,
    ),
    "iso_c": Row(
        examples=({"scale": 1.5},), formula=_subspace(subspace_formulas.iso_c_update), tolerance=SVD
    ),
    "iso_cts": Row(
        examples=({}, {"common_space_fraction": 0.4}),
        formula=_subspace(subspace_formulas.iso_cts_update, "common_space_fraction"),
        tolerance=SVD,
    ),
    "dc_merge": Row(
        examples=({}, {"density": 0.3}),
        formula=_subspace(subspace_formulas.dc_merge_update, "density"),
        tolerance=SVD,
    ),
    "breadcrumbs_ties": Row(
        examples=({"density": 0.6, "gamma": 0.2}, {"density": 0.5, "gamma": 0.1, "merge": "mean"}),
        formula=lambda x, p: (
            x.base
            + p["scale"]
            * _elect(
                torch.stack([_band(t, p["density"], p["gamma"]) for t in _task_vectors(x)]),
                p["merge"],
            )
        ),
    ),
    # at density 1 MagPrune keeps every entry: task arithmetic, and TIES without its trim
    "della": Row(
        examples=({"density": 1.0}, {"density": 1.0, "merge": "sum"}),
        formula=lambda x, p: x.base + p["scale"] * _elect(_task_vectors(x), p["merge"]),
    ),
    "della_linear": Row(
        examples=({"density": 1.0},),
        formula=lambda x, p: x.base + p["scale"] * _task_vectors(x).sum(0),
    ),
    "sce": Row(examples=({}, {"select_topk": 0.4}), formula=_sce),
}


def _inputs(name: str, m: int, seed: int = 0, *, integers: bool = False) -> Inputs:
    """Random inputs; with `integers`, small whole numbers, so that every sum is exact and
    a sign election cannot flip on the order of additions."""
    gen = torch.Generator().manual_seed(seed)
    shape = (6, 5)
    if integers:
        base = torch.randint(-8, 9, shape, generator=gen).float()
        tensors = base + torch.randint(-4, 5, (m, *shape), generator=gen).float()
    else:
        base = torch.randn(shape, generator=gen)
        tensors = base + 0.5 * torch.randn((m, *shape), generator=gen)
    statistics = {}
    for kind in METHODS[name].statistics:
        stored = STATISTIC_KINDS[kind].file_shape(shape)
        assert stored is not None
        raw = torch.randn((m, *stored), generator=gen)
        # positive weights for a diagonal; a positive definite Gram for a matrix
        statistics[kind] = raw.abs() + 0.1 if stored == shape else raw @ raw.mT + torch.eye(5)
    return Inputs(tensors, base, statistics)


def _call(name: str, x: Inputs, coef: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    spec = METHODS[name]
    inputs: dict[str, Any] = dict(x.statistics)
    if spec.uses_generator:
        inputs["generator"] = tensor_generator(0, "w")
    prepared = {} if spec.prepare is None else spec.prepare(list(x.tensors), x.base, **params)
    return spec.fn(x.tensors, coef, base=x.base, **params, **inputs, **prepared)


# (method, its parameters: the defaults with one of its row's examples over them)
CASES = [
    (name, {**METHODS[name].params, **example})
    for name, row in sorted(ROWS.items())
    if name in METHODS
    for example in row.examples
]


def _models(name: str) -> int:
    spec = METHODS[name]
    return spec.max_models if spec.max_models is not None else max(3, spec.min_models)


def test_the_table_has_one_row_per_registered_method() -> None:
    assert set(ROWS) == set(METHODS)


def test_the_readme_table_lists_every_registered_method_and_no_other() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert {row.split("`")[1] for row in rows} == set(METHODS)


@pytest.mark.parametrize(("name", "params"), [c for c in CASES if ROWS[c[0]].formula])
def test_uniform_coefficients_give_the_published_formula(name: str, params: dict[str, Any]) -> None:
    x = _inputs(name, _models(name))
    formula = ROWS[name].formula
    assert formula is not None
    uniform = torch.ones(len(x.tensors))
    torch.testing.assert_close(_call(name, x, uniform, params), formula(x, params))


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([c for c in CASES if ROWS[c[0]].symmetric]),
    st.integers(0, 2**16),
    st.permutations(range(3)),
)
def test_permuting_the_models_permutes_nothing(
    case: tuple[str, dict[str, Any]], seed: int, order: list[int]
) -> None:
    name, params = case
    m = _models(name)
    order = [i for i in order if i < m]
    x = _inputs(name, m, seed, integers=True)
    coef = torch.tensor([1.0, 2.0, 3.0][:m])
    permuted = Inputs(x.tensors[order], x.base, {k: v[order] for k, v in x.statistics.items()})
    tolerance = ROWS[name].tolerance
    torch.testing.assert_close(
        _call(name, permuted, coef[order], params),
        _call(name, x, coef, params),
        rtol=tolerance,
        atol=tolerance,
    )

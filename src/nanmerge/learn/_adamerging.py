"""AdaMerging: task-wise or layer-wise task-arithmetic coefficients learned on unlabeled inputs.

Yang et al. 2024 (https://arxiv.org/abs/2310.02575) learn the lambdas of
`theta = theta_0 + sum_k lambda_k tau_k` (one per task, or one per task and tensor) by
minimizing the prediction entropy of the merged model on unlabeled test inputs. This module
runs that loop with `torch.func.functional_call` (the merged weights are a differentiable
function of the lambdas; no module is ever rebuilt) and returns a `Coefficients` object in
nanmerge's convention, so `coefficients: {estimator: from_file, path: ...}` with
`method: task_arithmetic` and the same `scale` reproduces the learned merge.

It holds the base and every task vector in memory: meant for models that fit there.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from nanmerge._types import Coefficients, MergeError, TensorNorms
from nanmerge.coefficients import nan, tensor_norms

Granularity = Literal["model", "tensor"]
# The paper's words for the same two choices (task-wise = model, layer-wise = tensor), still
# accepted with a deprecation warning.
_PAPER_WORDS = ("task", "layer")
Init = Literal["uniform", "nan"]

__all__ = ["AdaMergingResult", "adamerging", "entropy", "save_coefficients"]


@dataclass
class AdaMergingResult:
    """The learned coefficients; the objective on all batches before and after; per-step losses."""

    coefficients: Coefficients
    objective_start: float
    objective_end: float
    history: list[float] = field(default_factory=list)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax predictions: AdaMerging's unsupervised objective."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


def _initial(
    init: Init,
    granularity: Granularity,
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    names: list[str],
    labels: tuple[str, ...],
) -> torch.Tensor:
    """Starting coefficients in nanmerge's convention (uniform = 1.0), shape (T, M) or (1, M)."""
    m = len(models)
    if init == "uniform":
        return torch.ones(len(names) if granularity == "tensor" else 1, m, dtype=torch.float64)
    norms: dict[str, TensorNorms] = {
        n: tensor_norms(torch.stack([md[n].float() for md in models]), base[n].float())
        for n in names
    }
    estimate = nan(
        norms,
        labels,
        norm_of="task_vector",
        granularity=granularity,
    )
    if granularity == "model":
        return torch.tensor([estimate.per_model], dtype=torch.float64)
    return torch.tensor([estimate.per_tensor[n] for n in names], dtype=torch.float64)


def adamerging(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    modules: Sequence[nn.Module],
    batches: Sequence[Sequence[torch.Tensor]],
    *,
    granularity: Granularity | Literal["task", "layer"] = "tensor",
    init: Init = "uniform",
    scale: float = 0.3,
    steps: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    model_names: Sequence[str] | None = None,
    progress: bool = True,
) -> AdaMergingResult:
    """Learn task-arithmetic coefficients by entropy minimization on unlabeled inputs.

    `modules[k]` scores task k (e.g. the shared architecture with task k's own head): the
    merged tensors replace its parameters and buffers of the same names through
    `functional_call`, everything else (the head) stays its own. `batches[k]` are unlabeled
    input batches of task k; each step draws one batch per task (seeded) and minimizes the
    sum of the tasks' mean prediction entropies with Adam. `init` starts from uniform
    coefficients or NAN's (task-vector norms, per tensor for `tensor`). `granularity` is one
    coefficient per model (the paper's task-wise) or per model and tensor (layer-wise), named
    as NAN's option is. The result's coefficient c satisfies lambda = scale * c.
    """
    per: Granularity = "tensor" if granularity in ("tensor", "layer") else "model"
    if granularity in _PAPER_WORDS:
        warnings.warn(
            f"adamerging(granularity='{granularity}') is now granularity='{per}', the name "
            "NAN's option uses; the old name will be removed in a later release",
            DeprecationWarning,
            stacklevel=2,
        )
    m = len(models)
    if m < 1 or len(modules) != m or len(batches) != m:
        raise MergeError(
            f"adamerging needs one module and one list of batches per model; got {m} models, "
            f"{len(modules)} modules and {len(batches)} batch lists"
        )
    if any(len(b) == 0 for b in batches):
        raise MergeError("adamerging: every task needs at least one batch of unlabeled inputs")
    names = [
        n
        for n, t in base.items()
        if t.is_floating_point() and all(n in md and md[n].shape == t.shape for md in models)
    ]
    if not names:
        raise MergeError("adamerging: base and models share no floating tensor of equal shape")
    for k, module in enumerate(modules):
        own = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
        absent = [n for n in names if n not in own]
        if absent:
            raise MergeError(
                f"adamerging: module {k} has no parameter or buffer named {absent[:5]}; the "
                "checkpoints' tensor names must be the module's own (state_dict keys)"
            )
    labels = tuple(model_names or (f"model{i}" for i in range(m)))
    theta0 = {n: base[n].float() for n in names}
    taus = {n: torch.stack([md[n].float() for md in models]) - theta0[n] for n in names}
    coef = _initial(init, per, base, models, names, labels).requires_grad_(True)
    optimizer = torch.optim.Adam([coef], lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def merged() -> dict[str, torch.Tensor]:
        out = {}
        for i, n in enumerate(names):
            c = (scale * coef[i if per == "tensor" else 0]).float()
            out[n] = theta0[n] + (c.reshape((-1,) + (1,) * (taus[n].dim() - 1)) * taus[n]).sum(0)
        return out

    def objective(picks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Sum over tasks of the mean entropy over the picked batches of that task."""
        weights = merged()
        total = torch.zeros((), dtype=torch.float64)
        for k, module in enumerate(modules):
            for j in picks[k]:
                logits = functional_call(module, weights, (batches[k][j],), strict=False)
                total = total + entropy(logits).double() / len(picks[k])
        return total

    everything = [range(len(b)) for b in batches]
    for module in modules:
        module.eval()
    with torch.no_grad():
        start = float(objective(everything))
    history: list[float] = []
    for _ in tqdm(range(steps), desc="adamerging", unit="step", disable=not progress):
        picks = [[int(torch.randint(len(b), (1,), generator=gen))] for b in batches]
        loss = objective(picks)
        history.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = float(objective(everything))
    learned = coef.detach()
    result = Coefficients(
        labels,
        "adamerging",
        {
            "granularity": per,
            "init": init,
            "scale": scale,
            "steps": steps,
            "lr": lr,
            "seed": seed,
        },
    )
    if per == "model":
        result.per_model = tuple(float(v) for v in learned[0])
    else:
        result.per_tensor = {n: tuple(float(v) for v in learned[i]) for i, n in enumerate(names)}
    return AdaMergingResult(result, start, end, history)


def save_coefficients(coefficients: Coefficients, path: str | Path) -> Path:
    """Write the JSON that `coefficients: {estimator: from_file, path: ...}` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coefficients.to_json(), indent=2))
    return path

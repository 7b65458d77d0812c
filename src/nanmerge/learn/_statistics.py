"""The statistics step of data-informed merging: per-tensor Fisher or Gram from a model and data.

Run once per fine-tuned model on a few hundred of its own task's examples; save the result
with `save_statistics` and list the files, one per model in recipe order, under the recipe's
`statistics`. `fisher` and `regmean` then read them by tensor name during the merge.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Sized
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from nanmerge._types import MergeError

Kind = Literal["fisher", "gram"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FORMAT = "nanmerge-statistics"

__all__ = ["compute_statistics", "load_source", "save_statistics"]


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch is an input tensor, or an (inputs, labels) pair."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise MergeError(
        f"a batch must be an input tensor or an (inputs, labels) pair; got {type(batch).__name__}"
    )


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor):
        raise MergeError(
            f"the model returned {type(out).__name__}, not a logits tensor; wrap it in a module "
            "whose forward returns the logits (batch, classes)"
        )
    return out


def _fisher(
    model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, bar: tqdm
) -> dict[str, torch.Tensor]:
    """Mean over examples of the squared per-example gradient of the negative log-likelihood.

    Labels are the batch's own when given, else the model's predictions (argmax), the
    empirical stand-in for sampling from the model's predictive distribution.
    """
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    sums = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in params.items()}
    count = 0

    def nll(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_example = vmap(grad(nll), in_dims=(None, 0, 0))
    for batch in batches:
        x, y = _split(batch)
        if y is None:
            with torch.no_grad():
                y = _logits(model, x).argmax(dim=-1)
        grads = per_example(params, x, y)
        for k, g in grads.items():
            sums[k] += g.detach().double().pow(2).sum(dim=0).cpu()
        count += len(x)
        bar.update()
    if count == 0:
        raise MergeError("compute_statistics got no batches; give at least one batch of inputs")
    return {k: (v / count).float() for k, v in sums.items()}


def _gram(model: nn.Module, batches: Iterable[Any], bar: tqdm) -> dict[str, torch.Tensor]:
    """X^T X of each nn.Linear's inputs (all leading dims flattened), summed over batches.

    A sum, not a mean: a model that saw more examples gets a proportionally larger Gram,
    exactly as in the joint least-squares problem RegMean solves. A bias is the weight of a
    constant input 1, whose Gram is the number of input rows: it is stored as a (1, 1)
    entry under the bias's name (the cross term with the other inputs is dropped, which is
    exact for centered inputs).
    """
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums[key] + value if key in sums else value

    def hook(prefix: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            add(f"{prefix}weight", (x.T @ x).cpu())
            if getattr(module, "bias", None) is not None:
                add(f"{prefix}bias", torch.full((1, 1), float(len(x)), dtype=torch.float64))

        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(hook(f"{name}." if name else "")))
    if not hooks:
        raise MergeError("the model has no torch.nn.Linear layer; Gram statistics need one")
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                model(_split(batch)[0])
                seen += 1
                bar.update()
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise MergeError("compute_statistics got no batches; give at least one batch of inputs")
    return {k: v.float() for k, v in sums.items()}


def compute_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    kind: Kind,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-tensor statistics of `model` on `batches`, keyed like the model's state dict.

    kind="fisher": diagonal Fisher of every trainable parameter (mean squared per-example
    gradient of `loss_fn(logits, labels)`, default cross-entropy, i.e. the negative
    log-likelihood); batches are inputs, or (inputs, labels) pairs.
    kind="gram": Gram matrix (in x in) of each nn.Linear's inputs, keyed by its weight's name,
    and the input count as a (1, 1) Gram under its bias's name.
    Memory stays bounded by one batch plus one float64 accumulator per tensor. The model is
    put in eval mode (no dropout) for the pass and restored afterwards.
    """
    if kind not in ("fisher", "gram"):
        raise MergeError(f"kind must be 'fisher' or 'gram'; got {kind!r}")
    total = len(batches) if isinstance(batches, Sized) else None
    bar = tqdm(total=total, desc=f"statistics ({kind})", unit="batch", disable=not progress)
    was_training = model.training
    model.eval()
    try:
        if kind == "fisher":
            return _fisher(model, batches, loss_fn or nn.functional.cross_entropy, bar)
        return _gram(model, batches, bar)
    finally:
        model.train(was_training)
        bar.close()


def save_statistics(
    stats: dict[str, torch.Tensor], path: str | Path, *, kind: Kind | None = None
) -> Path:
    """Write statistics as safetensors (one file per model), marked as nanmerge statistics."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, **({"kind": kind} if kind else {})}
    save_file({k: v.contiguous() for k, v in stats.items()}, str(path), metadata=metadata)
    return path


def load_source(source: str) -> tuple[nn.Module, Iterable[Any]]:
    """Call the user's `module:function` (or `path/to/file.py:function`) for (model, batches).

    This is how `nanmerge stats` gets a model and data without knowing either: the function
    builds the fine-tuned model and returns it with an iterable of batches of its task.
    """
    where, sep, name = source.rpartition(":")
    if not sep or not where or not name:
        raise MergeError(
            "expected MODULE:FUNCTION or FILE.py:FUNCTION returning (model, batches); "
            f"got '{source}'"
        )
    try:
        if where.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            if spec is None or spec.loader is None or not Path(where).is_file():
                raise MergeError(f"{where}: no such Python file")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            sys.path.insert(0, ".")
            try:
                module = importlib.import_module(where)
            finally:
                sys.path.remove(".")
    except ImportError as exc:
        raise MergeError(f"cannot import '{where}': {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise MergeError(f"'{where}' has no function '{name}'")
    result = fn()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise MergeError(
            f"{source} must return (model, batches) with model a torch.nn.Module; "
            f"got {type(result).__name__}"
        )
    return result[0], result[1]

"""Consensus and masks: merges whose output is more than one model.

Both methods merge into one checkpoint and find, per task t, a binary mask over the entries
that recovers an approximation of fine-tuned model t from it. The masks (one bit per entry
and task, packed as numpy.packbits packs: the first entry in the high bit) and whatever else
the reconstruction needs are kept through the `record`, beside the merged checkpoint; the
reconstruction formulas (`tall_rebuild`, `emr_rebuild`) live here too, for
`nanmerge rebuild`. Both methods are elementwise: kept pieces of successive chunks join along
their last dimension (engine/_record.py), so the packed masks are those of the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np

from nanmerge._params import Interval
from nanmerge._types import MemoryCost, MergeError, Rebuild, Record
from nanmerge.methods._registry import Scale, register

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

Agreement = Annotated[int, Interval(ge=1)]  # consensus's k: tasks whose masks must agree
TallLambda = Annotated[float, Interval(ge=0, lt=float("inf"))]

# Keys of what the methods keep, per tensor (`<key>/<tensor name>` in the kept files).
TALL_MASKS = "tall_masks"  # (T, ceil(n / 8)) uint8: task t's TALL mask, packed
TALL_OUTSIDE = "tall_outside"  # float32 tau_MTL where some mask is on but consensus is off
EMR_MASKS = "emr_masks"  # (T, ceil(n / 8)) uint8: task t's EMR mask, packed
EMR_SUMS = "emr_sums"  # (2, T, chunks) float64: sum |tau_t|, sum |m_t * tau_uni| per chunk


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# The engine's chunked working set, plus the kept tensors of one tensor held until it is
# merged, twice (the chunks' pieces and their join): packed masks M / 8 bytes an entry
# (M / 32 L) and consensus's tau_MTL outside the consensus, at most one float32 per entry.
CONSENSUS_MEMORY = MemoryCost(
    lambda m: m + 6 + 2 * _ceil_div(m, 32),
    lambda m: 6 * m + 4,
    "(M + 6 + 2 ceil(M / 32)) * L + (6M + 4) * C",
)
EMR_MEMORY = MemoryCost(
    lambda m: m + 4 + 2 * _ceil_div(m, 32),
    lambda m: 6 * m + 4,
    "(M + 4 + 2 ceil(M / 32)) * L + (6M + 4) * C",
)


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """(T, *shape) bool -> (T, ceil(n / 8)) uint8 on the CPU, numpy.packbits' bit order."""
    import torch

    flat = masks.reshape(masks.shape[0], -1).cpu().numpy()
    return torch.from_numpy(np.packbits(flat, axis=-1))


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """One task's packed mask, (ceil(n / 8),) uint8 -> (n,) bool."""
    import torch

    bits = np.unpackbits(packed.cpu().numpy(), count=numel)
    return torch.from_numpy(bits.astype(bool))


def _weighted_task_vectors(
    tensors: torch.Tensor, coef: torch.Tensor, base: torch.Tensor
) -> torch.Tensor:
    """coef_t * tau_t, (M, *shape): where NAN's coefficient enters both methods."""
    return (tensors - base).mul_(coef.reshape((-1,) + (1,) * (tensors.dim() - 1)))


def tall_masks(taus: torch.Tensor, multi_task: torch.Tensor, tall_lambda: float) -> torch.Tensor:
    """TALL masks, (M, *shape) bool: |tau_t| > lambda * |tau_MTL - tau_t|, the entries where
    task t's own vector is closer to the fine-tuned model than the multi-task one is."""
    distance = (multi_task - taus).abs_().mul_(tall_lambda)
    return taus.abs().gt_(distance).bool()


def _k_fits(params: Mapping[str, Any], models: int) -> list[str]:
    """k <= M: no entry is on in more masks than there are tasks."""
    k = params.get("k")
    if not isinstance(k, int) or k <= models:
        return []
    return [
        f"k = {k} keeps the entries that at least {k} tasks' TALL masks select, but the "
        f"recipe merges {models} models, so every entry would be dropped; set k to at most "
        f"{models} (the paper's k = 2 drops the entries only one task or none uses)"
    ]


def _scale_recovers(params: Mapping[str, Any]) -> list[str]:
    """export_masks needs scale != 0: the rebuild reads tau_MTL back from the merged model."""
    if params.get("export_masks") and params.get("scale") == 0:
        return [
            "export_masks with scale = 0 keeps nothing of tau_MTL in the merged model, so no "
            "task can be rebuilt; set a scale other than 0"
        ]
    return []


def tall_rebuild(
    merged: torch.Tensor,
    base: torch.Tensor,
    kept: Callable[[str], torch.Tensor],
    *,
    task: int,
    params: Mapping[str, Any],
    whole: Mapping[str, float],
) -> torch.Tensor:
    """TALL's task model theta_t = base + m_t * tau_MTL (float32, flat), from the consensus
    merge: tau_MTL = (merged - base) / scale where at least k masks are on, the kept
    `outside` values where fewer (but some) are, and 0 where none is (no mask uses it)."""
    import torch

    packed, outside = kept(TALL_MASKS), kept(TALL_OUTSIDE)
    numel = merged.numel()
    count = torch.zeros(numel, dtype=torch.int32)
    for row in packed:
        count += unpack_mask(row, numel)
    agreed = count >= params["k"]
    multi_task = (merged.reshape(-1).float() - base.reshape(-1).float()).div_(params["scale"])
    multi_task[~agreed] = 0.0
    fill = (count > 0) & ~agreed
    if int(fill.sum()) != outside.numel():
        raise MergeError(
            f"the kept tau_MTL values ({outside.numel()}) do not fit the {int(fill.sum())} "
            "entries their masks leave outside the consensus; the kept files do not belong "
            "to this merged model"
        )
    multi_task[fill] = outside.float()
    mask = unpack_mask(packed[task], numel)
    return base.reshape(-1).float() + torch.where(mask, multi_task, 0.0)


@register(
    reference="https://arxiv.org/abs/2405.07813",
    needs_base=True,
    elementwise=True,
    validate=_scale_recovers,
    validate_count=_k_fits,
    memory=CONSENSUS_MEMORY,
    rebuild=Rebuild(TALL_MASKS, tall_rebuild, "parameter `export_masks: true`"),
)
def consensus(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    k: Agreement = 2,
    tall_lambda: TallLambda = 0.6,
    scale: Scale = 0.3,
    export_masks: bool = False,
    record: Record | None = None,
) -> torch.Tensor:
    """Consensus merging (Wang et al. 2024): task arithmetic over the entries at least k
    tasks' TALL masks select.

    https://arxiv.org/abs/2405.07813, authors' code https://github.com/nik-dim/tall_masks.
    tau_MTL = sum_t coef_t tau_t; m_t = |coef_t tau_t| > tall_lambda |tau_MTL - coef_t tau_t|
    (NAN's coefficient scales each tau_t before both, as in task arithmetic); merged =
    base + scale * [count_t(m_t) >= k] * tau_MTL. k = 2 is the paper's choice (drop entries
    that only one task, or none, uses); k must be <= the number of models. The authors pick
    lambda per task on validation data from {0.2, ..., 0.6} and alpha (our scale) on
    validation too; without data we default to FusionBench's tall_mask_lambda 0.6 and to
    task arithmetic's 0.3. The mask is strict (>), as in both codes (the task asked for >=;
    they differ only where both sides are equal, such as zero entries).

    With export_masks, the packed TALL masks and tau_MTL where some mask is on but consensus
    is off (float32, in entry order) are kept, so `nanmerge rebuild` gives the paper's TALL
    model theta_t = base + m_t * tau_MTL (tau_MTL read back from the merged tensor elsewhere).
    """
    import torch

    taus = _weighted_task_vectors(tensors, coef, base)
    multi_task = taus.sum(dim=0)
    masks = tall_masks(taus, multi_task, tall_lambda)
    del taus
    count = masks.sum(dim=0, dtype=torch.int32)
    agreed = count >= k
    merged = torch.where(agreed, multi_task, 0.0).mul_(scale).add_(base)
    if record is not None:
        record.note("consensus_kept", int(agreed.sum()))
        if export_masks:
            record.keep(TALL_MASKS, pack_masks(masks))
            record.keep(TALL_OUTSIDE, multi_task[(count > 0) & ~agreed].cpu())
    return merged


def emr_rescaler(
    kept: Callable[[str, str], torch.Tensor], names: Sequence[str], task: int
) -> dict[str, float]:
    """lambda_t from the whole model's sums (each tensor kept its (2, T, chunks) pieces); 1
    where task t keeps no entry (then nothing is rescaled)."""
    import torch

    sums = torch.stack([kept(EMR_SUMS, n).sum(dim=-1) for n in names]).sum(dim=0)
    total, masked = sums[0], sums[1]
    return {"rescaler": float(torch.where(masked > 0, total / masked.clamp(min=1e-300), 1.0)[task])}


def emr_rebuild(
    merged: torch.Tensor,
    base: torch.Tensor,
    kept: Callable[[str], torch.Tensor],
    *,
    task: int,
    params: Mapping[str, Any],
    whole: Mapping[str, float],
) -> torch.Tensor:
    """EMR's task model base + lambda_t * m_t * tau_uni (float32, flat), with tau_uni read
    back from the merged tensor as merged - base and lambda_t as whole["rescaler"]."""
    import torch

    flat_base = base.reshape(-1).float()
    unified = merged.reshape(-1).float() - flat_base
    mask = unpack_mask(kept(EMR_MASKS)[task], merged.numel())
    return flat_base + torch.where(mask, unified, 0.0).mul_(whole["rescaler"])


@register(
    reference="https://arxiv.org/abs/2405.17461",
    needs_base=True,
    elementwise=True,
    memory=EMR_MEMORY,
    rebuild=Rebuild(EMR_MASKS, emr_rebuild, whole=emr_rescaler),
)
def emr(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    record: Record | None = None,
) -> torch.Tensor:
    """EMR-Merging (Huang et al. 2024): elect a unified task vector, keep per-task masks and
    rescalers; the merged checkpoint is base + tau_uni.

    https://arxiv.org/abs/2405.17461, as in FusionBench (fusion_bench/method/emr_merging).
    With tau_t = coef_t (theta_t - base) (NAN's coefficient scales each task vector before
    the election, as in TIES): sign = sign(sum_t tau_t); tau_uni = sign * max over the tasks
    agreeing with it of |tau_t| (0 where none does, or the sum is 0: the paper's sgn, where
    FusionBench takes a zero sum as negative); m_t = tau_t * tau_uni > 0; and the rescaler
    lambda_t = sum |tau_t| / sum |m_t * tau_uni| over the whole model, as the paper writes it
    (FusionBench and the authors' code add up per-tensor means instead). Task t's model is
    base + lambda_t * m_t * tau_uni (`nanmerge rebuild`).

    The rescaler is a whole-model quantity that the merged checkpoint does not need, so no
    pass runs before the merge: each tensor keeps its packed masks and its two sums per task
    (float64, one column per chunk), which the rebuild adds up. A collect step could not see
    the coefficients, which scale both sums.
    """
    import torch

    flat = (len(tensors), -1)
    taus = _weighted_task_vectors(tensors, coef, base)
    sign = taus.sum(dim=0).sign_()
    masks = torch.mul(taus, sign).gt_(0).bool()
    magnitudes = taus.abs_()  # taus are no longer needed: in place
    total = magnitudes.reshape(flat).sum(dim=1, dtype=torch.float64)
    unified = magnitudes.mul_(masks).amax(dim=0).mul_(sign)
    if record is not None:
        record.keep(EMR_MASKS, pack_masks(masks))
        kept = torch.where(masks, unified.abs(), 0.0).reshape(flat)
        sums = torch.stack([total, kept.sum(dim=1, dtype=torch.float64)])
        record.keep(EMR_SUMS, sums.unsqueeze(-1).cpu())
    return unified.add_(base)

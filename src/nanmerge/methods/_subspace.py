"""Subspace merges: each weight matrix merged through its task vectors' singular vectors.

TSV-M, Iso-C, Iso-CTS and DC-Merge share their frame, written once here: the task vectors
tau_i = coef_i * (theta_i - theta_0) (NAN's coefficient scales task vector i before any SVD,
as FusionBench's per-task `alpha` list does for TSV-M: its singular values scale by |coef_i|,
its directions stay); each 2-D matrix merged by the method's own rule; every other tensor
(biases, norms, conv kernels) and, unless `include_vocab`, the vocabulary-sized matrices
(context role "embedding" or "head") get the references' treatment of non-matrix tensors,
the plain mean of the task vectors (1/M) sum_i coef_i tau_i; then base + scale * merged.

The one SVD/Procrustes helper: `top_singular` (an exact SVD, or a seeded randomized one when
the kept rank is far below the matrix size, with its relative Frobenius error) and
`orthonormal` (Procrustes: the nearest matrix with orthonormal columns or rows, U V^T of the
SVD), which turns several tasks' singular vectors into one orthonormal basis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from nanmerge._linalg import OVERSAMPLE, NotConverged, exact_svd, randomized_svd
from nanmerge._types import MergeError, Record, TensorContext
from nanmerge.methods._registry import Fraction, Scale, register

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

# "auto": a randomized SVD when the kept rank is below a quarter of the matrix's smaller side
# (and the sketch with its oversampling is still smaller than that side), else exact.
SvdMode = Literal["auto", "exact"]
VOCAB_ROLES = ("embedding", "head")
# merge_matrix(task_vectors (M, m, n)) -> (the merged update (m, n), the largest relative
# error of the approximate SVDs it used, or None when all were exact)
MatrixMerge = Callable[["torch.Tensor"], tuple["torch.Tensor", "float | None"]]


class Factors(NamedTuple):
    """A rank-k factorization u diag(s) vh; `error` is ||A - u diag(s) vh||_F / ||A||_F when
    it came from a randomized SVD (None when exact). It includes the truncation to rank k
    that the method intends: the exact SVD's error at rank k is its lower bound."""

    u: torch.Tensor  # (m, k)
    s: torch.Tensor  # (k,)
    vh: torch.Tensor  # (k, n)
    error: float | None = None


def _randomized_svd(matrix: torch.Tensor, rank: int) -> Factors:
    """`randomized_svd`'s top `rank` triplets with their relative Frobenius error."""
    import torch

    u, s, vh = randomized_svd(matrix, rank)
    norm = float(torch.linalg.matrix_norm(matrix))
    residual = float(torch.linalg.matrix_norm(torch.addmm(matrix, u * s, vh, alpha=-1)))
    return Factors(u, s, vh, residual / norm if norm > 0 else 0.0)


def top_singular(matrix: torch.Tensor, rank: int, svd: SvdMode = "auto") -> Factors:
    """The `rank` largest singular triplets of `matrix`: randomized (and its error stated)
    when svd="auto" and the rank is far below the matrix size, else from the exact SVD
    (copied out, so that the full factors are freed while other tasks' are computed)."""
    side = min(matrix.shape)
    if svd == "auto" and 4 * rank < side and rank + OVERSAMPLE < side:
        return _randomized_svd(matrix, rank)
    u, s, vh = exact_svd(matrix)
    if rank >= len(s):
        return Factors(u, s, vh)
    return Factors(u[:, :rank].clone(), s[:rank].clone(), vh[:rank].clone())


def orthonormal(x: torch.Tensor) -> torch.Tensor:
    """Procrustes: the matrix with orthonormal columns (tall x) or rows (wide x) nearest to x
    in Frobenius norm, U V^T of its thin SVD."""
    u, _, vh = exact_svd(x)
    return u @ vh


def stacked(parts: Sequence[Factors]) -> Factors:
    """Several factorizations side by side: their u as columns, s and vh as rows, in order;
    the error is the largest of theirs (None when all were exact)."""
    import torch

    errors = [p.error for p in parts if p.error is not None]
    return Factors(
        torch.cat([p.u for p in parts], dim=1),
        torch.cat([p.s for p in parts]),
        torch.cat([p.vh for p in parts], dim=0),
        max(errors) if errors else None,
    )


def averaged(params: Mapping[str, Any], context: TensorContext, shape: tuple[int, ...]) -> bool:
    """Whether `subspace_merge` averages a tensor whatever the method: it is not a matrix, or
    a vocabulary-sized one left out (`include_vocab` false). The mean is elementwise, so the
    registry's `elementwise_on` lets the engine merge these tensors chunk by chunk (on a
    chunk, a (M, c) stack, `subspace_merge` takes the mean): the float32 stacks of a large
    vocabulary's embedding and head are never made."""
    return len(shape) != 2 or (context.role in VOCAB_ROLES and not params["include_vocab"])


def subspace_merge(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    base: torch.Tensor,
    merge_matrix: MatrixMerge,
    *,
    scale: float,
    context: TensorContext | None,
    include_vocab: bool,
    record: Record | None,
    min_side: int = 1,
) -> torch.Tensor:
    """base + scale * merged, where merged is `merge_matrix` of the task vectors for a 2-D
    matrix, else their mean (module docstring). A matrix whose smaller side is below
    `min_side` (a per-task rank of 0: the references would add nothing) is averaged too,
    and the report says so."""
    import torch

    task_vectors = tensors - base
    task_vectors.mul_(coef.reshape((-1,) + (1,) * (task_vectors.dim() - 1)))
    vocab = context is not None and context.role in VOCAB_ROLES and not include_vocab
    if task_vectors.dim() == 3 and not vocab and min(task_vectors.shape[1:]) >= min_side:
        try:
            merged, error = merge_matrix(task_vectors)
        except NotConverged as e:
            where = f"tensor '{context.name}'" if context is not None else "a tensor"
            raise MergeError(
                f"the SVD of {where} of shape {tuple(task_vectors.shape[1:])} did not "
                f"converge in float32 nor in float64 ({e}); check that tensor's inputs "
                "for NaN or inf entries"
            ) from e
        if record is not None and error is not None:
            record.note("svd_error", error)
    else:
        if task_vectors.dim() == 3 and not vocab and record is not None:
            record.note(
                "averaged",
                f"shape {tuple(task_vectors.shape[1:])} gives each of the "
                f"{len(task_vectors)} models no singular vector",
            )
        merged = task_vectors.mean(dim=0)
    del task_vectors
    return torch.add(base, merged, alpha=scale)


def _tsv_matrix(task_vectors: torch.Tensor, svd: SvdMode) -> tuple[torch.Tensor, float | None]:
    """Each task's top r // M singular triplets, their u and v made one orthonormal basis
    each by Procrustes, recombined with the tasks' own singular values."""
    rank = min(task_vectors.shape[1:]) // len(task_vectors)
    kept = stacked([top_singular(tau, rank, svd) for tau in task_vectors])
    return (orthonormal(kept.u) * kept.s) @ orthonormal(kept.vh), kept.error


@register(
    reference="https://arxiv.org/abs/2412.00081",
    needs_base=True,
    needs_matrices=True,
    elementwise_on=averaged,
)
def tsv(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    scale: Scale = 1.0,
    include_vocab: bool = False,
    svd: SvdMode = "auto",
    context: TensorContext | None = None,
    record: Record | None = None,
) -> torch.Tensor:
    """TSV-M, Task Singular Vectors: Merge (Gargiulo et al., CVPR 2025).

    https://arxiv.org/abs/2412.00081; authors' code github.com/AntoAndGar/task_singular_vectors
    (`compute_and_sum_svd_mem_reduction`), followed as in FusionBench
    (fusion_bench/method/task_singular_vector/TSVM.py, defaults alpha = 1, no excluded keys).
    Per matrix of r = min(m, n): each task keeps its top r // M singular triplets; the kept
    U_i side by side and the kept V_i^T stacked are each replaced by the nearest orthonormal
    matrix (Procrustes, U V^T of their SVD), which removes the interference between tasks'
    directions; merged = U_perp diag(s_1, ..., s_M) V_perp^T. Other tensors: the mean of the
    task vectors, as both references. coef_i scales tau_i before its SVD (FusionBench's
    per-task alpha list); `scale` is their scalar alpha. The authors exclude CLIP's
    `text_projection`; here vocabulary-sized matrices (embedding, head) are averaged unless
    `include_vocab`. svd="auto" takes a randomized SVD when r // M < r / 4 (M > 4 models),
    noting its error as `svd_error`; svd="exact" is the references' exact SVD.
    """
    return subspace_merge(
        tensors,
        coef,
        base,
        lambda taus: _tsv_matrix(taus, svd),
        scale=scale,
        context=context,
        include_vocab=include_vocab,
        record=record,
        min_side=len(tensors),
    )


def _iso_c_matrix(task_vectors: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """The sum's singular vectors with every singular value replaced by their mean."""
    u, s, vh = exact_svd(task_vectors.sum(dim=0))
    return (u @ vh).mul_(s.mean()), None


@register(
    reference="https://arxiv.org/abs/2502.04959",
    needs_base=True,
    needs_matrices=True,
    elementwise_on=averaged,
)
def iso_c(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    scale: Scale = 1.0,
    include_vocab: bool = False,
    context: TensorContext | None = None,
    record: Record | None = None,
) -> torch.Tensor:
    """Iso-C, isotropic merging in the common subspace (Marczak et al., ICML 2025).

    https://arxiv.org/abs/2502.04959, as FusionBench's
    fusion_bench/method/isotropic_merging/iso_utils.py `iso_c` (config iso_c.yaml:
    scaling_factor 1.0, no excluded keys). Per matrix: the SVD of sum_i coef_i tau_i with
    its spectrum flattened to the mean singular value (all min(m, n) of them), so every
    direction of the task-arithmetic sum is scaled alike; other tensors: the mean of the
    task vectors. coef_i scales tau_i in the sum; `scale` is the reference's scaling factor.
    Vocabulary-sized matrices are averaged unless `include_vocab`. Always an exact SVD:
    every singular value enters the mean.
    """
    return subspace_merge(
        tensors,
        coef,
        base,
        _iso_c_matrix,
        scale=scale,
        context=context,
        include_vocab=include_vocab,
        record=record,
    )


def iso_cts_spaces(
    task_vectors: torch.Tensor, common_space_fraction: float, svd: SvdMode = "auto"
) -> tuple[Factors, list[Factors]]:
    """Iso-CTS's subspaces: the common one, the top singular triplets of the sum, and per
    task the top triplets of its task vector with the common directions projected out.

    Sizes as the reference: common = int(r * fraction), then the rest rounded (Python's
    round) to a multiple of M, each task getting round((r - common) / M) directions and the
    common space the remainder. Where that rounding would exceed r (a fraction near 0) the
    task share is cut to r // M, which the reference does not guard.
    """
    m, r = len(task_vectors), min(task_vectors.shape[1:])
    per_task = min(round((r - int(r * common_space_fraction)) / m), r // m)
    common = r - m * per_task
    u, s, vh = exact_svd(task_vectors.sum(dim=0))
    shared = Factors(u[:, :common], s[:common], vh[:common])
    tasks = [
        top_singular(tau - shared.u @ (shared.u.mT @ tau), per_task, svd) for tau in task_vectors
    ]
    return shared, tasks


def _iso_cts_matrix(
    task_vectors: torch.Tensor, common_space_fraction: float, svd: SvdMode
) -> tuple[torch.Tensor, float | None]:
    """Task-specific then common directions made orthonormal by Procrustes, with the mean of
    all their singular values on each (a flat spectrum)."""
    shared, tasks = iso_cts_spaces(task_vectors, common_space_fraction, svd)
    kept = stacked([*tasks, shared])
    return (orthonormal(kept.u) @ orthonormal(kept.vh)).mul_(kept.s.mean()), kept.error


@register(
    reference="https://arxiv.org/abs/2502.04959",
    needs_base=True,
    needs_matrices=True,
    elementwise_on=averaged,
)
def iso_cts(
    tensors: torch.Tensor,
    coef: torch.Tensor,
    *,
    base: torch.Tensor,
    scale: Scale = 1.0,
    common_space_fraction: Fraction = 0.8,
    include_vocab: bool = False,
    svd: SvdMode = "auto",
    context: TensorContext | None = None,
    record: Record | None = None,
) -> torch.Tensor:
    """Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al. 2025).

    https://arxiv.org/abs/2502.04959, as FusionBench's iso_utils.py `iso_cts` (config
    iso_cts.yaml: scaling_factor 1.0, common_space_fraction 0.8). Per matrix: the common
    subspace is the top directions of sum_i coef_i tau_i; each task adds its top directions
    after the common ones are projected out of its task vector (`iso_cts_spaces`); the
    combined left and right bases are made orthonormal (Procrustes) and every direction
    gets the mean of all kept singular values. Other tensors: the mean of the task vectors.
    coef_i scales tau_i, in the common sum and in its own subspace. Vocabulary-sized
    matrices are averaged unless `include_vocab`. The task-specific SVDs are randomized
    under svd="auto" when their rank is below a quarter of the matrix (error noted).
    """
    return subspace_merge(
        tensors,
        coef,
        base,
        lambda taus: _iso_cts_matrix(taus, common_space_fraction, svd),
        scale=scale,
        context=context,
        include_vocab=include_vocab,
        record=record,
    )

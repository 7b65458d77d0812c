"""Linear algebra where torch's CPU LAPACK needs a second try."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch


class NotConverged(Exception):
    """The SVD did not converge in float32 nor in float64."""


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd(matrix, full_matrices=False), redone in float64 where it fails to
    converge; the factors come back in the input's dtype. NotConverged if both fail.

    float32's divide-and-conquer SVD (MKL's sgesdd) fails on some matrices whose singular
    values are all nearly equal, such as the near-orthonormal ones every Procrustes step
    of the subspace methods hands it: an Iso-CTS merge at `1b` stopped on one, and 1 of 4
    random 5632 x 2048 near-orthonormal matrices fails, every time with 2 threads (none
    with 1). float64 converges on them, in about twice the time.
    """
    import torch

    # torch.linalg.LinAlgError, a RuntimeError, is caught as such: not every torch stub
    # exports it
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except RuntimeError as error:
        if matrix.dtype == torch.float64:
            raise NotConverged(str(error)) from error
    try:
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    except RuntimeError as error:
        raise NotConverged(str(error)) from error
    return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)

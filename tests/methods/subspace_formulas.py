"""The subspace methods written out again from their references, for the tests: float64, full
SVDs, and the references' zero-padded r-column bases (r = min(m, n)), step by step as
FusionBench's iso_utils.py / TSVM_utils.py and DC-Merge's DC_utils.py compute them, without
any of the library's helpers. Uniform coefficients; 2-D task vectors only."""

from __future__ import annotations

import torch


def _polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def _padded_bases(taus: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Each task's top k u, s, vh placed in its own block of r zero-initialized slots."""
    m, n = taus.shape[1:]
    r = min(m, n)
    big_u = torch.zeros(m, r, dtype=torch.float64)
    big_s = torch.zeros(r, dtype=torch.float64)
    big_vh = torch.zeros(r, n, dtype=torch.float64)
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        big_u[:, i * k : (i + 1) * k] = u[:, :k]
        big_s[i * k : (i + 1) * k] = s[:k]
        big_vh[i * k : (i + 1) * k, :] = vh[:k, :]
    return big_u, big_s, big_vh


def tsv_update(taus: torch.Tensor) -> torch.Tensor:
    taus = taus.double()
    k = min(taus.shape[1:]) // len(taus)
    big_u, big_s, big_vh = _padded_bases(taus, k)
    return _polar(big_u) @ torch.diag(big_s) @ _polar(big_vh)


def iso_c_update(taus: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(taus.double().sum(0), full_matrices=False)
    return u @ torch.diag(torch.ones_like(s) * s.mean()) @ vh


def iso_cts_update(taus: torch.Tensor, fraction: float) -> torch.Tensor:
    taus = taus.double()
    n_tasks, r = len(taus), min(taus.shape[1:])
    common = int(r * fraction)
    common = r - round((r - common) / n_tasks) * n_tasks
    per_task = int((r - common) / n_tasks)
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    uc, sc, vhc = u[:, :common], s[:common], vh[:common, :]
    all_u, all_s, all_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
    for i, tau in enumerate(taus):
        ut, st, vht = torch.linalg.svd(tau - uc @ uc.T @ tau, full_matrices=False)
        all_u[:, i * per_task : (i + 1) * per_task] = ut[:, :per_task]
        all_s[i * per_task : (i + 1) * per_task] = st[:per_task]
        all_vh[i * per_task : (i + 1) * per_task, :] = vht[:per_task, :]
    start = n_tasks * per_task
    all_u[:, start : start + common] = uc
    all_s[start : start + common] = sc
    all_vh[start : start + common, :] = vhc
    flat = torch.ones_like(all_s) * all_s.mean()
    return _polar(all_u) @ torch.diag(flat) @ _polar(all_vh)


def dc_merge_update(taus: torch.Tensor, density: float) -> torch.Tensor:
    taus = taus.double()
    n_tasks, r = len(taus), min(taus.shape[1:])
    k = r // n_tasks
    big_u, _, big_vh = _padded_bases(taus, k)
    cover_u, cover_vh = _polar(big_u), _polar(big_vh)
    projected = []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        truncated = u[:, :k] @ torch.diag(s[:k]) @ vh[:k, :]
        p = cover_u.T @ truncated @ cover_vh.T
        count = max(1, int(density * p.numel()))
        threshold = torch.topk(p.abs().reshape(-1), count).values.min()
        projected.append(p * (p.abs() >= threshold))
    stack = torch.stack(projected)
    total = stack.sum(0)
    agree = stack.sign() == total.sign()
    merged = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
    merged = torch.where(total == 0, torch.zeros_like(merged), merged)
    mask = torch.zeros_like(merged)
    for i in range(n_tasks):
        mask[i * k : (i + 1) * k, i * k : (i + 1) * k] = 1
    return cover_u @ (merged * mask) @ cover_vh

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from nanmerge._types import MergeError
from nanmerge.statistics import compute_statistics, save_statistics


def _data(seed: int, n: int = 12, d: int = 5) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_gram_is_x_transpose_x_of_each_linear_input_summed_over_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x = _data(1)
    stats = compute_statistics(model, [x[:7], x[7:]], kind="gram", progress=False)
    hidden = torch.relu(model[0](x)).detach()
    assert set(stats) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert stats["0.bias"].tolist() == stats["2.bias"].tolist() == [[12.0]]  # input rows
    torch.testing.assert_close(stats["0.weight"], x.T @ x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["2.weight"], hidden.T @ hidden, atol=1e-5, rtol=1e-5)


def test_fisher_of_softmax_regression_matches_the_closed_form_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = _data(2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    stats = compute_statistics(
        model, [(x[:5], y[:5]), (x[5:], y[5:])], kind="fisher", progress=False
    )
    # d(-log softmax(z)_y)/dz = p - onehot(y); dW = (p - e_y) x^T, db = p - e_y
    with torch.no_grad():
        err = torch.softmax(model(x), -1) - nn.functional.one_hot(y, 3)
    expected_w = (err[:, :, None] * x[:, None, :]).pow(2).mean(0)
    torch.testing.assert_close(stats["weight"], expected_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats["bias"], err.pow(2).mean(0), atol=1e-6, rtol=1e-5)


def test_fisher_without_labels_uses_the_models_own_predictions() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).train()
    x = _data(3)
    predicted = model(x).argmax(-1)
    unlabeled = compute_statistics(model, [x], kind="fisher", progress=False)
    labeled = compute_statistics(model, [(x, predicted)], kind="fisher", progress=False)
    assert unlabeled.keys() == labeled.keys() == dict(model.named_parameters()).keys()
    for k in unlabeled:
        torch.testing.assert_close(unlabeled[k], labeled[k])
    assert model.training


def test_saved_statistics_round_trip_with_a_format_mark(tmp_path: Path) -> None:
    stats = {"w": torch.rand(3, 3), "b": torch.rand(3)}
    path = save_statistics(stats, tmp_path / "s" / "m0.safetensors", kind="fisher")
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "nanmerge-statistics", "kind": "fisher"}
        torch.testing.assert_close(f.get_tensor("w"), stats["w"])


def test_no_batches_and_no_linear_are_clear_errors() -> None:
    with pytest.raises(MergeError, match="no batches"):
        compute_statistics(nn.Linear(2, 2), [], kind="gram", progress=False)
    with pytest.raises(MergeError, match=r"no torch\.nn\.Linear"):
        compute_statistics(nn.Tanh(), [torch.ones(1, 2)], kind="gram", progress=False)

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from nanmerge.cli import main

SOURCE = """
import torch
from torch import nn

X = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10


def make():
    return nn.Linear(3, 2), [X[:2], X[2:]]
"""


def test_stats_runs_the_users_function_and_writes_the_gram(tmp_path: Path) -> None:
    (tmp_path / "task.py").write_text(SOURCE)
    out = tmp_path / "m0.gram.safetensors"
    args = ["stats", f"{tmp_path / 'task.py'}:make", "--kind", "gram", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10
    torch.testing.assert_close(load_file(out)["weight"], x.T @ x)


def test_stats_names_a_missing_function(tmp_path: Path) -> None:
    (tmp_path / "task.py").write_text(SOURCE)
    args = ["stats", f"{tmp_path / 'task.py'}:nope", "--kind", "fisher", "--out", "x"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "has no function 'nope'" in result.output

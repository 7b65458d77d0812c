"""Commands that compute nothing (help, listings, headers, recipe errors) never import torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import Family

# Runs the CLI in a fresh interpreter, so nothing this test session imported counts.
PROBE = """
import json, sys
from click.testing import CliRunner
from nanmerge.cli import main
results = [CliRunner().invoke(main, args) for args in json.loads(sys.argv[1])]
print(json.dumps({
    "exit_codes": [r.exit_code for r in results],
    "outputs": [r.output for r in results],
    "torch_loaded": "torch" in sys.modules,
}))
"""


def probe(commands: list[list[str]]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(commands)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def test_commands_without_tensor_math_do_not_import_torch(family: Family, tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        yaml.safe_dump({"models": [str(p) for p in family.models], "method": "ties", "sead": 1})
    )
    misspelt = tmp_path / "misspelt.yaml"
    models = [str(p) for p in family.models]
    misspelt.write_text(
        yaml.safe_dump(
            {"base": str(family.base), "models": models, "method": "tie", "output": "out"}
        )
    )
    result = probe(
        [
            ["--help"],
            ["merge", "--help"],
            ["methods"],
            ["methods", "--json"],
            ["inspect", "--headers-only", str(family.base)],
            ["run", str(recipe)],
            ["run", str(misspelt)],
            [
                "merge",
                "--model",
                models[0],
                "--method",
                "ties",
                "--param",
                "densty=1",
                "--output",
                "o",
            ],
        ]
    )
    assert result["exit_codes"] == [0, 0, 0, 0, 0, 2, 2, 2], result["outputs"]
    outputs = result["outputs"]
    assert isinstance(outputs, list)
    assert "ties" in outputs[2] and "layer.weight" in outputs[4]
    assert "sead: unknown field (did you mean 'seed'?)" in outputs[5]
    assert "unknown merge method 'tie' (did you mean 'ties'?)" in outputs[6]
    assert "'densty'" in outputs[7] and "density" in outputs[7]
    assert result["torch_loaded"] is False


def test_the_probe_sees_torch_once_a_command_computes(family: Family) -> None:
    """The control for the test above: taking norms needs torch, and the probe notices."""
    result = probe([["inspect", "--quiet", str(family.base)]])
    assert result["exit_codes"] == [0], result["outputs"]
    assert result["torch_loaded"] is True

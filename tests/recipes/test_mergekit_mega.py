"""Multi-document recipes (mergekit-mega): run in order, checked before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.methods.test_per_model_params import interpolate
from tests.recipes._helpers import SHAPES, hf_model, merged, report, run


def mergekit_ties(
    base: torch.Tensor, models: torch.Tensor, weights: list[float], densities: list[float]
) -> torch.Tensor:
    """mergekit 0.1.5's TIES, written out: each tau_i keeps its max(1, int(d_i n)) largest
    |entries| (all at d_i >= 1), a weighted sum >= 0 elects +, the agreeing w_i tau_i are
    summed and divided by the sum of their w_i (1 where that is 0)."""
    weighted = []
    for model, w, d in zip(models, weights, densities, strict=True):
        tau = (model - base).flatten()
        keep = torch.ones_like(tau)
        if d < 1:
            keep = torch.zeros_like(tau)
            keep[tau.abs().topk(max(1, int(d * tau.numel()))).indices] = 1.0
        weighted.append(w * tau * keep)
    stacked = torch.stack(weighted)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked.sign() == sign).float()
    divisor = (torch.tensor(weights)[:, None] * agree).sum(0)
    divisor[divisor == 0] = 1.0
    return base + ((stacked * agree).sum(0) / divisor).view(base.shape)


# mergekit's examples/mega.yml, as published
MEGA_YML = """
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
out_path: ./models/gradient-slerp
---
models:
  - model: ./models/gradient-slerp
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
out_path: ./models/gradient-slerp-ties
"""


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    for seed, name in enumerate("bxy"):
        hf_model(tmp_path / name, seed)
    return tmp_path


def first(tmp: Path) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(tmp / "x"), "parameters": {"weight": 0.3}},
            {"model": str(tmp / "y"), "parameters": {"weight": 0.7}},
        ],
        "out_path": str(tmp / "soup"),
    }


def second(tmp: Path, reads: str = "soup") -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp / "b"),
        "models": [
            {"model": str(tmp / reads), "parameters": {"weight": 0.5}},
            {"model": str(tmp / "x"), "parameters": {"weight": 0.25}},
        ],
        "out_path": str(tmp / "final"),
    }


def write(path: Path, *documents: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all(documents))
    return path


def test_a_chain_equals_its_recipes_run_by_hand(folders: Path) -> None:
    chained = run(["run", str(write(folders / "mega.yml", first(folders), second(folders)))])
    assert chained.exit_code == 0, chained.output
    chain_out = merged(folders / "final")
    by_hand = folders / "hand"
    one = {**first(folders), "out_path": str(by_hand / "soup")}
    two = second(folders)
    two["models"][0]["model"], two["out_path"] = str(by_hand / "soup"), str(by_hand / "final")
    for i, doc in enumerate([one, two]):
        result = run(["run", str(write(folders / f"hand{i}.yml", doc)), "--quiet"])
        assert result.exit_code == 0, result.output
    hand_out = merged(by_hand / "final")
    assert chain_out.keys() == hand_out.keys()
    for name in SHAPES:
        assert torch.equal(chain_out[name], hand_out[name]), name


def test_a_document_runs_after_the_one_whose_output_it_reads(folders: Path) -> None:
    result = run(["run", str(write(folders / "m.yml", second(folders), first(folders)))])
    assert result.exit_code == 0, result.output
    assert result.output.index("merge 1 of 2: " + str(folders / "soup")) < result.output.index(
        "merge 2 of 2: " + str(folders / "final")
    )


def test_a_cycle_is_refused_before_any_work(folders: Path) -> None:
    one = {**first(folders)}
    one["models"] = [{"model": str(folders / "final"), "parameters": {"weight": 1.0}}]
    result = run(["run", str(write(folders / "m.yml", one, second(folders)))])
    assert result.exit_code == 2
    assert "in a cycle: 1 (" in result.output
    assert not (folders / "soup").exists() and not (folders / "final").exists()


def test_a_missing_local_reference_is_refused_before_any_work(folders: Path) -> None:
    two = second(folders)
    two["models"][0]["model"] = "./no-such-model"
    result = run(["run", str(write(folders / "m.yml", first(folders), two))])
    assert result.exit_code == 2
    assert "document 2 reads ./no-such-model, which neither exists" in result.output
    assert not (folders / "soup").exists()


def test_an_unsupported_feature_in_a_later_document_stops_the_chain_before_work(
    folders: Path,
) -> None:
    two = {**second(folders), "merge_method": "model_stock_xyz"}
    result = run(["run", str(write(folders / "m.yml", first(folders), two))])
    assert result.exit_code == 2
    assert "(document 2)" in result.output and "model_stock_xyz" in result.output
    assert not (folders / "soup").exists()


def test_a_failure_stops_the_chain_and_keeps_the_outputs_before_it(folders: Path) -> None:
    (folders / "bad").mkdir()  # a model folder without weights: found only when opened
    two = second(folders)
    two["models"][1]["model"] = str(folders / "bad")
    result = run(["run", str(write(folders / "m.yml", first(folders), two)), "--quiet"])
    assert result.exit_code == 2
    assert "merge 2 of 2" in result.output and "merges 1-1 are complete" in result.output
    soup = merged(folders / "soup")
    x, y = (merged(folders / m) for m in "xy")
    for name in SHAPES:
        torch.testing.assert_close(soup[name], (0.3 * x[name] + 0.7 * y[name]) / 1.0)
    assert not (folders / "final").exists()


LAYERS = 4
LLAMA = {
    "model.embed_tokens.weight": (6, 5),
    **{f"model.layers.{i}.self_attn.q_proj.weight": (5, 5) for i in range(LAYERS)},
    **{f"model.layers.{i}.mlp.down_proj.weight": (5, 6) for i in range(LAYERS)},
    **{f"model.layers.{i}.input_layernorm.weight": (5,) for i in range(LAYERS)},
    "model.norm.weight": (5,),
    "lm_head.weight": (6, 5),
}


def tiny_llama(
    folder: Path, seed: int, base: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Llama-named float32 tensors (a fine-tune near `base` when given) and a config.json."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.randn(shape, generator=gen) * (0.1 if base else 1.0)
        + (base[name] if base else 0.0)
        for name, shape in LLAMA.items()
    }
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_hidden_layers": LAYERS})
    )
    return tensors


def test_mergekits_mega_example_runs_with_per_model_densities_and_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tiny_llama(tmp_path / "llama2", 0)
    repos = {
        "psmathur/orca_mini_v3_13b": 1,
        "garage-bAInd/Platypus2-13B": 2,
        "WizardLM/WizardMath-13B-V1.0": 3,
    }
    text = MEGA_YML.replace("TheBloke/Llama-2-13B-fp16", str(tmp_path / "llama2"))
    text = text.replace("layer_range: [0, 40]", f"layer_range: [0, {LAYERS}]")
    for repo, seed in repos.items():
        tiny_llama(tmp_path / repo, seed, base)
        text = text.replace(repo, str(tmp_path / repo))
    (tmp_path / "mega.yml").write_text(text)
    monkeypatch.chdir(tmp_path)  # the published out_paths are relative: ./models/...

    result = run(["run", "mega.yml", "--quiet"])
    assert result.exit_code == 0, result.output

    slerped = merged(tmp_path / "models" / "gradient-slerp")
    wizard = merged(tmp_path / "WizardLM/WizardMath-13B-V1.0")
    out = merged(tmp_path / "models" / "gradient-slerp-ties")
    recorded = report(tmp_path / "models" / "gradient-slerp-ties")["method"]["per_tensor"]
    for name in LLAMA:
        parts = name.split(".")
        t = int(parts[2]) / (LAYERS - 1) if parts[1] == "layers" else 0.0  # mergekit's depth
        densities = [interpolate([1, 0.7, 0.1], t), 0.33]
        weights = [1.0, 0.5 if "mlp" in name else 0.0]  # WizardMath's filtered weight
        models = torch.stack([slerped[name].float(), wizard[name]])
        expected = mergekit_ties(base[name], models, weights, densities)
        assert out[name].dtype == torch.float16
        torch.testing.assert_close(out[name], expected.half(), rtol=1e-3, atol=1e-3, msg=name)
        assert recorded[name]["density"] == pytest.approx(densities), name


def test_an_output_argument_is_refused_for_a_chain(folders: Path) -> None:
    path = write(folders / "m.yml", first(folders), second(folders))
    result = run(["run", str(path), str(folders / "elsewhere")])
    assert result.exit_code == 2 and "each with its own out_path" in result.output


def test_chain_order_lists_every_document_problem_at_once(tmp_path: Path) -> None:
    from nanmerge import MergeError
    from nanmerge.recipes import chain_order

    docs = [
        {"merge_method": "linear", "models": [{"model": "./x"}], "out_path": "./a"},
        {"merge_method": "linear", "models": [{"model": "./a"}], "out_path": "a"},
        {"merge_method": "linear", "models": [{"model": "./missing"}]},
    ]
    with pytest.raises(MergeError) as info:
        chain_order(docs, "m.yml")
    message = str(info.value)
    assert message.startswith("m.yml holds 3 recipes")
    assert "documents 1 and 2 both write a" in message
    assert "document 3 has no `out_path`" in message
    assert "document 1 reads ./x, which neither exists" in message
    assert "document 3 reads ./missing" in message


def test_chain_order_puts_each_document_after_those_it_reads() -> None:
    from nanmerge.recipes import chain_order

    docs = [
        {"models": [{"model": "out/b"}, {"model": "org/repo"}], "out_path": "out/c"},
        {"models": [{"model": "out/a"}], "out_path": "out/b"},
        {"models": [{"model": "org/repo"}], "out_path": "out/a"},
    ]
    assert chain_order(docs, "m.yml") == [2, 1, 0]

"""Slices: outputs stacked from layer ranges of tiny Llama models, loaded back with
transformers, compared with the source models' own parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import nanmerge
from nanmerge import MergeError
from nanmerge.cli import main

transformers = pytest.importorskip("transformers")

LAYER = "model.layers.{}."
Pair = tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]


def tiny_llama(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def layer(sd: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    prefix = LAYER.format(index)
    return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}


def assert_layer(
    out: dict[str, torch.Tensor], index: int, expected: dict[str, torch.Tensor]
) -> None:
    got = layer(out, index)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value)


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    a, b = tmp_path / "a", tmp_path / "b"
    return a, b, tiny_llama(a, 1), tiny_llama(b, 2)


def load(folder: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return model, {k: v.detach() for k, v in model.state_dict().items()}


def frankenmerge(a: Path, b: Path, out: Path) -> None:
    """Layers 0-2 of `a`, then 1-3 of `b`: six layers."""
    nanmerge.merge(
        {
            "slices": [
                {"sources": [{"model": str(a), "layers": [0, 3]}]},
                {"sources": [{"model": str(b), "layers": [1, 4]}]},
            ],
            "output": str(out),
        }
    )


def test_a_frankenmerge_of_two_four_layer_models_loads_with_six_layers(
    pair: Pair, tmp_path: Path
) -> None:
    a, b, sd_a, sd_b = pair
    out = tmp_path / "out"
    frankenmerge(a, b, out)
    model, sd = load(out)
    assert model.config.num_hidden_layers == 6
    assert len(model.model.layers) == 6
    for i in range(3):
        assert_layer(sd, i, layer(sd_a, i))
        assert_layer(sd, 3 + i, layer(sd_b, 1 + i))
    # mergekit's rule: embeddings from the first slice, final norm and head from the last
    torch.testing.assert_close(sd["model.embed_tokens.weight"], sd_a["model.embed_tokens.weight"])
    torch.testing.assert_close(sd["model.norm.weight"], sd_b["model.norm.weight"])
    torch.testing.assert_close(sd["lm_head.weight"], sd_b["lm_head.weight"])
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 40) and torch.isfinite(logits).all()


def test_a_layer_swap_keeps_outer_layers_and_blends_the_transition(
    pair: Pair, tmp_path: Path
) -> None:
    a, b, sd_a, sd_b = pair
    out = tmp_path / "out"
    swap = {"outer": str(a), "inner": str(b), "layers": 4, "bottom": 1, "top": 1}
    nanmerge.merge({"layer_swap": {**swap, "transition": 1}, "output": str(out)})
    model, sd = load(out)
    assert model.config.num_hidden_layers == 4
    assert_layer(sd, 0, layer(sd_a, 0))
    assert_layer(sd, 3, layer(sd_a, 3))
    for i in (1, 2):  # one transition layer each side: half of each expert
        assert_layer(sd, i, {k: (v + layer(sd_b, i)[k]) / 2 for k, v in layer(sd_a, i).items()})
    nanmerge.merge({"layer_swap": swap, "output": str(out), "overwrite": True})
    _, sd = load(out)
    assert_layer(sd, 0, layer(sd_a, 0))
    assert_layer(sd, 1, layer(sd_b, 1))
    assert_layer(sd, 2, layer(sd_b, 2))
    assert_layer(sd, 3, layer(sd_a, 3))
    torch.testing.assert_close(sd["lm_head.weight"], sd_a["lm_head.weight"])


def test_a_mergekit_passthrough_slices_recipe_runs_unchanged(pair: Pair, tmp_path: Path) -> None:
    a, b, sd_a, sd_b = pair
    recipe = tmp_path / "frankenmerge.yml"
    recipe.write_text(  # mergekit examples/orcamini-platy-44layer.yml, scaled down
        f"slices:\n  - sources:\n    - model: {a}\n      layer_range: [0, 3]\n"
        f"  - sources:\n    - model: {b}\n      layer_range: [1, 4]\n"
        "merge_method: passthrough\ndtype: float32\n"
    )
    result = CliRunner().invoke(main, ["run", str(recipe), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    model, sd = load(tmp_path / "out")
    assert model.config.num_hidden_layers == 6
    assert_layer(sd, 0, layer(sd_a, 0))
    assert_layer(sd, 5, layer(sd_b, 3))


def test_a_mergekit_linear_slice_weights_its_sources(pair: Pair) -> None:
    a, b, sd_a, sd_b = pair
    merged = nanmerge.merge(
        nanmerge.load_recipe(
            {
                "merge_method": "linear",
                "slices": [
                    {
                        "sources": [
                            {"model": str(a), "layer_range": [0, 4], "parameters": {"weight": 3}},
                            {"model": str(b), "layer_range": [0, 4], "parameters": {"weight": 1}},
                        ]
                    }
                ],
            }
        )
    )
    assert isinstance(merged, dict)
    expected = {k: 0.75 * v + 0.25 * layer(sd_b, 2)[k] for k, v in layer(sd_a, 2).items()}
    assert_layer(merged, 2, expected)


def test_a_range_beyond_a_model_names_the_model_and_its_layer_count(pair: Pair) -> None:
    a, b, _, _ = pair
    recipe = {
        "slices": [
            {"sources": [{"model": str(a), "layers": [0, 3]}]},
            {"sources": [{"model": str(b), "layers": [2, 6]}]},
        ]
    }
    with pytest.raises(MergeError) as info:
        nanmerge.merge(recipe)
    message = str(info.value)
    assert f"slices[1].sources[0]: layers [2, 6) reach beyond {b}, which has 4 layers" in message
    assert "1 problem(s)" in message


def test_empty_and_overlapping_ranges_are_recipe_errors(pair: Pair) -> None:
    a, b, _, _ = pair
    with pytest.raises(MergeError, match=r"layer range \[2, 2\] is empty"):
        nanmerge.load_recipe({"slices": [{"sources": [{"model": str(a), "layers": [2, 2]}]}]})
    twice = [{"model": str(a), "layers": [0, 2]}, {"model": str(a), "layers": [1, 3]}]
    with pytest.raises(MergeError, match="overlapping ranges of one model in one slice"):
        nanmerge.load_recipe({"slices": [{"sources": twice, "method": "weight_average"}]})
    swap = {"outer": str(a), "inner": str(b), "layers": 4, "bottom": 2, "top": 2, "transition": 1}
    with pytest.raises(MergeError, match="= 6 layers overlap in a model of 4 layers"):
        nanmerge.load_recipe({"layer_swap": swap})


def test_a_model_without_layer_names_cannot_be_sliced(tmp_path: Path) -> None:
    flat = tmp_path / "flat.safetensors"
    save_file({"encoder.weight": torch.ones(2, 2), "decoder.weight": torch.ones(2)}, flat)
    with pytest.raises(MergeError, match="no tensor name has a layer index"):
        nanmerge.merge({"slices": [{"sources": [{"model": str(flat), "layers": [0, 1]}]}]})


def test_a_passthrough_slice_with_two_sources_is_one_error(pair: Pair) -> None:
    a, b, _, _ = pair
    sources = [{"model": str(a), "layers": [0, 2]}, {"model": str(b), "layers": [0, 2]}]
    with pytest.raises(MergeError) as info:
        nanmerge.merge({"slices": [{"sources": sources}]})
    message = str(info.value)
    assert "1 problem(s)" in message
    assert "slices[0] (2 source(s)): method 'passthrough' needs exactly 1 models" in message


def test_a_slice_without_sources_is_one_error_not_a_missing_models_one_too() -> None:
    with pytest.raises(MergeError) as caught:
        nanmerge.load_recipe({"slices": [{"method": "passthrough"}], "output": "o"})
    assert "has 1 error(s)" in str(caught.value) and "slices.0.sources" in str(caught.value)


def test_a_schedule_runs_over_each_slices_own_layers(pair: Pair, tmp_path: Path) -> None:
    """As mergekit counts depth: layer i of a slice of n layers sits at i / (n - 1), whatever
    the slice's place in the output; tensors outside the blocks take the first value."""
    a, b, _, _ = pair
    halves = [[0, 2], [2, 4]]
    recipe = {
        "base": str(a),
        "method": "slerp",
        "parameters": {"t": {"schedule": [0.2, 0.8]}},
        "slices": [
            {"sources": [{"model": str(m), "layers": span} for m in (a, b)]} for span in halves
        ],
        "output": str(tmp_path / "out"),
    }
    report = nanmerge.merge(recipe)
    assert isinstance(report, dict)
    values = report["method"]["per_tensor"]
    for layer, t in [(0, 0.2), (1, 0.8), (2, 0.2), (3, 0.8)]:
        assert values[f"model.layers.{layer}.mlp.up_proj.weight"]["t"] == pytest.approx(t)
    assert values["model.embed_tokens.weight"]["t"] == pytest.approx(0.2)


def test_a_per_layer_config_list_is_restacked_with_the_layers(pair: Pair, tmp_path: Path) -> None:
    """Qwen3 and Gemma configs name each layer's attention: output layer i takes the entry
    of the layer it was stacked from."""
    a, b, _, _ = pair
    config = json.loads((a / "config.json").read_text())
    kinds = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    (a / "config.json").write_text(json.dumps({**config, "layer_types": kinds}))
    out = tmp_path / "out"
    frankenmerge(a, b, out)
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 6
    assert written["layer_types"] == [kinds[i] for i in (0, 1, 2, 1, 2, 3)]


def test_coefficients_for_passthrough_are_refused_not_ignored(pair: Pair, tmp_path: Path) -> None:
    a = pair[0]
    weighted = {"model": str(a), "layers": [0, 3], "coefficient": 0.5}
    with pytest.raises(MergeError, match="'passthrough' has no coefficient slot"):
        nanmerge.merge({"slices": [{"sources": [weighted]}], "output": str(tmp_path / "o")})
    with pytest.raises(MergeError, match="'passthrough' has no coefficient slot"):
        nanmerge.merge(
            {"models": [str(a)], "method": "passthrough", "coefficients": "nan", "output": "o"}
        )

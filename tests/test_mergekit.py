"""mergekit recipes: translated to nanmerge recipes, and merged to what mergekit computes.

The recipes are mergekit's documentation examples (README, examples/*.yml, the method
guide's two-model slerp), with model names swapped for tiny local checkpoints where a merge
runs. Expected values are mergekit's formulas written out here, not calls into nanmerge.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from nanmerge import MergeError, load_recipe, merge
from nanmerge.cli import main
from nanmerge.recipes import from_mergekit
from tests.conftest import Family, build_family

# mergekit examples/linear.yml
LINEAR_YML = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""
# mergekit README, "ties" example as LLM course notebooks repeat it (single-valued density)
TIES_YML = """
models:
  - model: mistralai/Mistral-7B-v0.1
    # no parameters necessary for base model
  - model: OpenPipe/mistral-ft-optimized-1218
    parameters:
      density: 0.5
      weight: 0.5
  - model: mlabonne/NeuralHermes-2.5-Mistral-7B
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: true
dtype: float16
"""
# mergekit README, dare_ties example
DARE_TIES_YML = """
models:
  - model: mistralai/Mistral-7B-v0.1
    # No parameters necessary for base model
  - model: samir-fama/SamirGPT-v1
    parameters:
      density: 0.53
      weight: 0.4
  - model: abacusai/Slerp-CM-mist-dpo
    parameters:
      density: 0.53
      weight: 0.3
  - model: EmbeddedLLM/Mistral-7B-Merge-14-v0.2
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  int8_mask: true
dtype: bfloat16
"""
# mergekit's method guide: "slerp ... One must be set as base_model", two-model form
SLERP_YML = """
models:
  - model: recoilme/recoilme-gemma-2-9B-v0.4
  - model: lemon07r/Gemma-2-Ataraxy-v2-9B
merge_method: slerp
base_model: recoilme/recoilme-gemma-2-9B-v0.4
dtype: bfloat16
parameters:
  t: 0.25
"""
# mergekit README's full ties example: gradients and filters (not supported)
TIES_GRADIENT_YML = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
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
"""
# mergekit examples/gradient-slerp.yml
GRADIENT_SLERP_YML = """
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
    - value: 0.5
dtype: float16
"""


def translated(text: str) -> dict[str, Any]:
    """from_mergekit of a documented example written for 16-bit compute: its one note says
    that nanmerge computes in float32 (checked here), the rest is returned."""
    recipe = from_mergekit(yaml.safe_load(text))
    notes = recipe.pop("notes")
    assert len(notes) == 1 and "computes in float32" in notes[0], notes
    return recipe


def test_linear_example_is_a_weight_average_with_manual_coefficients() -> None:
    assert translated(LINEAR_YML) == {
        "method": "weight_average",
        "base": None,
        "parameters": {},
        "coefficients": "manual",
        "models": [
            {"path": "psmathur/orca_mini_v3_13b", "coefficient": 1.0},
            {"path": "WizardLM/WizardLM-13B-V1.2", "coefficient": 0.3},
            {"path": "garage-bAInd/Platypus2-13B", "coefficient": 0.5},
        ],
        "dtype": "float16",
    }


def test_ties_example_skips_the_base_entry_and_keeps_mergekit_defaults() -> None:
    assert translated(TIES_YML) == {
        "method": "ties",
        "base": "mistralai/Mistral-7B-v0.1",
        "parameters": {
            "density": 0.5,
            "scale": 1.0,
            "merge": "mean",
            "rescale": "none",
            "conventions": "mergekit",
        },
        "coefficients": "manual",
        "models": [
            {"path": "OpenPipe/mistral-ft-optimized-1218", "coefficient": 0.5},
            {"path": "mlabonne/NeuralHermes-2.5-Mistral-7B", "coefficient": 0.3},
        ],
        "dtype": "float16",
    }


def test_dare_ties_example_sums_without_normalizing_and_ignores_int8_mask() -> None:
    recipe = from_mergekit(yaml.safe_load(DARE_TIES_YML))
    assert recipe["method"] == "dare_ties"
    assert recipe["parameters"] == {
        "density": 0.53,
        "scale": 1.0,
        "merge": "sum",
        "rescale": "l1",
        "conventions": "mergekit",
    }
    assert [m["coefficient"] for m in recipe["models"]] == [0.4, 0.3, 0.3]
    assert recipe["dtype"] == "bfloat16"


def test_slerp_example_puts_base_model_first() -> None:
    recipe = from_mergekit(yaml.safe_load(SLERP_YML))
    assert recipe["method"] == "slerp"
    assert recipe["parameters"] == {"t": 0.25}
    assert [m["path"] for m in recipe["models"]] == [
        "recoilme/recoilme-gemma-2-9B-v0.4",
        "lemon07r/Gemma-2-Ataraxy-v2-9B",
    ]


@pytest.mark.parametrize(
    ("method", "global_params", "expected"),
    [
        ("task_arithmetic", {}, {"scale": 1.0}),
        ("task_arithmetic", {"lambda": 0.7}, {"scale": 0.7}),
        ("dare_linear", {"density": 0.4}, {"density": 0.4, "scale": 1.0, "rescale": "l1"}),
        (
            "breadcrumbs",
            {"density": 0.8, "gamma": 0.02},
            {"density": 0.8, "gamma": 0.02, "scale": 1.0, "rescale": "none"},
        ),
        # mergekit: density 1.0 keeps every entry (its conventions then drop no outliers)
        ("breadcrumbs", {}, {"density": 1.0, "gamma": 0.01, "scale": 1.0, "rescale": "none"}),
        (
            "ties",
            {"normalize": False},
            {"density": 1.0, "scale": 1.0, "merge": "sum", "rescale": "none"},
        ),
    ],
)
def test_method_parameters_take_mergekit_defaults(
    method: str, global_params: dict[str, Any], expected: dict[str, Any]
) -> None:
    data = {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b"}],
        "parameters": {"weight": 0.5, **global_params},
    }
    recipe = from_mergekit(data)
    conventions = {} if method == "task_arithmetic" else {"conventions": "mergekit"}
    assert recipe["method"] == method and recipe["parameters"] == expected | conventions
    assert [m["coefficient"] for m in recipe["models"]] == [1.0, 0.5]


def test_normalize_on_task_arithmetic_divides_the_weights_by_their_sum() -> None:
    data = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 1.0}},
            {"model": "b", "parameters": {"weight": 3.0}},
        ],
        "parameters": {"normalize": True},
    }
    assert [m["coefficient"] for m in from_mergekit(data)["models"]] == [0.25, 0.75]


def test_coefficients_extension_replaces_weights_and_keeps_nanmerge_fields() -> None:
    data = yaml.safe_load(DARE_TIES_YML.replace("weight: 0.4", "weight: 0.3"))
    recipe = from_mergekit({**data, "coefficients": "nan", "output": "out", "seed": 3})
    assert recipe["coefficients"] == "nan"
    assert all("coefficient" not in m for m in recipe["models"])
    # one shared weight of 0.3 is a common scale of the (unnormalized) dare_ties sum
    assert recipe["parameters"]["scale"] == pytest.approx(0.3)
    assert recipe["output"] == "out" and recipe["seed"] == 3
    assert load_recipe({**data, "coefficients": "nan"}).coefficients.estimator == "nan"


def test_tokenizer_source_base_becomes_the_tokenizer_field() -> None:
    recipe = from_mergekit({**yaml.safe_load(TIES_YML), "tokenizer_source": "base"})
    assert recipe["method"] == "ties" and recipe["tokenizer"] == {"source": "base"}


def test_mergekit_base_plus_lora_syntax_reads_the_adapter_over_the_base() -> None:
    data = {
        "merge_method": "task_arithmetic",
        "base_model": "org/base",
        "models": [{"model": "org/base+./adapter", "parameters": {"weight": 1.0}}],
    }
    assert from_mergekit(data)["models"] == [{"path": "./adapter", "coefficient": 1.0}]


def test_gradients_filters_and_differing_densities_translate_to_per_model_values() -> None:
    recipe = from_mergekit(yaml.safe_load(TIES_GRADIENT_YML), where="ties.yml")
    assert "density" not in recipe["parameters"]
    assert [m["parameters"] for m in recipe["models"]] == [
        {"density": {"schedule": [1, 0.7, 0.1]}},
        {"density": 0.5},
        {"density": 0.33},
    ]
    data = yaml.safe_load(TIES_GRADIENT_YML)
    for entry in data["models"][1:]:
        entry["parameters"]["density"] = [1, 0.7, 0.1]
    recipe = from_mergekit(data)
    assert recipe["parameters"]["density"] == {"schedule": [1, 0.7, 0.1]}
    assert [m.get("coefficient") for m in recipe["models"]] == [
        1.0,
        {"schedule": [0, 0.3, 0.7, 1]},
        [{"filter": "mlp", "value": 0.5}, {"value": 0}],
    ]


def test_slices_filters_and_other_methods_are_listed_in_one_error() -> None:
    data = {
        "merge_method": "not_a_mergekit_method",
        "base_model": "b",
        "models": [{"model": "a"}],
        "tokenizer": {"source": "union", "tokens": {"<x>": {"source": "a"}}},
        "chat_template": "llama3",
    }
    with pytest.raises(MergeError) as info:
        from_mergekit(data)
    message = str(info.value)
    assert "3 feature(s)" in message
    for text in ("merge_method 'not_a_mergekit_method'", "tokenizer tokens", "chat_template"):
        assert text in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"parameters": {"rescale": "yes"}}, "rescale 'yes' on dare_ties (true or false)"),
        (
            {"merge_method": "della", "parameters": {"density": 0.9}},
            "density 0.9 with epsilon 0.15 of model a: keep probabilities density ± epsilon "
            "reach [0.75, 1.05], outside (0, 1]",
        ),
        (
            {"models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "c"}]},
            "`weight` missing on model(s) c",
        ),
        (
            {"models": [{"model": "a", "parameters": {"weight": 1, "epsilon": 0.1}}]},
            "parameter 'epsilon' of model a",
        ),
        (
            {
                "coefficients": "nan",
                "models": [
                    {"model": "a", "parameters": {"weight": 1}},
                    {"model": "c", "parameters": {"weight": 2}},
                ],
            },
            "together with `coefficients`",
        ),
        ({"dtype": "int4"}, "dtype 'int4'"),
        ({"parameters": {"lambda": "big"}}, "parameters that must be numbers: 'lambda' = 'big'"),
    ],
)
def test_what_nanmerge_cannot_reproduce_is_a_clear_error(
    change: dict[str, Any], expected: str
) -> None:
    data = {
        "merge_method": "dare_ties",
        "base_model": "b",
        "models": [{"model": "a", "parameters": {"weight": 1.0}}],
        **change,
    }
    with pytest.raises(MergeError) as info:
        from_mergekit(data)
    assert expected in str(info.value)


# --- end to end: mergekit YAML through `nanmerge run` on tiny checkpoints ---------------


def run_mergekit_yaml(tmp_path: Path, text: str, family: Family) -> dict[str, torch.Tensor]:
    """Swap the documented model names for the family's files, run the CLI, load the output."""
    data = yaml.safe_load(text)
    names = list(dict.fromkeys([data.get("base_model")] + [m["model"] for m in data["models"]]))
    names = [n for n in names if n is not None]
    paths = (
        [str(family.base), *map(str, family.models)]
        if data.get("base_model")
        else [str(p) for p in family.models]
    )
    mapping = dict(zip(names, paths, strict=False))
    if data.get("base_model"):
        data["base_model"] = mapping[data["base_model"]]
    for entry in data["models"]:
        entry["model"] = mapping[entry["model"]]
    data["dtype"] = "float32"
    data["output"] = str(tmp_path / "out")
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    return load_file(tmp_path / "out" / "model.safetensors")


def taus(family: Family, name: str) -> torch.Tensor:
    return torch.stack([m[name] - family.base_tensors[name] for m in family.model_tensors])


def topk_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's magnitude sparsification: keep the int(density * numel) largest |entries|."""
    flat = tau.abs().flatten()
    k = int(density * flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.argsort(descending=True)[:k]] = True
    return mask.reshape(tau.shape)


def mergekit_ties(family: Family, name: str, weights: list[float], density: float) -> torch.Tensor:
    """mergekit's GTA with magnitude pruning, sum consensus and normalize: true, written out."""
    t = taus(family, name)
    t = torch.stack([x * topk_mask(x, density) for x in t])
    w = torch.tensor(weights).reshape(-1, *[1] * (t.dim() - 1))
    weighted = w * t
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    mask = weighted.sign() == majority
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    return family.base_tensors[name] + (weighted * mask).sum(0) / divisor


@pytest.fixture
def family2(tmp_path: Path) -> Family:
    # density 0.5 keeps a whole number of entries in every tensor (12, 4 and 8 entries)
    return build_family(tmp_path / "in", m=2)


def test_linear_yaml_merges_to_the_normalized_weighted_sum(tmp_path: Path) -> None:
    family = build_family(tmp_path / "in", m=3)
    merged = run_mergekit_yaml(tmp_path, LINEAR_YML, family)
    w = [1.0, 0.3, 0.5]
    for name in ("layer.weight", "layer.bias", "head.weight"):
        expected = sum(wi * m[name] for wi, m in zip(w, family.model_tensors, strict=True))
        torch.testing.assert_close(merged[name], expected / sum(w))


def test_ties_yaml_merges_as_mergekit_computes(tmp_path: Path, family2: Family) -> None:
    merged = run_mergekit_yaml(tmp_path, TIES_YML, family2)
    for name in ("layer.weight", "layer.bias", "head.weight"):
        expected = mergekit_ties(family2, name, [0.5, 0.3], 0.5)
        torch.testing.assert_close(merged[name], expected)
    assert torch.equal(merged["position_ids"], family2.base_tensors["position_ids"])


def test_dare_ties_at_density_one_is_the_sign_consensus_sum(tmp_path: Path) -> None:
    family = build_family(tmp_path / "in", m=3)
    merged = run_mergekit_yaml(tmp_path, DARE_TIES_YML.replace("0.53", "1.0"), family)
    w = torch.tensor([0.4, 0.3, 0.3]).reshape(-1, 1, 1)
    weighted = w * taus(family, "layer.weight")
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    expected = family.base_tensors["layer.weight"] + (weighted * (weighted.sign() == majority)).sum(
        0
    )
    torch.testing.assert_close(merged["layer.weight"], expected)


@pytest.mark.parametrize("method", ["task_arithmetic", "breadcrumbs", "dare_linear"])
def test_task_vector_methods_at_mergekit_defaults_are_lambda_times_weighted_sum(
    tmp_path: Path, family2: Family, method: str
) -> None:
    text = f"""
models:
  - model: base
  - model: a
    parameters:
      weight: 0.6
  - model: b
    parameters:
      weight: 0.9
merge_method: {method}
base_model: base
parameters:
  lambda: 0.5
"""
    merged = run_mergekit_yaml(tmp_path, text, family2)
    for name in ("layer.weight", "head.weight"):
        t = taus(family2, name)
        expected = family2.base_tensors[name] + 0.5 * (0.6 * t[0] + 0.9 * t[1])
        torch.testing.assert_close(merged[name], expected)


def test_slerp_yaml_interpolates_from_base_model(tmp_path: Path, family2: Family) -> None:
    merged = run_mergekit_yaml(tmp_path, SLERP_YML, family2)
    t = 0.25
    for name in ("layer.weight", "head.weight"):
        v0, v1 = family2.base_tensors[name].double(), family2.model_tensors[0][name].double()
        cos = float((v0 / v0.norm()).flatten() @ (v1 / v1.norm()).flatten())
        theta = math.acos(cos)
        expected = (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)
        torch.testing.assert_close(merged[name], expected.float())


def test_nan_coefficients_in_a_mergekit_recipe_match_the_native_recipe(
    tmp_path: Path, family2: Family
) -> None:
    text = TIES_YML + "coefficients: nan\n"
    text = text.replace("weight: 0.5", "weight: 1.0").replace("weight: 0.3", "weight: 1.0")
    merged = run_mergekit_yaml(tmp_path, text, family2)
    native = merge(
        {
            "base": str(family2.base),
            "models": [str(p) for p in family2.models],
            "method": "ties",
            "parameters": {"density": 0.5, "merge": "mean", "conventions": "mergekit"},
            "coefficients": "nan",
        }
    )
    assert isinstance(native, dict)
    for name, tensor in native.items():
        torch.testing.assert_close(merged[name], tensor)
    report = yaml.safe_load((tmp_path / "out" / "merge_report.json").read_text())
    assert report["coefficients"]["estimator"] == "nan"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"parameters": [1]}, "parameters is a list, not a mapping"),
        ({"parameters": "x"}, "parameters is a str, not a mapping"),
        (
            {"models": [{"model": "a", "parameters": [0.5]}]},
            "parameters of models[0] is a list",
        ),
        ({"dtype": ["bf16"]}, "dtype '['bf16']'"),
        ({"out_dtype": {"a": 1}}, "dtype '{'a': 1}'"),
    ],
)
def test_mergekit_fields_of_the_wrong_type_are_listed_not_raised(
    fields: dict[str, Any], says: str
) -> None:
    data = {"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], **fields}
    with pytest.raises(MergeError, match="mergekit recipe") as info:
        from_mergekit(data)
    assert says in str(info.value)


# --- gradients and filters ----------------------------------------------------------------


def gradient_slerp_models_form() -> str:
    """examples/gradient-slerp.yml in the `models:` form its own comment gives (the slices
    form needs per-slice depth, which the slices translation owns)."""
    data = yaml.safe_load(GRADIENT_SLERP_YML)
    data["models"] = [{"model": s["model"]} for s in data.pop("slices")[0]["sources"]]
    return yaml.safe_dump(data)


SLERP_LAYERS = 5
SLERP_NAMES = [
    "model.embed_tokens.weight",
    *(
        f"model.layers.{i}.{part}.weight"
        for i in range(SLERP_LAYERS)
        for part in ("self_attn.q_proj", "mlp.down_proj", "input_layernorm")
    ),
    "model.norm.weight",
    "lm_head.weight",
]


def test_gradient_slerp_filters_become_schedules() -> None:
    recipe = from_mergekit(yaml.safe_load(gradient_slerp_models_form()))
    assert recipe["parameters"]["t"] == [
        {"filter": "self_attn", "value": {"schedule": [0, 0.5, 0.3, 0.7, 1]}},
        {"filter": "mlp", "value": {"schedule": [1, 0.5, 0.7, 0.3, 0]}},
        {"value": 0.5},
    ]


def test_filter_list_without_default_falls_back_as_mergekit_does() -> None:
    """mergekit reads the next scope when no filter matches: the global value, then its
    default (density 1.0)."""
    data = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [
            {"model": m, "parameters": {"density": [{"filter": "mlp", "value": [0.2, 0.4]}]}}
            for m in ("x", "y")
        ],
        "parameters": {"lambda": [{"filter": "attn", "value": 0.5}]},
    }
    recipe = from_mergekit(data)
    assert recipe["parameters"]["density"] == [
        {"filter": "mlp", "value": {"schedule": [0.2, 0.4]}},
        {"value": 1.0},
    ]
    assert recipe["parameters"]["scale"] == [{"filter": "attn", "value": 0.5}, {"value": 1.0}]


def mergekit_t(name: str) -> float:
    """examples/gradient-slerp.yml's t for one tensor, by mergekit's rules written out:
    first filter that is a part of the name, layer i of n at i / (n - 1), t = 0 outside the
    blocks, linear between the gradient's evenly spaced values."""
    gradients = {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0]}
    values = next((v for key, v in gradients.items() if key in name), None)
    if values is None:
        return 0.5
    parts = name.split(".")
    position = int(parts[2]) / (SLERP_LAYERS - 1) * (len(values) - 1)
    left = int(position)
    right = min(left + 1, len(values) - 1)
    return values[left] + (position - left) * (values[right] - values[left])


def test_gradient_slerp_runs_with_each_tensors_t(tmp_path: Path) -> None:
    shapes = {n: (4,) if n.endswith("norm.weight") else (4, 3) for n in SLERP_NAMES}
    family = build_family(tmp_path / "in", m=2, shapes=shapes, delta_scales=(1.0, 0.0))
    family.model_tensors = family.model_tensors[:1]  # base_model plus one other model
    merged = run_mergekit_yaml(tmp_path, gradient_slerp_models_form(), family)
    for name in SLERP_NAMES:
        t = mergekit_t(name)
        v0, v1 = family.base_tensors[name].double(), family.model_tensors[0][name].double()
        cos = float((v0 / v0.norm()).flatten() @ (v1 / v1.norm()).flatten())
        theta = math.acos(cos)
        expected = (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)
        torch.testing.assert_close(merged[name], expected.float(), msg=name)


def test_gradient_slerp_as_published_in_slices_form_equals_its_models_form(
    tmp_path: Path,
) -> None:
    """mergekit's example file, unchanged but for the model paths: one slice over every layer
    is the whole output, so its gradients run over the output's layers."""
    shapes = {n: (4,) if n.endswith("norm.weight") else (4, 3) for n in SLERP_NAMES}
    family = build_family(tmp_path / "in", m=2, shapes=shapes, delta_scales=(1.0, 0.0))
    family.model_tensors = family.model_tensors[:1]
    (tmp_path / "models").mkdir()
    by_models = run_mergekit_yaml(tmp_path / "models", gradient_slerp_models_form(), family)
    data = yaml.safe_load(GRADIENT_SLERP_YML)
    paths = {"psmathur/orca_mini_v3_13b": str(family.base)}
    paths["garage-bAInd/Platypus2-13B"] = str(family.models[0])
    for source in data["slices"][0]["sources"]:
        source["model"], source["layer_range"] = paths[source["model"]], [0, SLERP_LAYERS]
    data |= {"base_model": str(family.base), "dtype": "float32", "output": str(tmp_path / "s")}
    (tmp_path / "slices.yml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "slices.yml"), "--quiet"])
    assert result.exit_code == 0, result.output
    by_slices = load_file(tmp_path / "s" / "model.safetensors")
    assert by_slices.keys() == by_models.keys()
    for name, tensor in by_models.items():
        assert torch.equal(by_slices[name], tensor), name

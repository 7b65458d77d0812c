"""Per-model parameters: a density (and breadcrumbs' gamma) given once per model, in direct
calls and in recipes, against the formulas written out here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nanmerge import MergeError, load_recipe, merge
from nanmerge.engine import check_recipe
from nanmerge.methods import METHODS, tensor_generator
from tests.conftest import Family, build_family


def stack(seed: int, m: int = 3, shape: tuple[int, ...] = (6, 7)) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return base, base + torch.randn((m, *shape), generator=gen)


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """1 at the k largest |values| (random floats: no ties), by sorting."""
    order = values.abs().flatten().argsort(descending=True)
    mask = torch.zeros(values.numel())
    mask[order[:k]] = 1.0
    return mask.view(values.shape)


def kept(fraction: float, n: int) -> int:
    return max(1, math.floor(fraction * n + 0.5))  # round half up, at least one


def ties_formula(
    base: torch.Tensor, models: torch.Tensor, weights: list[float], densities: list[float]
) -> torch.Tensor:
    """TIES with one density per model: trim each tau_i to its own top k_i, elect the sign
    of sum_i w_i tau_i, average the agreeing w_i tau_i by the sum of their w_i."""
    n = base.numel()
    trimmed = [
        w * (t - base) * top_k_mask(t - base, kept(d, n))
        for t, w, d in zip(models, weights, densities, strict=True)
    ]
    sign = torch.sign(sum(trimmed))
    agree = [(torch.sign(x) == sign) & (sign != 0) for x in trimmed]
    total = sum(x * a for x, a in zip(trimmed, agree, strict=True))
    divisor = sum(w * a.float() for w, a in zip(weights, agree, strict=True))
    return base + torch.where(divisor != 0, total / divisor, torch.zeros(()))


def test_ties_trims_each_model_at_its_own_density() -> None:
    base, models = stack(0)
    coef = torch.tensor([1.0, 0.5, 2.0])
    out = METHODS["ties"].fn(models, coef, base=base, density=(0.2, 0.5, 0.9), scale=1.0)
    torch.testing.assert_close(out, ties_formula(base, models, [1.0, 0.5, 2.0], [0.2, 0.5, 0.9]))


def test_breadcrumbs_drops_each_models_own_top_and_keeps_its_own_band() -> None:
    base, models = stack(1, m=2, shape=(10, 10))
    out = METHODS["breadcrumbs"].fn(
        models, torch.ones(2), base=base, density=(0.3, 0.6), gamma=(0.1, 0.0), scale=1.0
    )
    expected = base.clone()
    for t, d, g in zip(models, (0.3, 0.6), (0.1, 0.0), strict=True):
        tau = t - base
        top = kept(g, 100) if g else 0
        expected += tau * (top_k_mask(tau, top + kept(d, 100)) - top_k_mask(tau, top))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_each_dare_model_is_masked_as_with_its_density_alone(method: str) -> None:
    """Draws are shared: model i's masked, rescaled task vector under (0.3, 0.8) is the one
    a shared density d_i gives it (seen by giving only model i a coefficient)."""
    base, models = stack(2, m=2, shape=(300, 300))
    fn, extra = METHODS[method].fn, {"merge": "sum"} if method == "dare_ties" else {}
    for i, alone in enumerate((0.3, 0.8)):
        both, shared = (
            fn(models, torch.eye(2)[i], base=base, density=d, scale=1.0, **extra,
               generator=tensor_generator(5, "t"))
            for d in ((0.3, 0.8), alone)
        )  # fmt: skip
        assert torch.equal(both, shared)
        kept_share = float(((both - base) != 0).float().mean())
        assert abs(kept_share - alone) < 0.01


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"density": 0.3}),
        ("breadcrumbs", {"density": 0.5, "gamma": 0.05}),
        ("dare_ties", {"density": 0.4}),
        ("dare_linear", {"density": 0.7}),
    ],
)
@pytest.mark.parametrize("shape", [(5, 7), (600, 500)])  # the second: the sampled cut's path
def test_one_value_per_model_equal_for_all_is_bit_identical_to_one_shared_value(
    method: str, params: dict[str, float], shape: tuple[int, int]
) -> None:
    base, models = stack(3, shape=shape)
    coef = torch.tensor([0.5, 1.0, 0.25])
    fn = METHODS[method].fn
    dare = method.startswith("dare")

    def run(values: dict[str, object]) -> torch.Tensor:
        extra = {"generator": tensor_generator(7, "t")} if dare else {}
        return fn(models.clone(), coef, base=base, **values, **extra)

    spread = {k: (v,) * 3 for k, v in params.items()}
    assert torch.equal(run(params), run(spread))


def test_a_count_that_is_not_one_per_model_is_refused() -> None:
    base, models = stack(4)
    with pytest.raises(MergeError, match="gives 2 per-model values for 3 models"):
        METHODS["ties"].fn(models, torch.ones(3), base=base, density=(0.2, 0.5))


def test_every_bad_per_model_value_is_reported_with_its_model() -> None:
    base, models = stack(4)
    with pytest.raises(MergeError) as info:
        METHODS["breadcrumbs"].fn(
            models, torch.ones(3), base=base, density=(0.9, 1.5, 0.5), gamma=(0.0, 0.0, -1.0)
        )
    message = str(info.value)
    assert "'density' of model 2 = 1.5 is invalid" in message
    assert "'gamma' of model 3 = -1.0 is invalid" in message


def test_per_model_values_that_contradict_each_other_name_the_model() -> None:
    base, models = stack(4)
    with pytest.raises(MergeError) as info:
        METHODS["breadcrumbs"].fn(
            models, torch.ones(3), base=base, density=(0.9, 0.5, 0.5), gamma=(0.2, 0.1, 0.1)
        )
    assert "model 1's values: parameters gamma = 0.2 and density = 0.9 sum to 1.1" in str(
        info.value
    )
    assert "model 2" not in str(info.value)


def test_per_model_density_with_a_whole_model_trim_is_refused() -> None:
    base, models = stack(4)
    with pytest.raises(MergeError, match="trim_scope: tensor"):
        METHODS["ties"].fn(
            models, torch.ones(3), base=base, density=(0.2, 0.5, 0.5), trim_scope="model"
        )


def test_a_parameter_that_is_not_per_model_refuses_a_tuple() -> None:
    base, models = stack(4)
    with pytest.raises(MergeError, match=r"'scale' = \(1.0, 1.0, 1.0\) is invalid"):
        METHODS["ties"].fn(models, torch.ones(3), base=base, scale=(1.0, 1.0, 1.0))


# --- recipes ---------------------------------------------------------------------------

LAYERS = 3
NAMES = [
    "model.embed_tokens.weight",
    *(f"model.layers.{i}.mlp.down_proj.weight" for i in range(LAYERS)),
    *(f"model.layers.{i}.self_attn.q_proj.weight" for i in range(LAYERS)),
    "lm_head.weight",
]


@pytest.fixture
def llama(tmp_path: Path) -> Family:
    return build_family(tmp_path / "llama", m=2, shapes={n: (6, 5) for n in NAMES})


def interpolate(values: list[float], t: float) -> float:
    """mergekit's gradient: evenly spaced values, linear between neighbours."""
    scaled = t * (len(values) - 1)
    low = math.floor(scaled)
    high = min(len(values) - 1, low + 1)
    return values[low] + (scaled - low) * (values[high] - values[low])


def depth(name: str) -> float:
    parts = name.split(".")
    return int(parts[2]) / (LAYERS - 1) if parts[1] == "layers" else 0.0


def test_a_density_gradient_per_model_trims_each_layer_at_that_models_density(
    llama: Family, tmp_path: Path
) -> None:
    gradient = [1.0, 0.7, 0.1]
    report = merge(
        {
            "base": str(llama.base),
            "method": "ties",
            "models": [
                {"path": str(llama.models[0]), "parameters": {"density": {"schedule": gradient}}},
                {"path": str(llama.models[1]), "parameters": {"density": 0.33}},
            ],
            "parameters": {"scale": 1.0},
            "output": str(tmp_path / "out"),
        }
    )
    from safetensors.torch import load_file

    out = load_file(tmp_path / "out" / "model.safetensors")
    for name in NAMES:
        densities = [interpolate(gradient, depth(name)), 0.33]
        models = torch.stack([t[name] for t in llama.model_tensors])
        expected = ties_formula(llama.base_tensors[name], models, [1.0, 1.0], densities)
        torch.testing.assert_close(out[name], expected, msg=name)
        recorded = report["method"]["per_tensor"][name]["density"]
        assert recorded == pytest.approx(densities), name


def test_equal_model_values_merge_bit_for_bit_as_the_recipes_one_value(llama: Family) -> None:
    def recipe(models: list[dict[str, object]], params: dict[str, object]) -> dict[str, object]:
        return {"base": str(llama.base), "method": "ties", "models": models, "parameters": params}

    shared = merge(recipe([{"path": str(p)} for p in llama.models], {"density": 0.4}))
    own = [{"path": str(p), "parameters": {"density": 0.4}} for p in llama.models]
    each = merge(recipe(own, {}))
    assert all(torch.equal(shared[n], each[n]) for n in NAMES)


def test_a_model_value_for_a_parameter_that_is_not_per_model_is_refused_before_work(
    llama: Family,
) -> None:
    recipe = {
        "base": str(llama.base),
        "method": "ties",
        "models": [
            {"path": str(llama.models[0]), "parameters": {"scale": 0.5, "density": 1.5}},
            {"path": str(llama.models[1]), "parameters": {"density": [{"value": 0.0}]}},
        ],
    }
    with pytest.raises(MergeError) as info:
        check_recipe(load_recipe(recipe))
    message = str(info.value)
    assert "models[0].parameters.scale: method 'ties' takes one `scale` for every model" in message
    assert "models[0].parameters.density: ties: parameter 'density' = 1.5 is invalid" in message
    assert "models[1].parameters.density: ties: parameter 'density' = 0.0 is invalid" in message


def test_per_model_values_that_contradict_at_some_tensor_are_refused(llama: Family) -> None:
    recipe = {
        "base": str(llama.base),
        "method": "breadcrumbs",
        "parameters": {"gamma": 0.2},
        "models": [
            {
                "path": str(llama.models[0]),
                "parameters": {"density": [{"filter": "mlp", "value": 0.9}, {"value": 0.5}]},
            },
            {"path": str(llama.models[1]), "parameters": {"density": 0.5}},
        ],
    }
    with pytest.raises(MergeError) as info:
        merge(recipe)
    message = str(info.value)
    assert "model 1's values: parameters gamma = 0.2 and density = 0.9" in message
    assert "mlp.down_proj.weight" in message


def test_per_model_density_with_trim_scope_model_is_refused_in_a_recipe(llama: Family) -> None:
    recipe = {
        "base": str(llama.base),
        "method": "ties",
        "parameters": {"trim_scope": "model"},
        "models": [
            {"path": str(llama.models[0]), "parameters": {"density": 0.2}},
            {"path": str(llama.models[1]), "parameters": {"density": 0.4}},
        ],
    }
    with pytest.raises(MergeError, match="models' own density: method 'ties' gathers"):
        check_recipe(load_recipe(recipe))

"""Schedules over depth and filters: values against hand computation and mergekit's formula."""

from __future__ import annotations

import pytest

from nanmerge._schedule import (
    Entry,
    Filtered,
    Schedule,
    Unmatched,
    depth,
    extremes,
    interpolate,
    parse,
    value_at,
)
from nanmerge._types import TensorContext


def ctx(name: str, layer: int | None = None, num_layers: int | None = None, role: str = "mlp"):
    return TensorContext(name, layer, num_layers, role)  # type: ignore[arg-type]


def mergekit_gradient(values: list[float], layer: int, num_layers: int) -> float:
    """mergekit 0.1.5 written out: t = layer / (n - 1) (1 for a single layer), then linear
    interpolation between the two nearest of the evenly spaced values."""
    t = layer / (num_layers - 1) if num_layers > 1 else 1.0
    position = t * (len(values) - 1)
    left = int(position)
    right = min(left + 1, len(values) - 1)
    weight = position - left
    return values[left] * (1 - weight) + values[right] * weight


def test_schedule_interpolates_hand_values() -> None:
    # 5 layers over [0.2, 1.0]: t = 0, .25, .5, .75, 1 -> 0.2, 0.4, 0.6, 0.8, 1.0
    got = [interpolate([0.2, 1.0], depth(ctx("x", i, 5))) for i in range(5)]
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    # 3 values over 5 layers: layer 1 is halfway between v0 and v1
    assert interpolate([0.0, 1.0, 0.5], depth(ctx("x", 1, 5))) == pytest.approx(0.5)
    assert interpolate([0.0, 1.0, 0.5], depth(ctx("x", 3, 5))) == pytest.approx(0.75)


@pytest.mark.parametrize("num_layers", [1, 2, 7, 40])
@pytest.mark.parametrize("values", [[0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0], [0.25]])
def test_schedule_equals_mergekit_gradient_bit_for_bit(num_layers: int, values: list) -> None:
    for layer in range(num_layers):
        got = interpolate(values, depth(ctx("x", layer, num_layers)))
        assert got == mergekit_gradient(values, layer, num_layers)


def test_tensors_outside_blocks_take_the_first_value_as_in_mergekit() -> None:
    # mergekit plans embeddings, the final norm and the head with t = 0
    for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]:
        assert value_at(Schedule((0.1, 0.9)), ctx(name)) == 0.1


def test_first_matching_filter_wins_and_the_last_entry_is_the_default() -> None:
    setting = parse(
        [
            {"filter": "self_attn", "value": 1.0},
            {"role": "mlp", "value": 2.0},
            {"filter": "layers.0", "value": 3.0},
            {"value": 4.0},
        ],
        "t",
        problems := [],
    )
    assert problems == []
    q = ctx("model.layers.0.self_attn.q_proj.weight", 0, 2, "attention")
    down = ctx("model.layers.0.mlp.down_proj.weight", 0, 2, "mlp")
    norm = ctx("model.layers.0.input_layernorm.weight", 0, 2, "norm")
    head = ctx("lm_head.weight", role="head")
    assert [value_at(setting, c) for c in (q, down, norm, head)] == [1.0, 2.0, 3.0, 4.0]


def test_filter_matches_a_part_of_the_name_and_star_matches_all() -> None:
    setting = Filtered((Entry(5.0, pattern="mlp"), Entry(6.0, pattern="*")))
    assert value_at(setting, ctx("a.mlp.b")) == 5.0
    assert value_at(setting, ctx("a.attn.b", role="attention")) == 6.0


def test_filter_list_without_default_leaves_a_tensor_unmatched() -> None:
    setting = Filtered((Entry(1.0, pattern="mlp"),))
    with pytest.raises(Unmatched):
        value_at(setting, ctx("lm_head.weight", role="head"))


def test_filter_value_may_be_a_schedule() -> None:
    setting = parse([{"role": "mlp", "value": {"schedule": [0, 1]}}, {"value": 9}], "x", [])
    assert value_at(setting, ctx("m.layers.2.mlp.w", 2, 5)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"schedule": []}, "`schedule` has no values"),
        ({"schedule": ["a"]}, "must list numbers"),
        ([], "the filter list is empty"),
        ([{"filter": "mlp"}], "is not a filter entry"),
        ([{"role": "mlps", "value": 1}], "role 'mlps' is unknown"),
        ({"steps": [1]}, "neither a single value nor {schedule: [numbers]}"),
    ],
)
def test_malformed_settings_say_what_is_wrong(value: object, expected: str) -> None:
    problems: list[str] = []
    parse(value, "parameters.scale", problems)
    assert len(problems) == 1 and expected in problems[0]
    assert problems[0].startswith("parameters.scale")


def test_extremes_are_the_smallest_and_largest_value_anywhere() -> None:
    setting = parse([{"role": "mlp", "value": {"schedule": [0.5, 2.0]}}, {"value": -1}], "", [])
    assert extremes(setting) == [-1, 2.0]

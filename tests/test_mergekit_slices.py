"""mergekit `slices` recipes translated into nanmerge slices; problems in one message."""

from __future__ import annotations

import pytest
import yaml

from nanmerge import MergeError
from nanmerge.recipes import from_mergekit

# mergekit examples/orcamini-platy-44layer.yml
ORCAMINI_YML = """
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
"""


def test_the_orcamini_frankenmerge_translates_to_passthrough_slices() -> None:
    recipe = from_mergekit(yaml.safe_load(ORCAMINI_YML))
    assert "computes in float32" in recipe.pop("notes")[0]  # dtype: float16 is compute's
    assert recipe == {
        "method": "passthrough",
        "base": None,
        "slices": [
            {
                "sources": [{"model": "psmathur/orca_mini_v3_13b", "layers": [0, 24]}],
                "parameters": {},
            },
            {
                "sources": [{"model": "garage-bAInd/Platypus2-13B", "layers": [20, 40]}],
                "parameters": {},
            },
        ],
        "dtype": "float16",
    }


def test_a_slerp_slice_puts_base_model_first_and_takes_t_from_the_slice() -> None:
    data = {
        "merge_method": "slerp",
        "base_model": "a",
        "slices": [
            {
                "sources": [
                    {"model": "b", "layer_range": [0, 8]},
                    {"model": "a", "layer_range": [0, 8]},
                ],
                "parameters": {"t": 0.25},
            }
        ],
    }
    recipe = from_mergekit(data)
    assert recipe["slices"] == [
        {
            "sources": [{"model": "a", "layers": [0, 8]}, {"model": "b", "layers": [0, 8]}],
            "parameters": {"t": 0.25},
        }
    ]


def test_a_slices_recipe_problem_is_one_message_without_follow_on_errors() -> None:
    data = yaml.safe_load(ORCAMINI_YML)
    data["slices"][1]["sources"][0]["layer_range"] = [20]
    with pytest.raises(MergeError) as info:
        from_mergekit(data)
    message = str(info.value)
    assert "using 1 feature(s)" in message
    assert "slices[1].sources[0] is not {model, layer_range: [first, end]}" in message
    assert "slerp" not in message and "models" not in message.split("\n", 1)[1]

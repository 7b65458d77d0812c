"""PEFT LoRA adapters read as full models over their base: W0 + scaling * B @ A per tensor."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from nanmerge import MergeError, merge
from nanmerge.io import LoraAdapter, is_lora_adapter, open_checkpoint, open_model
from tests.hub_cache import add_to_hub_cache, use_hub_cache

PREFIX = "base_model.model."


def write_adapter(
    folder: Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    extra: dict[str, torch.Tensor] | None = None,
    embedding: tuple[str, ...] = (),
    **config: Any,
) -> Path:
    """An adapter folder in PEFT's saved layout: module -> (A, B), plus full tensors in `extra`."""
    folder.mkdir(parents=True)
    tensors = {}
    for module, (a, b) in factors.items():
        if module in embedding:
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = a
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = b
        else:
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b
    tensors.update(extra or {})
    save_file(tensors, folder / "adapter_model.safetensors")
    settings = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": list(factors)}
    (folder / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    return folder


@pytest.fixture
def base_tensors(tmp_path: Path) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "q.weight": torch.randn(4, 3, generator=gen),
        "q.bias": torch.randn(4, generator=gen),
        "v.weight": torch.randn(5, 3, generator=gen),
        "embed.weight": torch.randn(6, 3, generator=gen),
        "position_ids": torch.arange(3),
    }
    save_file(tensors, tmp_path / "base.safetensors")
    return tensors


def factors(out: int, inp: int, r: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen)


def open_over_base(tmp_path: Path, adapter: Path) -> LoraAdapter:
    reader = open_model(adapter, base=open_checkpoint(tmp_path / "base.safetensors"))
    assert isinstance(reader, LoraAdapter)
    return reader


def test_targeted_weight_is_base_plus_alpha_over_r_times_b_a(
    tmp_path: Path, base_tensors: dict[str, torch.Tensor]
) -> None:
    a, b = factors(4, 3)
    adapter = write_adapter(tmp_path / "ad", {"q": (a, b)}, r=2, lora_alpha=4)
    with open_over_base(tmp_path, adapter) as reader:
        assert is_lora_adapter(adapter)
        torch.testing.assert_close(reader["q.weight"], base_tensors["q.weight"] + 2.0 * b @ a)
        for name in ("q.bias", "v.weight", "embed.weight", "position_ids"):
            assert torch.equal(reader[name], base_tensors[name])
        assert sorted(reader.keys()) == sorted(base_tensors)
        assert reader.targeted == ("q.weight",)


def test_rslora_scales_by_alpha_over_sqrt_r(
    tmp_path: Path, base_tensors: dict[str, torch.Tensor]
) -> None:
    a, b = factors(4, 3, r=4)
    adapter = write_adapter(tmp_path / "ad", {"q": (a, b)}, r=4, lora_alpha=8, use_rslora=True)
    with open_over_base(tmp_path, adapter) as reader:
        expected = base_tensors["q.weight"] + 8 / math.sqrt(4) * b @ a
        torch.testing.assert_close(reader["q.weight"], expected)


def test_rank_and_alpha_patterns_override_per_module(
    tmp_path: Path, base_tensors: dict[str, torch.Tensor]
) -> None:
    aq, bq = factors(4, 3, r=2)
    av, bv = factors(5, 3, r=3, seed=2)
    adapter = write_adapter(
        tmp_path / "ad",
        {"q": (aq, bq), "v": (av, bv)},
        r=2,
        lora_alpha=4,
        rank_pattern={"v": 3},
        alpha_pattern={"v": 1.5},
    )
    with open_over_base(tmp_path, adapter) as reader:
        torch.testing.assert_close(reader["q.weight"], base_tensors["q.weight"] + 2.0 * bq @ aq)
        torch.testing.assert_close(reader["v.weight"], base_tensors["v.weight"] + 0.5 * bv @ av)


def test_fan_in_fan_out_transposes_the_update(tmp_path: Path) -> None:
    # GPT-2's Conv1D stores weights as (in, out): PEFT transposes B @ A for them.
    save_file({"attn.c_attn.weight": torch.zeros(3, 4)}, tmp_path / "base.safetensors")
    a, b = factors(4, 3)
    adapter = write_adapter(tmp_path / "ad", {"attn.c_attn": (a, b)}, fan_in_fan_out=True)
    with open_over_base(tmp_path, adapter) as reader:
        torch.testing.assert_close(reader["attn.c_attn.weight"], 2.0 * (b @ a).T)


def test_embedding_factors_are_transposed_as_peft_does(
    tmp_path: Path, base_tensors: dict[str, torch.Tensor]
) -> None:
    # PEFT's Embedding: A is (r, num_embeddings), B is (dim, r), delta = (B @ A)^T.
    a, b = torch.randn(2, 6), torch.randn(3, 2)
    adapter = write_adapter(tmp_path / "ad", {"embed": (a, b)}, embedding=("embed",))
    with open_over_base(tmp_path, adapter) as reader:
        torch.testing.assert_close(
            reader["embed.weight"], base_tensors["embed.weight"] + 2.0 * (b @ a).T
        )


@pytest.mark.parametrize(
    ("base_name", "adapter_module"),
    [
        ("model.layers.0.q.weight", "layers.0.q"),  # base saved with the task head's prefix
        ("layers.0.q.weight", "model.layers.0.q"),  # base saved from the inner model
        ("model.layers.0.q.weight", "model.layers.0.q"),
    ],
)
def test_adapter_names_match_base_with_or_without_model_prefix(
    tmp_path: Path, base_name: str, adapter_module: str
) -> None:
    save_file({base_name: torch.zeros(4, 3)}, tmp_path / "base.safetensors")
    a, b = factors(4, 3)
    adapter = write_adapter(tmp_path / "ad", {adapter_module: (a, b)})
    with open_over_base(tmp_path, adapter) as reader:
        torch.testing.assert_close(reader[base_name], 2.0 * b @ a)


def test_modules_to_save_tensors_replace_the_base(
    tmp_path: Path, base_tensors: dict[str, torch.Tensor]
) -> None:
    new_bias = torch.full((4,), 7.0)
    adapter = write_adapter(
        tmp_path / "ad", {"q": factors(4, 3)}, extra={f"{PREFIX}q.bias": new_bias}
    )
    with open_over_base(tmp_path, adapter) as reader:
        assert torch.equal(reader["q.bias"], new_bias)


def test_a_saved_full_weight_is_the_w0_its_lora_update_applies_to(
    tmp_path: Path, base_tensors: dict[str, torch.Tensor]
) -> None:
    # PEFT saves a resized embedding in full next to its LoRA factors
    a, b = factors(4, 3)
    saved = torch.full((4, 3), 0.5)
    adapter = write_adapter(tmp_path / "ad", {"q": (a, b)}, extra={f"{PREFIX}q.weight": saved})
    with open_over_base(tmp_path, adapter) as reader:
        torch.testing.assert_close(reader["q.weight"], saved + 2.0 * b @ a)


def test_update_is_computed_in_float32_and_cast_to_the_base_dtype(tmp_path: Path) -> None:
    base = torch.randn(4, 3).to(torch.bfloat16)
    save_file({"q.weight": base}, tmp_path / "base.safetensors")
    a, b = factors(4, 3)
    adapter = write_adapter(tmp_path / "ad", {"q": (a.to(torch.bfloat16), b.to(torch.bfloat16))})
    with open_over_base(tmp_path, adapter) as reader:
        assert reader.meta("q.weight").dtype == torch.bfloat16
        expected = base.float() + 2.0 * b.to(torch.bfloat16).float() @ a.to(torch.bfloat16).float()
        assert torch.equal(reader["q.weight"], expected.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: (d / "adapter_config.json").write_text("{not json"), ["not valid JSON"]),
        (lambda d: (d / "adapter_model.safetensors").unlink(), ["no weights", "adapter_model"]),
        (
            lambda d: (d / "adapter_config.json").write_text(json.dumps({"r": 2})),
            ["'lora_alpha' must be a positive number"],
        ),
        (
            lambda d: (d / "adapter_config.json").write_text(
                json.dumps({"r": 2, "lora_alpha": 2, "use_dora": True})
            ),
            ["DoRA"],
        ),
        (
            lambda d: (d / "adapter_config.json").write_text(json.dumps({"r": 3, "lora_alpha": 2})),
            ["'q.weight'", "rank 2", "r = 3"],
        ),
    ],
)
def test_malformed_adapter_is_a_clear_error(
    tmp_path: Path, base_tensors: dict[str, torch.Tensor], mutate: Any, expected: list[str]
) -> None:
    adapter = write_adapter(tmp_path / "ad", {"q": factors(4, 3)})
    mutate(adapter)
    with pytest.raises(MergeError) as info:
        open_over_base(tmp_path, adapter)
    for text in expected:
        assert text in str(info.value)


def test_shape_mismatch_names_the_tensor_and_shapes(
    tmp_path: Path, base_tensors: dict[str, torch.Tensor]
) -> None:
    adapter = write_adapter(tmp_path / "ad", {"q": factors(5, 3)})
    with pytest.raises(MergeError) as info:
        open_over_base(tmp_path, adapter)
    message = str(info.value)
    assert "'q.weight'" in message and "(5, 3)" in message and "(4, 3)" in message


def test_adapter_for_another_model_names_the_unknown_tensors(
    tmp_path: Path, base_tensors: dict[str, torch.Tensor]
) -> None:
    adapter = write_adapter(tmp_path / "ad", {"mlp.up": factors(4, 3)})
    with pytest.raises(MergeError, match=r"mlp\.up\.lora_A.*match no tensor of the base"):
        open_over_base(tmp_path, adapter)


def test_adapter_without_recipe_base_says_it_needs_base(
    tmp_path: Path, base_tensors: dict[str, torch.Tensor]
) -> None:
    adapter = write_adapter(tmp_path / "ad", {"q": factors(4, 3)})
    with pytest.raises(MergeError, match="a LoRA adapter needs `base`"):
        merge({"models": [str(adapter), str(tmp_path / "base.safetensors")], "method": "slerp"})


def test_merge_of_adapters_and_a_full_model_uses_the_on_demand_weights(
    tmp_path: Path, base_tensors: dict[str, torch.Tensor]
) -> None:
    a1, b1 = factors(4, 3, seed=1)
    a2, b2 = factors(5, 3, seed=2)
    first = write_adapter(tmp_path / "ad1", {"q": (a1, b1)})
    second = write_adapter(tmp_path / "ad2", {"v": (a2, b2)}, lora_alpha=2)
    full = {k: v + 1 if v.is_floating_point() else v for k, v in base_tensors.items()}
    save_file(full, tmp_path / "full.safetensors")
    merged = merge(
        {
            "base": str(tmp_path / "base.safetensors"),
            "models": [str(first), str(second), str(tmp_path / "full.safetensors")],
            "method": "task_arithmetic",
            "parameters": {"scale": 0.5},
        }
    )
    assert isinstance(merged, dict)
    torch.testing.assert_close(
        merged["q.weight"], base_tensors["q.weight"] + 0.5 * (2.0 * b1 @ a1 + 1)
    )
    torch.testing.assert_close(
        merged["v.weight"], base_tensors["v.weight"] + 0.5 * (1.0 * b2 @ a2 + 1)
    )
    torch.testing.assert_close(merged["q.bias"], base_tensors["q.bias"] + 0.5)


def test_adapter_from_the_hub_cache_is_read_over_the_base(
    tmp_path: Path, base_tensors: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    a, b = factors(4, 3)
    adapter = write_adapter(tmp_path / "ad", {"q": (a, b)})
    files = {name: adapter / name for name in ("adapter_config.json", "adapter_model.safetensors")}
    add_to_hub_cache(cache, "org/toy-lora", files)
    merged = merge(
        {
            "base": str(tmp_path / "base.safetensors"),
            "models": ["org/toy-lora"],
            "method": "task_arithmetic",
            "parameters": {"scale": 1.0},
        }
    )
    assert isinstance(merged, dict)
    torch.testing.assert_close(merged["q.weight"], base_tensors["q.weight"] + 2.0 * b @ a)


def test_matches_peft_merge_and_unload(tmp_path: Path) -> None:
    """Peer check: PEFT's own merged weights equal what the reader serves (needs peft)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("q", torch.nn.Linear(3, 4))
    model.add_module("emb", torch.nn.Embedding(6, 3))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(base, tmp_path / "base.safetensors")
    config = peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["q", "emb"], init_lora_weights=False, use_rslora=True
    )
    peft_model = peft.get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "ad")
    expected = peft_model.merge_and_unload().state_dict()
    with open_over_base(tmp_path, tmp_path / "ad") as reader:
        for name in ("q.weight", "q.bias", "emb.weight"):
            torch.testing.assert_close(reader[name], expected[name])

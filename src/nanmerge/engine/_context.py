"""Tensor contexts: each tensor's layer, its stack's size and its role, read from its name.

Names follow the common families: Llama/Mistral/Qwen/Gemma `model.layers.N.`, GPT-2
`h.N.`, BERT/RoBERTa `encoder.layer.N.`, CLIP/ViT `encoder.layers.N.` and `resblocks.N.`,
T5 `block.N.` (an encoder and a decoder stack). The first block index in a name is its
layer; later indices (MoE `experts.N.`) are not layers. A name in none of these forms gets
no layer, and a layer-aware feature must say so rather than guess.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nanmerge._types import Role, TensorContext

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|resblocks|block|blocks)\.(\d+)(?=\.|$)")
# Checked in this order: a norm inside attention (`attention.output.LayerNorm`) is a norm.
_ROLES: tuple[tuple[Role, re.Pattern[str]], ...] = (
    ("norm", re.compile(r"(norm|(^|[._])ln(_\w+)?($|\.))", re.IGNORECASE)),
    ("embedding", re.compile(r"(embed|(^|\.)(wte|wpe|shared)\.)", re.IGNORECASE)),
    ("head", re.compile(r"(^|\.)(lm_head|classifier|score|head|output_layer)(\.|$)")),
    (
        "attention",
        re.compile(r"(attn|attention|(^|\.)[qkvo]_proj\.|(^|\.)(query|key|value)\.)", re.I),
    ),
    (
        "mlp",
        re.compile(
            r"(mlp|ffn|feed_forward|intermediate|DenseReluDense|experts|(^|\.)(fc1|fc2|c_fc|"
            r"gate_proj|up_proj|down_proj|w1|w2|w3)\.|(^|\.)output\.dense\.)"
        ),
    ),
)
_CONFIG_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _role(name: str) -> Role:
    return next((role for role, pattern in _ROLES if pattern.search(name)), "other")


def config_layers(folder: Path | None) -> int | None:
    """The layer count a Hugging Face config.json states, when it states one."""
    if folder is None:
        return None
    try:
        config: Any = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    for key in _CONFIG_KEYS:
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def tensor_contexts(
    names: Iterable[str], *, configured_layers: int | None = None
) -> Mapping[str, TensorContext]:
    """Each name's context. A stack's size is the config's count when the model has one
    stack and a config says it, else one more than the largest index seen in that stack."""
    placed: dict[str, tuple[str, int] | None] = {}
    sizes: dict[str, int] = {}
    for name in names:
        match = _BLOCK.search(name)
        if match is None:
            placed[name] = None
            continue
        stack, layer = name[: match.start(1)], int(match.group(1))
        placed[name] = (stack, layer)
        sizes[stack] = max(sizes.get(stack, 0), layer + 1)
    if configured_layers is not None and len(sizes) == 1:
        (stack,) = sizes
        sizes[stack] = max(configured_layers, sizes[stack])
    return {
        name: TensorContext(
            name=name,
            layer=None if where is None else where[1],
            num_layers=None if where is None else sizes[where[0]],
            role=_role(name),
        )
        for name, where in placed.items()
    }

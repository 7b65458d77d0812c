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
from nanmerge.config import Recipe
from nanmerge.methods import MethodSpec

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
# The parameter of task-vector methods that LiNeS sets per layer.
SCALE = "scale"


def _role(name: str) -> Role:
    return next((role for role, pattern in _ROLES if pattern.search(name)), "other")


def split_layer(name: str) -> tuple[str, int, str] | None:
    """(stack prefix, layer, rest) of a name in a block, so the layer can be renumbered;
    None outside the blocks."""
    match = _BLOCK.search(name)
    if match is None:
        return None
    return name[: match.start(1)], int(match.group(1)), name[match.end(1) :]


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


def lines_problems(
    recipe: Recipe, method: MethodSpec | None, contexts: Mapping[str, TensorContext]
) -> list[str]:
    """Why the recipe's `lines` cannot apply, before any tensor is read."""
    if recipe.lines is None or method is None:
        return []
    problems = []
    if not method.needs_base or SCALE not in method.params:
        problems.append(
            f"lines: LiNeS scales a task-vector method's merged delta by depth; method "
            f"'{method.name}' has no base and `scale` to scale: use it with a method that has"
        )
    if recipe.slices is not None:
        problems.append(
            "lines: LiNeS with `slices` is not supported yet (each slice would need its own "
            "alpha); merge the slices first, then apply LiNeS to a `models:` recipe"
        )
    if SCALE in recipe.parameters:
        problems.append(
            "lines: LiNeS sets the scale per layer (alpha + beta * l / (L - 1)); remove "
            "`scale` from `parameters`, or set `lines.alpha`"
        )
    if contexts and not any(c.layer is not None for c in contexts.values()):
        example = next(iter(contexts))
        problems.append(
            f"lines: no tensor name has a layer nanmerge can read (e.g. '{example}'), so "
            "LiNeS would scale every tensor by alpha alone; it reads Llama/Mistral/Qwen "
            "`model.layers.N.`, GPT-2 `h.N.`, BERT `encoder.layer.N.`, CLIP `encoder.layers.N.` "
            "or `resblocks.N.`, T5 `block.N.` names"
        )
    return problems


def lines_scale(context: TensorContext, alpha: float, beta: float) -> float:
    """alpha + beta * l / (L - 1) in block l of L; alpha outside the blocks and in a
    one-block stack (where the paper's l / (L - 1) is 0 / 0)."""
    if context.layer is None or context.num_layers is None or context.num_layers < 2:
        return alpha
    return alpha + beta * context.layer / (context.num_layers - 1)

"""A PEFT LoRA adapter read over its base model, so it can be merged like a full checkpoint.

Each targeted weight is served as W0 + scaling * B @ A, computed in float32 when the tensor
is asked for and cast to the base's dtype; nothing merged is ever held or written. Every
name, shape and rank is checked against the headers when the adapter is opened.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanmerge._types import Checkpoint, MergeError, TensorMeta

from ._checkpoint import CheckpointReader
from ._hub import hub_snapshot, parse_repo_id
from ._readers import open_checkpoint

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# `<module>.lora_A.weight`, `<module>.lora_A.<adapter>.weight` (in-memory names) and the
# embedding form `<module>.lora_embedding_A` (a bare parameter).
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.lora_(?P<kind>embedding_)?(?P<side>[AB])(?:\.[^.]+)?(?:\.weight)?$"
)


def is_lora_adapter(source: object) -> bool:
    """True for a local folder holding a PEFT `adapter_config.json`."""
    if not isinstance(source, str | os.PathLike):
        return False
    return (Path(source).expanduser() / CONFIG_FILE).is_file()


def _adapter_folder(source: object, allow_downloads: bool) -> Path | None:
    """The adapter folder `source` names (a local folder or a cached hub repo), else None."""
    if not isinstance(source, str | os.PathLike):
        return None
    path = Path(source).expanduser()
    if path.exists():
        return path if is_lora_adapter(path) else None
    repo = parse_repo_id(str(source))
    if repo is None:
        return None
    snapshot = hub_snapshot(repo, allow_downloads=allow_downloads)
    return snapshot if is_lora_adapter(snapshot) else None


@dataclass(frozen=True)
class _Target:
    """One base weight the adapter changes: where its factors are and how to combine them."""

    a_key: str
    b_key: str
    scaling: float
    transpose: bool  # embedding layers and fan_in_fan_out: delta = (B A)^T


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: a key matches a module-name suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _is_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MergeError(
            f"LoRA adapter config {path} is not valid JSON ({exc}); re-save the adapter with "
            "PEFT's save_pretrained"
        ) from None
    if not isinstance(config, dict):
        raise MergeError(f"LoRA adapter config {path} must be a JSON object")
    problems = []
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        problems.append(f"peft_type is {peft_type!r}; nanmerge reads LORA adapters only")
    for key in ("r", "lora_alpha"):
        if not _positive(config.get(key)):
            problems.append(f"'{key}' must be a positive number, got {config.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(
            _positive(v) and _is_regex(k) for k, v in patterns.items()
        ):
            problems.append(f"'{key}' must map module-name patterns to positive numbers")
    if config.get("use_dora"):
        problems.append("use_dora is true; DoRA adapters are not supported (only plain LoRA)")
    if problems:
        raise MergeError(f"LoRA adapter config {path} is not usable: " + "; ".join(problems))
    return config


def open_model(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | torch.nn.Module,
    *,
    base: Checkpoint | None = None,
    **options: Any,
) -> CheckpointReader:
    """`open_checkpoint` (which takes `options`), plus LoRA adapters read over `base`.

    An adapter is a local folder or a Hugging Face repo id whose snapshot holds
    `adapter_config.json`.
    """
    folder = _adapter_folder(source, bool(options.get("allow_downloads", False)))
    if folder is None:
        return open_checkpoint(source, **options)
    if base is None:
        raise MergeError(
            f"{source} is a LoRA adapter (it has {CONFIG_FILE}); a LoRA adapter needs `base`: "
            "set the recipe's base to the model the adapter was trained on (its "
            "base_model_name_or_path in adapter_config.json)"
        )
    adapter = LoraAdapter(folder, base)
    adapter.source = str(source)
    return adapter


class LoraAdapter(CheckpointReader):
    """A LoRA adapter folder seen as the full model it makes of `base`.

    Keys, shapes and dtypes are the base's. A targeted weight is W0 + (alpha / r) B @ A
    (alpha / sqrt(r) with `use_rslora`), transposed as PEFT does for `fan_in_fan_out` and
    embedding layers; any other adapter tensor (PEFT's `modules_to_save`, trained biases)
    replaces the base's. The base reader stays the caller's to close.
    """

    def __init__(self, folder: str | os.PathLike[str], base: Checkpoint) -> None:
        self.folder = None  # an adapter folder holds no model config to copy
        path = Path(folder).expanduser()
        self.source = str(path)
        self.config = _read_config(path)
        self._base = base
        weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise MergeError(
                f"LoRA adapter {path} has {CONFIG_FILE} but no weights; looked for "
                f"{', '.join(WEIGHT_FILES)}. Re-save it with PEFT's save_pretrained"
            )
        self._weights = open_checkpoint(weights)
        try:
            self._targets, self._replaced = self._map_keys()
        except BaseException:
            self._weights.close()
            raise

    def _base_name(self, key: str) -> str | None:
        """The base tensor an adapter key refers to, tolerating a `model.`-style prefix gap."""
        name = key.removeprefix(PEFT_PREFIX)
        if name in self._base:
            return name
        endings = [n for n in self._base if n.endswith("." + name)]
        if len(endings) == 1:
            return endings[0]
        parts = name.split(".")
        for i in range(1, len(parts) - 1):
            shorter = ".".join(parts[i:])
            if shorter in self._base:
                return shorter
        return None

    def _map_keys(self) -> tuple[dict[str, _Target], dict[str, str]]:
        pairs: dict[str, dict[str, str]] = {}
        embedding: set[str] = set()
        replaced: dict[str, str] = {}
        unknown: list[str] = []
        problems: list[str] = []
        for key in self._weights:
            match = _LORA_KEY.match(key)
            if match is None:
                name = self._base_name(key)
                if name is None:
                    unknown.append(key)
                elif self._weights.meta(key).shape != self._base.meta(name).shape:
                    problems.append(
                        f"'{key}' has shape {self._weights.meta(key).shape} but base tensor "
                        f"'{name}' has shape {self._base.meta(name).shape}"
                    )
                else:
                    replaced[name] = key
                continue
            module = match["module"]
            pairs.setdefault(module, {})[match["side"]] = key
            if match["kind"]:
                embedding.add(module)
        targets: dict[str, _Target] = {}
        for module, sides in pairs.items():
            if set(sides) != {"A", "B"}:
                lacking = "B" if "A" in sides else "A"
                problems.append(f"'{module}' has lora_{set(sides).pop()} but no lora_{lacking}")
                continue
            name = self._base_name(f"{module}.weight")
            if name is None:
                unknown.append(sides["A"])
                continue
            target = self._target(module, name, sides, module in embedding, problems)
            if target is not None:
                targets[name] = target
        if unknown:
            shown = ", ".join(f"'{k}'" for k in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            problems.append(
                f"adapter tensors {shown}{more} match no tensor of the base "
                f"{self._base.source}; is `base` the model this adapter was trained on?"
            )
        if problems:
            raise MergeError(
                f"LoRA adapter {self.source} does not fit its base {self._base.source}:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        return targets, replaced

    def _target(
        self,
        module: str,
        name: str,
        sides: dict[str, str],
        embedding: bool,
        problems: list[str],
    ) -> _Target | None:
        """Check one A/B pair against the config and the base shape; None when it is wrong."""
        a, b = self._weights.meta(sides["A"]).shape, self._weights.meta(sides["B"]).shape
        base = self._base.meta(name).shape
        module_key = module.removeprefix(PEFT_PREFIX)
        r = _pattern_value(self.config.get("rank_pattern") or {}, module_key, self.config["r"])
        alpha = _pattern_value(
            self.config.get("alpha_pattern") or {}, module_key, self.config["lora_alpha"]
        )
        if len(a) != 2 or len(b) != 2:
            problems.append(
                f"'{name}': lora_A {a} and lora_B {b} are not matrices; only Linear and "
                "Embedding LoRA layers are supported"
            )
            return None
        # Linear: A (r, in), B (out, r). Embedding: A (r, num), B (dim, r); delta = (B A)^T.
        transpose = embedding or bool(self.config.get("fan_in_fan_out"))
        delta = (a[1], b[0]) if transpose else (b[0], a[1])
        if a[0] != b[1] or delta != tuple(base):
            problems.append(
                f"'{name}': lora_A {tuple(a)} and lora_B {tuple(b)} give a delta of shape "
                f"{delta if a[0] == b[1] else 'undefined (ranks differ)'} but the base "
                f"tensor has shape {tuple(base)}"
            )
            return None
        if a[0] != r:
            problems.append(
                f"'{name}': lora_A has rank {a[0]} but the config says r = {r}; the config "
                "does not belong to these weights"
            )
            return None
        scaling = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        return _Target(sides["A"], sides["B"], float(scaling), transpose)

    @property
    def targeted(self) -> Sequence[str]:
        """Base tensor names the low-rank update changes."""
        return tuple(self._targets)

    def keys(self) -> Sequence[str]:
        return self._base.keys()

    def meta(self, name: str) -> TensorMeta:
        if name not in self._base:
            raise self._missing(name)
        return self._base.meta(name)

    def __contains__(self, name: object) -> bool:
        return name in self._base

    def __getitem__(self, name: str) -> torch.Tensor:
        import torch

        dtype = self.meta(name).dtype
        # W0: a full tensor saved in the adapter (modules_to_save, a resized embedding) wins
        replaced = self._replaced.get(name)
        base = self._base[name] if replaced is None else self._weights[replaced].to(dtype)
        target = self._targets.get(name)
        if target is None:
            return base
        a = self._weights[target.a_key].to(torch.float32)
        b = self._weights[target.b_key].to(torch.float32)
        out = base.to(torch.float32)  # updated in place: no full-size delta is allocated
        if target.transpose:  # (B A)^T = A^T B^T
            out.addmm_(a.T, b.T, alpha=target.scaling)
        else:
            out.addmm_(b, a, alpha=target.scaling)
        return out.to(dtype)

    def close(self) -> None:
        self._weights.close()

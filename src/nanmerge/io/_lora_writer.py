"""Write a merge as a PEFT LoRA adapter: each changed matrix's delta from the base, SVD-truncated.

The factors are small (rank x (rows + cols) per matrix), so they are kept until `finalize`
and written as one `adapter_model.safetensors`, with the same hidden temporary folder and
rename-on-success as `ModelWriter`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanmerge._linalg import OVERSAMPLE, randomized_svd, thin_svd
from nanmerge._types import Checkpoint, MergeError, TensorMeta

from ._lora import CONFIG_FILE, PEFT_PREFIX, WEIGHT_FILES
from ._output import Protected
from ._writer import ModelWriter

if TYPE_CHECKING:  # torch is imported where tensors are made: commands without math skip it
    import torch

ADAPTER_WEIGHTS = WEIGHT_FILES[0]
# Model files that would make an adapter folder look like a full model.
_MODEL_ONLY = ("config.json", "generation_config.json")
# How Hugging Face models name embedding layers, whose LoRA factors PEFT stores transposed.
_EMBEDDING_ENDINGS = ("embeddings", "embedding", "embed_tokens", "embed_positions")
_EMBEDDING_NAMES = ("wte", "wpe", "shared")


def _is_embedding(module: str) -> bool:
    """Guessed from the module name: a checkpoint does not say which layers are embeddings."""
    last = module.rsplit(".", 1)[-1]
    return last.endswith(_EMBEDDING_ENDINGS) or last in _EMBEDDING_NAMES


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B (rows x r) and A (r x cols), r = min(rank, rows, cols), with B @ A the best rank-r fit.

    Truncated SVD (Eckart-Young); the singular values are split evenly between the factors
    so neither holds all the scale. When r is far below the matrix's smaller side, a
    randomized SVD (Halko et al. 2011, seeded, 4 power iterations) finds the top singular
    vectors in O((rows + cols) r) memory and a fraction of the time, nearly as accurately;
    the report measures the error of the factors actually written either way.
    """
    import torch

    delta = delta.to(torch.float32)
    r = min(rank, *delta.shape)
    if (r + OVERSAMPLE) * 4 > min(delta.shape):
        u, s, vh = thin_svd(delta)
    else:
        u, s, vh = randomized_svd(delta, r)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


class LoraWriter(ModelWriter):
    """Collect merged tensors, keep `merged - base` of each changed one, write a PEFT adapter.

    A changed 2-D floating tensor becomes LoRA factors of rank `rank` (lower where the
    matrix is smaller) with lora_alpha = r, so PEFT's scaling is 1. A changed tensor of any
    other shape (biases, norms) is stored in full, as PEFT stores `modules_to_save`, and its
    module is listed there when no LoRA factor targets it. Unchanged tensors are left out.
    """

    def __init__(
        self,
        output: Path,
        entries: Sequence[tuple[str, TensorMeta]],
        *,
        rank: int,
        base: Checkpoint,
        base_model_name_or_path: str | None = None,
        overwrite: bool = False,
        metadata: dict[str, str] | None = None,
        inputs: Sequence[Protected] = (),
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise MergeError(f"LoRA output needs a positive integer `rank`, got {rank!r}")
        absent = [name for name, _ in entries if name not in base]
        if absent:
            raise MergeError(
                f"cannot write a LoRA adapter: {len(absent)} output tensor(s) are not in the base "
                f"{base.source} (first: '{absent[0]}'), so they have no delta; set "
                "`missing_tensors: skip` or write `output_format: full`"
            )
        super().__init__(
            output, [], max_shard_size=1, overwrite=overwrite, metadata=metadata, inputs=inputs
        )
        self.shard_names = [ADAPTER_WEIGHTS, CONFIG_FILE]  # add_file must not replace these
        self.rank = rank
        self._base = base
        self._base_name = base_model_name_or_path
        self._planned = list(entries)
        self._tensors: dict[str, torch.Tensor] = {}
        self._errors: dict[str, dict[str, float | int]] = {}
        self._full: list[str] = []
        self._unchanged = 0
        self._lora_modules: dict[str, int] = {}
        self._embedding_modules: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Take the next planned tensor; keep its low-rank delta, full delta or nothing."""
        import torch

        self._check_next(name, tensor, self._planned)
        meta = self._planned[self._next][1]
        self._next += 1
        if not tensor.dtype.is_floating_point:
            return
        delta = tensor.to(torch.float32) - self._base[name].to(torch.float32)
        if not bool(delta.any()):
            self._unchanged += 1
            return
        if tensor.dim() != 2 or not name.endswith(".weight"):
            self._tensors[PEFT_PREFIX + name] = tensor.detach().to("cpu").contiguous()
            self._full.append(name)
            return
        module = name.removesuffix(".weight")
        embedding = _is_embedding(module)
        b, a = low_rank(delta.T if embedding else delta, self.rank)
        b, a = b.to(meta.dtype).contiguous(), a.to(meta.dtype).contiguous()
        approx = b.to(torch.float32) @ a.to(torch.float32)
        residual = delta - (approx.T if embedding else approx)
        error = float(residual.norm() / delta.norm())
        kind = "lora_embedding_" if embedding else "lora_"
        suffix = "" if embedding else ".weight"
        self._tensors[f"{PEFT_PREFIX}{module}.{kind}A{suffix}"] = a
        self._tensors[f"{PEFT_PREFIX}{module}.{kind}B{suffix}"] = b
        self._lora_modules[module] = a.shape[0]
        if embedding:
            self._embedding_modules.add(module)
        self._errors[name] = {"rank": a.shape[0], "relative_error": error}

    def summary(self) -> dict[str, Any]:
        """What the adapter holds and how well it approximates the merge, for the report."""
        errors = [e["relative_error"] for e in self._errors.values()]
        full_modules = {n.rsplit(".", 1)[0] for n in self._full if "." in n}
        shadowed = sorted(n for n in self._full if n.rsplit(".", 1)[0] in self._lora_modules)
        notes = []
        if self._full:
            notes.append(
                f"{len(self._full)} changed tensor(s) that are not matrices are stored in full "
                "(PEFT `modules_to_save` layout)"
            )
        if shadowed:
            notes.append(
                f"{len(shadowed)} of them belong to LoRA-targeted modules (e.g. '{shadowed[0]}'): "
                "nanmerge reads them back, PEFT may leave them at the base value"
            )
        if self._embedding_modules:
            notes.append(
                "modules written as LoRA embedding layers (by name): "
                + ", ".join(sorted(self._embedding_modules))
            )
        return {
            "rank": self.rank,
            "tensors": self._errors,
            "max_relative_error": max(errors, default=0.0),
            "rms_relative_error": math.sqrt(sum(e * e for e in errors) / len(errors))
            if errors
            else 0.0,
            "stored_full": list(self._full),
            "modules_to_save": sorted(full_modules - set(self._lora_modules)),
            "unchanged_tensors": self._unchanged,
            "notes": notes,
        }

    def _config(self) -> dict[str, Any]:
        patterns = {m: r for m, r in self._lora_modules.items() if r != self.rank}
        modules_to_save = self.summary()["modules_to_save"]
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": self._base_name,
            "r": self.rank,
            "lora_alpha": self.rank,
            "rank_pattern": patterns,
            "alpha_pattern": dict(patterns),
            "target_modules": sorted(self._lora_modules),
            "modules_to_save": modules_to_save or None,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
        }

    def copy_files(self, src_folder: Path, names: Iterable[str]) -> list[str]:
        """Copy tokenizer files only: a model config would make the adapter look like a model."""
        return super().copy_files(src_folder, [n for n in names if n not in _MODEL_ONLY])

    def finalize(self) -> Path:
        """Write the adapter weights and config, then move the folder into place."""
        self._require_open()
        try:
            if self._next < len(self._planned):
                missing = self._planned[self._next][0]
                raise MergeError(
                    f"cannot finalize {self.output}: {len(self._planned) - self._next} of "
                    f"{len(self._planned)} planned tensors were never written, starting with "
                    f"'{missing}'"
                )
            from safetensors.torch import save_file

            save_file(self._tensors, self.temp_dir / ADAPTER_WEIGHTS, metadata=self._metadata)
            (self.temp_dir / CONFIG_FILE).write_text(
                json.dumps(self._config(), indent=2) + "\n", encoding="utf-8"
            )
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        return self.output

"""The recipe: what to merge, how, and where to write it (YAML, dict or object)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nanmerge._mergekit import from_mergekit
from nanmerge._types import MergeError

ModelSource = Any
"""A path (str or PathLike) to a checkpoint, or an in-memory state dict / nn.Module."""


class ModelEntry(BaseModel):
    """One fine-tuned model; `coefficient` feeds `coefficients: manual`."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    path: ModelSource
    coefficient: float | None = None

    @field_validator("path")
    @classmethod
    def _path_like(cls, value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return str(value)
        return value


class CoefficientSpec(BaseModel):
    """An estimator name and its options, e.g. `{estimator: nan, norm_of: task_vector}`."""

    model_config = ConfigDict(extra="allow")

    estimator: str = "uniform"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Recipe(BaseModel):
    """A merge recipe. Field names are a public schema: add fields, never rename them."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    base: ModelSource | None = Field(None, description="the pretrained model the others share")
    models: list[ModelEntry] = Field(min_length=1, description="the fine-tuned models")
    method: str = Field(description="merge method (see `nanmerge methods`)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="method hyperparameters")
    coefficients: CoefficientSpec = Field(
        default_factory=CoefficientSpec,
        description="estimator: uniform | manual | nan | from_file, or a mapping with options",
    )
    output: Path | None = Field(None, description="output model folder")
    seed: int = Field(0, description="seed for random methods (DARE)")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="output dtype (default: the base's, per tensor)"
    )
    overwrite: bool = Field(False, description="replace an existing output folder")
    max_shard_size: str = Field("1GB", description="largest output shard, e.g. 500MB, 2GB")
    threads: int = Field(
        0, ge=0, description="tensors loaded ahead in background threads (more memory)"
    )
    device: str = Field(
        "cpu", description="torch device for the arithmetic, e.g. cpu, cuda, cuda:1"
    )
    missing_tensors: Literal["error", "base", "skip"] = Field(
        "error",
        description="a tensor absent from some inputs: error, take the base's, or skip it",
    )
    copy_files_from: str | None = Field(
        None,
        description="folder or Hugging Face repo id whose config/tokenizer files are copied "
        "(default: base)",
    )
    allow_downloads: bool = Field(
        False, description="download Hugging Face repo ids missing from the local hub cache"
    )
    output_format: Literal["full", "lora"] = Field(
        "full", description="write the merged model (full) or its delta from base as a LoRA adapter"
    )
    rank: int | None = Field(None, ge=1, description="LoRA rank for output_format: lora")
    statistics: list[str] | None = Field(
        None,
        description="per-model statistics files (safetensors from nanmerge.statistics, one per "
        "model, same order) for data-informed methods: fisher, regmean",
    )

    @field_validator("base")
    @classmethod
    def _base_path_like(cls, value: Any) -> Any:
        return str(value) if isinstance(value, os.PathLike) else value

    @field_validator("models", mode="before")
    @classmethod
    def _bare_paths(cls, value: Any) -> Any:
        """Let `models: [a, b]` stand for `models: [{path: a}, {path: b}]`."""
        if isinstance(value, list):
            return [v if isinstance(v, Mapping | ModelEntry) else {"path": v} for v in value]
        return value

    @field_validator("coefficients", mode="before")
    @classmethod
    def _estimator_name(cls, value: Any) -> Any:
        return {"estimator": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _lora_output(self) -> Recipe:
        if self.output_format == "lora" and (self.rank is None or self.base is None):
            raise ValueError(
                "output_format: lora writes the merge minus `base` as a LoRA adapter of rank "
                "`rank`; set both"
            )
        if self.output_format == "full" and self.rank is not None:
            raise ValueError("`rank` applies only to output_format: lora")
        return self


def _describe(error: Any) -> str:
    loc = error["loc"]
    where = ".".join(str(p) for p in loc) or "recipe"
    if error["type"] == "extra_forbidden":
        valid = ModelEntry.model_fields if loc[0] == "models" else Recipe.model_fields
        close = difflib.get_close_matches(str(loc[-1]), list(valid), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{where}: unknown field{hint}"
    return f"{where}: {error['msg']}"


def load_recipe(source: Recipe | Mapping[str, Any] | str | os.PathLike[str]) -> Recipe:
    """Build a Recipe from an object, a mapping or a YAML file; report every error at once."""
    if isinstance(source, Recipe):
        return source
    where = "recipe"
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise MergeError(f"recipe file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise MergeError(f"recipe {path} is not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise MergeError(f"recipe {path} must be a YAML mapping with `models` and `method`")
        where = str(path)
    else:
        data = source
    if "merge_method" in data:  # mergekit's schema
        data = from_mergekit(data, where=where)
    try:
        return Recipe.model_validate(dict(data))
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
        fields = ", ".join(Recipe.model_fields)
        raise MergeError(
            f"{where} has {exc.error_count()} error(s):\n{lines}\nvalid fields: {fields}"
        ) from None

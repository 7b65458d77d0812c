"""The recipe model: what to merge, how, and where to write it (pydantic, unknown keys rejected)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

from nanmerge._schedule import parse, varies
from nanmerge.recipes import layer_swap

IN_MEMORY = "<in-memory>"


def _is_module(value: object) -> bool:
    """Whether `value` is a torch.nn.Module; when torch is not imported, nothing can be one."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


def _is_entry(value: object) -> bool:
    """Whether a `models` item is a `{path, coefficient}` mapping rather than a state dict."""
    torch = sys.modules.get("torch")
    return isinstance(value, Mapping) and not (
        torch is not None and any(isinstance(v, torch.Tensor) for v in value.values())
    )


def _model_source(value: Any) -> Any:
    """A path or repo id as str; a state dict or module as is; anything else is refused here,
    so a wrong type is a recipe error and never a traceback from the readers."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str | Mapping) or _is_module(value):
        return value
    raise ValueError(
        "expected a checkpoint path or Hugging Face repo id (a string), or from Python a state "
        f"dict or torch.nn.Module; got {type(value).__name__}"
    )


ModelSource = Annotated[
    Any,
    AfterValidator(_model_source),
    # in JSON an in-memory model is only named: its tensors are no recipe text
    PlainSerializer(lambda v: v if isinstance(v, str) else IN_MEMORY, when_used="json"),
]
"""A path or repo id (str or PathLike) of a checkpoint, or an in-memory state dict / nn.Module."""


def _check_scalars(values: Mapping[str, Any], what: str) -> None:
    """Method parameters and estimator options are single values (the method checks their
    ranges); a list or mapping there is a mistake, and could be any size or self-referential."""
    bad = [
        f"{key} is a {type(v).__name__}"
        for key, v in values.items()
        if not isinstance(v, str | int | float | bool | None)
    ]
    if bad:
        raise ValueError(f"{what} must be single numbers, strings or booleans: {', '.join(bad)}")


def _parameters(value: dict[str, Any]) -> dict[str, Any]:
    """Method parameters: single values, or values that vary by layer, role or name."""
    _check_scalars({k: v for k, v in value.items() if not varies(v)}, "method parameters")
    for key, v in value.items():
        _setting(v, key)
    return value


def _setting(value: Any, where: str) -> Any:
    """A value that may vary over the model (a schedule or a filter list), checked as such."""
    problems: list[str] = []
    if varies(value):
        parse(value, where, problems)
    if problems:
        raise ValueError("; ".join(problems))
    return value


class ModelEntry(BaseModel):
    """One fine-tuned model; `coefficient` feeds `coefficients: manual`; `parameters` are
    this model's own values of the method's per-model parameters (e.g. `density`)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    path: ModelSource
    coefficient: float | list[Any] | dict[str, Any] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("coefficient")
    @classmethod
    def _coefficient_setting(cls, value: Any) -> Any:
        return _setting(value, "")

    @field_validator("parameters")
    @classmethod
    def _scalar_parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _parameters(value)


class LinesSpec(BaseModel):
    """LiNeS (arXiv 2410.17146): the merged task vector scaled by alpha + beta * l / (L - 1)
    in block l of L, by alpha outside the blocks; alpha, when not given, is the paper's
    multi-task choice from the L1 norms of the task vectors and of the merged one."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(ge=0, allow_inf_nan=False, description="the added scale at the last block")
    alpha: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="the scale outside and at the first block"
    )


class SliceSource(BaseModel):
    """Layers [first, end) of one model (half-open, like a Python range)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    layers: tuple[int, int]
    coefficient: float | None = Field(
        None, description="this source's weight in the slice (default: the model's coefficient)"
    )

    @field_validator("layers")
    @classmethod
    def _nonempty(cls, value: tuple[int, int]) -> tuple[int, int]:
        first, end = value
        if first < 0 or end <= first:
            raise ValueError(
                f"layer range [{first}, {end}] is empty or reversed; write [first, end) with "
                "0 <= first < end"
            )
        return value


class Slice(BaseModel):
    """Output layers stacked from its sources' ranges (equally long), merged by `method`."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource] = Field(min_length=1)
    method: str | None = Field(None, description="default: the recipe's method and parameters")
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _scalar_parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _parameters(value)

    @model_validator(mode="after")
    def _equal_lengths(self) -> Slice:
        lengths = [s.layers[1] - s.layers[0] for s in self.sources]
        if len(set(lengths)) > 1:
            raise ValueError(
                f"the sources' layer ranges have different lengths ({lengths}); the sources "
                "of one slice are merged layer by layer, so give them equally long ranges"
            )
        overlapping = [
            f"{a.model} {list(a.layers)} and {list(b.layers)}"
            for i, a in enumerate(self.sources)
            for b in self.sources[i + 1 :]
            if a.model == b.model and a.layers[0] < b.layers[1] and b.layers[0] < a.layers[1]
        ]
        if overlapping:
            raise ValueError(
                f"overlapping ranges of one model in one slice: {'; '.join(overlapping)}; "
                "list each model's layers once per slice"
            )
        return self

    @property
    def length(self) -> int:
        first, end = self.sources[0].layers
        return end - first


class CoefficientSpec(BaseModel):
    """An estimator name and its options, e.g. `{estimator: nan, norm_of: task_vector}`."""

    model_config = ConfigDict(extra="allow")

    estimator: str = "uniform"
    multiplier: float | list[Any] | dict[str, Any] | None = None

    @field_validator("multiplier")
    @classmethod
    def _multiplier_setting(cls, value: Any) -> Any:
        return _setting(value, "")

    @model_validator(mode="after")
    def _scalar_options(self) -> CoefficientSpec:
        _check_scalars(self.model_extra or {}, "estimator options")
        return self

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TokenizerSpec(BaseModel):
    """The output's vocabulary (mergekit's `tokenizer`): `base` (the base's, else the first
    model's), `union` (every input's tokens) or a model folder / repo id; the embedding and
    output-head rows of every input are re-aligned to it before the merge."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="base | union | a model folder or Hugging Face repo id")
    pad_to_multiple_of: int | None = Field(
        None, ge=1, description="round the output's embedding rows up to a multiple of this"
    )


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
    max_shard_size: str | int = Field(
        "1GB", description="largest output shard, e.g. 500MB, 2GB, or a number of bytes"
    )
    threads: int = Field(
        0, ge=0, description="tensors loaded ahead in background threads (more memory)"
    )
    device: str = Field(
        "cpu", description="torch device for the arithmetic, e.g. cpu, cuda, cuda:1"
    )
    ray: bool = Field(
        False,
        description="merge the output shards as Ray tasks reading the inputs from shared "
        "storage (nanmerge[ray]); the files are the local merge's, byte for byte",
    )
    address: str | None = Field(
        None, description="with ray: join the Ray cluster at host:port or auto (default: local)"
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
    chat_template: str | None = Field(
        None,
        description="Jinja chat template set in the output's tokenizer_config.json; `auto`: "
        "the one most inputs' tokenizer_config.json carry",
    )
    tokenizer: TokenizerSpec | None = Field(
        None,
        description="the output's vocabulary, {source: base | union | model, "
        "pad_to_multiple_of}; embedding and output-head rows are re-aligned to it",
    )
    notes: list[str] = Field(
        default_factory=list,
        description="remarks on the recipe (what a mergekit translation does differently), "
        "kept in the report",
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
    lines: LinesSpec | None = Field(
        None,
        description="LiNeS: scale a task-vector method's merged delta up with depth, "
        "{beta: ..., alpha: ...} (alpha defaults to the paper's multi-task choice)",
    )

    slices: list[Slice] | None = Field(
        None,
        min_length=1,
        description="output layers stacked from layer ranges of the models, in order, "
        "[{sources: [{model, layers: [first, end]}], method, parameters}]",
    )

    @field_validator("parameters")
    @classmethod
    def _scalar_parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _parameters(value)

    @model_validator(mode="before")
    @classmethod
    def _slice_defaults(cls, data: Any) -> Any:
        """`layer_swap` is written as the slices it stands for; a slices recipe names its
        models in the sources (`models` defaults to them, in order) and copies layers
        (`method` defaults to passthrough)."""
        if not isinstance(data, Mapping) or not ("slices" in data or "layer_swap" in data):
            return data
        data = dict(data)
        if "layer_swap" in data:
            if "slices" in data:
                raise ValueError("give `layer_swap` or `slices`, not both")
            data["slices"] = layer_swap(data.pop("layer_swap"))
        data.setdefault("method", "passthrough")
        if "models" not in data and isinstance(data["slices"], list):
            sources = [
                src.get("model")
                for s in data["slices"]
                if isinstance(s, Mapping) and isinstance(s.get("sources"), list)
                for src in s["sources"]
                if isinstance(src, Mapping)
            ]
            data["models"] = list(dict.fromkeys(m for m in sources if isinstance(m, str)))
        return data

    @model_validator(mode="after")
    def _slice_models(self) -> Recipe:
        if self.slices is None:
            return self
        paths = {m.path for m in self.models if isinstance(m.path, str)}
        unknown = sorted({s.model for sl in self.slices for s in sl.sources} - paths)
        if unknown:
            raise ValueError(
                f"slices name model(s) {', '.join(unknown)} that `models` does not list; list "
                "them there, or leave `models` out to take the sources' models"
            )
        if any(m.parameters for m in self.models):
            raise ValueError(
                "per-model `parameters` are not read with slices; set them in each slice's "
                "`parameters` (one value for the slice's sources)"
            )
        if self.output_format == "lora" or self.statistics is not None:
            raise ValueError(
                "slices restack layers, so they cannot be written as a LoRA adapter of the base "
                "or read per-model statistics files; drop output_format: lora / statistics"
            )
        return self

    @field_validator("models", mode="before")
    @classmethod
    def _bare_paths(cls, value: Any) -> Any:
        """Let `models: [a, b]` stand for `models: [{path: a}, {path: b}]`; a mapping is an
        entry unless it holds tensors (a bare state dict)."""
        if isinstance(value, list):
            return [v if isinstance(v, ModelEntry) or _is_entry(v) else {"path": v} for v in value]
        return value

    @field_validator("coefficients", mode="before")
    @classmethod
    def _estimator_name(cls, value: Any) -> Any:
        return {"estimator": value} if isinstance(value, str) else value

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer_source(cls, value: Any) -> Any:
        return {"source": value} if isinstance(value, str) else value

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

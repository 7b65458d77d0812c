"""The recipe: what to merge, how, and where to write it (YAML, dict or object)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from nanmerge._params import did_you_mean
from nanmerge._types import MergeError
from nanmerge.recipes import from_mergekit

# Aliases (`*name`) may add at most this many nodes to a YAML recipe, counted as expanded.
MAX_ALIAS_NODES = 10_000
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


class ModelEntry(BaseModel):
    """One fine-tuned model; `coefficient` feeds `coefficients: manual`."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    path: ModelSource
    coefficient: float | None = None


class CoefficientSpec(BaseModel):
    """An estimator name and its options, e.g. `{estimator: nan, norm_of: task_vector}`."""

    model_config = ConfigDict(extra="allow")

    estimator: str = "uniform"

    @model_validator(mode="after")
    def _scalar_options(self) -> CoefficientSpec:
        _check_scalars(self.model_extra or {}, "estimator options")
        return self

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
    max_shard_size: str | int = Field(
        "1GB", description="largest output shard, e.g. 500MB, 2GB, or a number of bytes"
    )
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

    @field_validator("parameters")
    @classmethod
    def _scalar_parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_scalars(value, "method parameters")
        return value

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
        return f"{where}: unknown field{did_you_mean(str(loc[-1]), valid)}"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


class _AliasBomb(yaml.YAMLError):
    """Aliases that would expand a small file into a huge or endless structure."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes under `node` counting each alias as a full copy (what a dump or deep copy makes);
    `sizes` memoizes by node, so the count costs one visit per distinct node."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        mark = node.start_mark
        raise _AliasBomb(
            f"the node anchored at line {mark.line + 1}, column {mark.column + 1} holds an "
            "alias to itself, a structure without end; write it out without the alias"
        )
    open_.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    sizes[key] = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
    open_.discard(key)
    return sizes[key]


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing recursive aliases and aliases that expand past a bound.

    Aliases are allowed, not refused: a hand-written recipe (mergekit's included) may reuse a
    block with `&name` / `*name`, which adds a few nodes. A "billion laughs" (aliases of lists
    of aliases) is tiny as a file and as loaded objects, which share structure, but the
    report copies and dumps the recipe and would expand it without bound; it is refused here,
    where the message can name the file. The check visits each distinct node once.
    """

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        sizes: dict[int, int] = {}
        added = 0 if node is None else _expanded_size(node, sizes, set()) - len(sizes)
        if added > MAX_ALIAS_NODES:
            raise _AliasBomb(
                f"its aliases (*name) expand to {added} more nodes, over the limit of "
                f"{MAX_ALIAS_NODES}; write the repeated parts out or use fewer aliases"
            )
        return node


# YAML 1.1 (PyYAML) reads `1e-8` as a string; YAML 1.2 and every reader of the recipe
# expect a number, so exponents without a decimal point are floats here too.
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_value(text: str) -> Any:
    """A value written on the command line (`--param density=1e-1`), read as in a recipe."""
    return yaml.load(text, Loader=_RecipeLoader)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=_RecipeLoader)
    except _AliasBomb as exc:
        raise MergeError(f"recipe {path} is refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise MergeError(f"recipe {path} is not valid YAML: {exc}") from None
    except RecursionError:
        raise MergeError(
            f"recipe {path} is nested too deeply to read; a recipe needs a few levels at most"
        ) from None


def load_recipe(source: Recipe | Mapping[str, Any] | str | os.PathLike[str]) -> Recipe:
    """Build a Recipe from an object, a mapping or a YAML file; report every error at once."""
    if isinstance(source, Recipe):
        return source
    where = "recipe"
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise MergeError(f"recipe file not found: {path}")
        data = _read_yaml(path)
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

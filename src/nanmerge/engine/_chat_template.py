"""A recipe's `chat_template` set in the output's tokenizer files, as mergekit's is.

mergekit (`merge.py`, `_set_chat_template`) takes a literal Jinja template, one of its named
templates (the translator writes those out), or `auto`: the template most input models carry
(the first of the most common on a tie; none carried leaves the copied files as they are).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nanmerge._types import MergeError

AUTO = "auto"
CONFIG = "tokenizer_config.json"
JINJA = "chat_template.jinja"  # newer transformers read this file before tokenizer_config's


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MergeError(f"chat_template: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise MergeError(f"chat_template: {path} is not a JSON object")
    return data


def _carried(folder: Path) -> str | None:
    """The chat template an input's tokenizer files carry (its `default` one if named)."""
    jinja = folder / JINJA
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8").strip() or None
    if not (folder / CONFIG).is_file():
        return None
    template = _read_config(folder).get("chat_template")
    if isinstance(template, list):  # [{name, template}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def chat_template_files(
    template: str, copy_from: Path | None, inputs: Sequence[Path | None]
) -> dict[str, str]:
    """The tokenizer files (name -> text) to write over the copied ones so that the output
    carries `template`; empty when `auto` finds no input template. Raises before any merge
    work when the output would have no tokenizer_config.json to hold it."""
    if template == AUTO:
        found = [t for t in (_carried(f) for f in inputs if f is not None) if t is not None]
        if not found:
            return {}
        template = Counter(found).most_common(1)[0][0]
    if copy_from is None or not (copy_from / CONFIG).is_file():
        where = "the output's tokenizer files" if copy_from is None else str(copy_from)
        raise MergeError(
            f"chat_template: {where} has no {CONFIG} to set the template in; set "
            "copy_files_from (or mergekit's tokenizer_source) to a folder with a tokenizer"
        )
    config = _read_config(copy_from)
    config["chat_template"] = template
    files = {CONFIG: json.dumps(config, indent=2, ensure_ascii=False) + "\n"}
    if (copy_from / JINJA).is_file():
        files[JINJA] = template
    return files

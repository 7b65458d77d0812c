"""Multi-document recipes (mergekit-mega): YAML documents separated by `---`, each a merge
with its own output (`out_path`, or nanmerge's `output`), where a document may name an
earlier one's output as a model. The order and the references are checked before any work.

mergekit-mega (`scripts/megamerge.py`) runs each document after the ones whose `out_path` it
names and refuses a cycle; here a reference to a local path that neither exists nor is some
document's output is refused too, since it could only fail after the merges before it ran.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nanmerge._types import MergeError


def _output(doc: Mapping[str, Any]) -> Any:
    return doc.get("out_path", doc.get("output"))


def _references(doc: Mapping[str, Any]) -> list[str]:
    """The models a document reads: base, models and slice sources (mergekit's forms and
    nanmerge's)."""
    refs = [doc.get("base_model"), doc.get("base")]
    for entry in doc.get("models") or []:
        refs.append(entry.get("model", entry.get("path")) if isinstance(entry, Mapping) else entry)
    for piece in doc.get("slices") or []:
        sources = piece.get("sources") if isinstance(piece, Mapping) else None
        refs += [s.get("model") for s in sources or [] if isinstance(s, Mapping)]
    return [r for r in refs if isinstance(r, str)]


def _key(path: str) -> str:
    return os.path.normpath(os.path.expanduser(path))


def _looks_local(ref: str) -> bool:
    return ref.startswith(("./", "../", "/", "~", ".\\")) or ref in (".", "..")


def chain_order(documents: list[Any], where: str) -> list[int]:
    """The order to run the documents in (each after those whose output it reads, else in
    file order); raises one MergeError listing every document problem, a missing reference
    or a cycle among them."""
    problems: list[str] = []
    outputs: dict[str, int] = {}
    for i, doc in enumerate(documents):
        out = _output(doc) if isinstance(doc, Mapping) else None
        if not isinstance(out, str):
            problems.append(f"document {i + 1} has no `out_path` (each merge needs its output)")
        elif _key(out) in outputs:
            problems.append(
                f"documents {outputs[_key(out)] + 1} and {i + 1} both write {out}; give each "
                "its own out_path"
            )
        else:
            outputs[_key(out)] = i
    needs: dict[int, list[int]] = {}
    for i, doc in enumerate(documents):
        refs = _references(doc) if isinstance(doc, Mapping) else []
        needs[i] = [outputs[_key(r)] for r in refs if _key(r) in outputs]
        problems += [
            f"document {i + 1} reads {r}, which neither exists nor is a document's out_path"
            for r in refs
            if _looks_local(r) and _key(r) not in outputs and not Path(r).expanduser().exists()
        ]
    order: list[int] = []
    state: dict[int, str] = {}

    def visit(i: int, trail: list[int]) -> None:
        if state.get(i) == "done":
            return
        if state.get(i) == "open":
            cycle = [*trail[trail.index(i) :], i]
            problems.append(
                "documents read each other's outputs in a cycle: "
                + " -> ".join(f"{j + 1} ({_output(documents[j])})" for j in cycle)
            )
            return
        state[i] = "open"
        for j in needs[i]:
            visit(j, [*trail, i])
        state[i] = "done"
        order.append(i)

    for i in range(len(documents)):
        visit(i, [])
    if problems:
        listed = "\n".join(f"  - {p}" for p in dict.fromkeys(problems))
        raise MergeError(
            f"{where} holds {len(documents)} recipes (YAML documents) that cannot run as a "
            f"chain:\n{listed}"
        )
    return order

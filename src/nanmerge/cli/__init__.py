"""Command line: parse arguments, load a recipe, call the engine, print the report.

One file per concern: `_merge` (run, merge, coefficients), `_mergekit` (mergekit's flags and
chained recipes on run), `_inspect` (inspect, methods),
`_bench` (demo, bench, stats), `_rebuild` (rebuild), `_report` (what they print). The
engine, io, methods and learn (and with them torch) are imported inside the commands that
use them, so --help,
`methods`, `inspect --headers-only` and recipe errors answer at once.
"""

from __future__ import annotations

import ctypes

import click

from nanmerge.cli._bench import bench, demo, stats
from nanmerge.cli._inspect import inspect_command, methods
from nanmerge.cli._merge import coefficients, merge, run
from nanmerge.cli._rebuild import rebuild
from nanmerge.cli._search import search

__all__ = ["main"]


@click.group()
@click.version_option(package_name="nanmerge")
def main() -> None:
    """nanmerge: merge fine-tuned models with norm-aware (NAN) coefficients."""
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse rather than hand it back to the kernel.

    A merge frees and allocates tensor-sized buffers all the time; by default glibc returns
    large ones to the kernel, and each reuse then faults in fresh zeroed pages (on the
    `small` benchmark model: 390K page faults and 2.8 s of system time per merge, against
    144K and 1.2 s with this; peak RSS unchanged). Only the CLI does this, since it owns
    its process; a library call leaves the caller's allocator alone. No-op off glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: heap, not mmap, up to glibc's 32 MiB maximum


for _command in (run, merge, coefficients, inspect_command, methods, demo, bench, stats, rebuild):
    main.add_command(_command)
main.add_command(search)

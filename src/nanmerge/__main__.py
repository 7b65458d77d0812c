"""`python -m nanmerge` runs the CLI."""

from nanmerge.cli import main

main()

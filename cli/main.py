"""The `featurestore` command. Each command lives in its own module of `cli/`: it parses its
options into a typed config, calls one pipeline function, and prints or writes its result."""

from cli import (  # noqa: F401  (each module registers its commands)
    backbones, cka, correspond, datasets, demo, depth, extract, fewshot, heads, inspect_store, knn, probe, report,
    retrieve, segment, sweep, text_embed, verify,
)
from cli.app import EXIT_ERROR, EXIT_SOME_FAILED, app

__all__ = ["EXIT_ERROR", "EXIT_SOME_FAILED", "app"]

if __name__ == "__main__":
    app()

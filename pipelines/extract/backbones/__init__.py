"""Backbones, one registered file each. Importing this package registers them all."""

from pipelines.extract.backbones import ddpm_mnist  # noqa: F401

"""Backbones, one registered file each (see pipelines.extract.backbone._import_backbones)."""

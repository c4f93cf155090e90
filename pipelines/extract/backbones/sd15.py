"""SD v1.5's names at the import path they had before the generic `sd` backbone (sd.py), where the
`sd15` preset is now defined and registered."""

from pipelines.extract.backbones.sd import PRESETS, SD15_UNET_CONFIG, SD_SCHEDULE, alphas_cumprod_from
from pipelines.extract.weights import folder_digest

HUB_IDS = PRESETS["sd15"].hub_ids

__all__ = ["HUB_IDS", "SD15_UNET_CONFIG", "SD_SCHEDULE", "alphas_cumprod_from", "folder_digest"]

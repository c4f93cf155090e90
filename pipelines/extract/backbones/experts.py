"""Experts for fusion heads: classifiers that ignore the timestep (extracted once, stored under t = None).

- `resnet18`: ImageNet ResNet-18 with torchvision's state-dict keys (`conv1`, `bn1`,
  `layerK.N.conv1/bn1/conv2/bn2`, `layerK.0.downsample.0/1`, `fc`); no default weights, pass the
  local torchvision file (`--weights resnet18-f37072fd.pth`).
- `resnet20-cifar10`: the CIFAR ResNet-20 of akamaster/pytorch_resnet_cifar10 (3 stages x 3
  BasicBlocks, 16/32/64 channels, parameter-free "option A" shortcut, `linear` classifier); its
  checkpoint's `module.` prefix (from DataParallel) is stripped on load.

Both take images in [0, 1] and apply the ImageNet mean/std normalisation inside `forward_blocks`
(the akamaster CIFAR models were trained with the same statistics), so the reader stays generic:
it only resizes and scales to the declared InputSpec.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.extract.backbone import Backbone, InputSpec, register_backbone
from pipelines.extract.weights import materialize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Shortcut = Callable[[int, int, int], nn.Module]  # (in channels, out channels, stride) -> module


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut. The architectures differ only in the shortcut
    (`downsample`) used when a block changes resolution or width; identity otherwise."""

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: Shortcut):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = shortcut(c_in, c_out, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.downsample(x))


def projection_shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    """torchvision's shortcut: strided 1x1 conv + BN (keys `downsample.0`, `downsample.1`)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


class PadShortcut(nn.Module):
    """akamaster's "option A": subsample by 2 and zero-pad the channels; no parameters."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        if stride != 2 or c_out != 2 * c_in:
            raise ValueError(f"option-A shortcut needs stride 2 and doubled width, got {c_in}->{c_out} stride {stride}")
        self.pad = c_out // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class ResNet(nn.Module):
    """conv1-bn1-relu(-maxpool) stem, stages `layer1..` of BasicBlocks (every stage after the first
    halves the resolution), global average pool, and a linear classifier under the checkpoint's name."""

    def __init__(
        self, stem: nn.Conv2d, maxpool: bool, widths: Sequence[int], depth: int, shortcut: Shortcut,
        classes: int, classifier: str,
    ):
        super().__init__()
        self.conv1 = stem
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if maxpool else nn.Identity()
        self.stages = [f"layer{i + 1}" for i in range(len(widths))]
        c_in = widths[0]
        for i, (name, width) in enumerate(zip(self.stages, widths)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(c_in if k == 0 else width, width, stride if k == 0 else 1, shortcut) for k in range(depth)]
            self.add_module(name, nn.Sequential(*blocks))
            c_in = width
        self.classifier = classifier
        self.add_module(classifier, nn.Linear(widths[-1], classes))

    def features(self, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (block name, output) in forward order; the caller stops consuming when done."""
        h = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        yield "stem", h
        for name in self.stages:
            h = getattr(self, name)(h)
            yield name, h
        h = F.adaptive_avg_pool2d(h, 1)
        yield "pool", h
        yield "logits", getattr(self, self.classifier)(h.flatten(1))[:, :, None, None]


def resnet18() -> ResNet:
    return ResNet(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), True, (64, 128, 256, 512), 2,
                  projection_shortcut, 1000, "fc")


def resnet20() -> ResNet:
    return ResNet(nn.Conv2d(3, 16, 3, padding=1, bias=False), False, (16, 32, 64), 3, PadShortcut, 10, "linear")


def fill_bn_counters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints saved before PyTorch 0.4.1 (akamaster's, torchvision's ImageNet files) lack the
    BatchNorm `num_batches_tracked` counters; they are unused in eval, so add them as 0 rather than
    refuse the file. Every other key is still checked strictly."""
    counters = {k.removesuffix("running_mean") + "num_batches_tracked" for k in state if k.endswith(".running_mean")}
    return state | {k: torch.tensor(0) for k in counters if k not in state}


def from_data_parallel(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """akamaster saved the DataParallel wrapper's state dict: strip its `module.` prefix."""
    return fill_bn_counters({k.removeprefix("module."): v for k, v in state.items()})


class ExpertBackbone(Backbone):
    """A ResNet classifier as a timestep-free backbone: t is ignored and is None in extraction."""

    timestep_free = True
    default_timesteps = ()
    BLOCKS: ClassVar[dict[str, tuple[int, int, int]]]

    def __init__(self, module: ResNet, weights_digest: str):
        self.module = module
        self.weights_digest = weights_digest

    @property
    def blocks(self) -> dict[str, tuple[int, int, int]]:
        return dict(self.BLOCKS)

    def forward_blocks(
        self, x_t: torch.Tensor, t: torch.Tensor | None, blocks: Sequence[str], cond: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        unknown = [b for b in blocks if b not in self.BLOCKS]
        if unknown:
            raise ValueError(f"{self.name} has no block {', '.join(unknown)}; blocks: {', '.join(self.BLOCKS)}")
        mean = x_t.new_tensor(IMAGENET_MEAN)[:, None, None]
        std = x_t.new_tensor(IMAGENET_STD)[:, None, None]
        wanted, out = set(blocks), {}
        for name, h in self.module.features((x_t - mean) / std):
            if name in wanted:
                out[name] = h
                if len(out) == len(wanted):
                    break
        return out


class ResNet18Backbone(ExpertBackbone):
    name = "resnet18"
    input = InputSpec(size=224, channels=3, value_range=(0.0, 1.0))
    BLOCKS: ClassVar[dict[str, tuple[int, int, int]]] = {
        "stem": (64, 56, 56), "layer1": (64, 56, 56), "layer2": (128, 28, 28), "layer3": (256, 14, 14),
        "layer4": (512, 7, 7), "pool": (512, 1, 1),
    }


class ResNet20Backbone(ExpertBackbone):
    name = "resnet20-cifar10"
    input = InputSpec(size=32, channels=3, value_range=(0.0, 1.0))
    BLOCKS: ClassVar[dict[str, tuple[int, int, int]]] = {
        "stem": (16, 32, 32), "layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8),
        "pool": (64, 1, 1), "logits": (10, 1, 1),
    }


@register_backbone("resnet18", "ImageNet ResNet-18 expert (11.7M parameters, 224 px, torchvision keys; --weights FILE); blocks stem, layer1..layer4, pool")
def build_resnet18(weights: Path | str | None, config: dict | None, device: str) -> ResNet18Backbone:
    if config:
        raise ValueError("resnet18 takes no --backbone-config")
    return ResNet18Backbone(*materialize(resnet18, weights, None, device, convert=fill_bn_counters))


@register_backbone("resnet20-cifar10", "CIFAR-10 ResNet-20 expert of akamaster (270k parameters, 32 px; --weights FILE); blocks stem, layer1..layer3, pool, logits")
def build_resnet20(weights: Path | str | None, config: dict | None, device: str) -> ResNet20Backbone:
    if config:
        raise ValueError("resnet20-cifar10 takes no --backbone-config")
    return ResNet20Backbone(*materialize(resnet20, weights, None, device, convert=from_data_parallel))

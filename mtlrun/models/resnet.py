"""ResNet models (`model=resnet50_dilated`, `model=resnet18_multihead`) and their offline ImageNet weights."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from mtlrun.constraints import integer
from mtlrun.errors import MtlrunError
from mtlrun.settings.declare import Choice
from mtlrun.models.base import MultiTaskModel
from mtlrun.tasks import Task

# torchvision is imported only where a ResNet part is built: importing it takes seconds (torchvision.ops
# pulls in torch._dynamo), which every run and CLI start of the other models would otherwise pay.
if TYPE_CHECKING:
    from torchvision.models import ResNet

STEMS = ("cifar", "imagenet")


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its average pooling and fc: the stem and layer1..4, giving layer4's
    feature map (LibMTL's `ResnetDilated` forward). Parameter names are torchvision's, so its ImageNet
    state_dict loads as is, less `fc.*`."""

    def __init__(self, resnet: ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        self.out_channels = resnet.fc.in_features

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# --- torchvision's ImageNet weights, from a local file only ---------------------------------------


def weights_file(arch: str, weights_path: str | None = None) -> Path:
    """`weights_path` if given, else where torchvision caches the weights (`<torch hub dir>/checkpoints/`)."""
    if weights_path:
        return Path(weights_path).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / _file_name(arch)


def _file_name(arch: str) -> str:
    from torchvision.models import ResNet18_Weights, ResNet50_Weights

    weights = {"resnet18": ResNet18_Weights.IMAGENET1K_V1, "resnet50": ResNet50_Weights.IMAGENET1K_V1}[arch]
    return Path(urlparse(weights.url).path).name


def load_imagenet_weights(trunk: ResNetTrunk, arch: str, weights_path: str | None = None) -> None:
    """Load torchvision's ImageNet weights of `arch` into `trunk` from a local file; nothing is downloaded.
    A missing, unreadable or mismatched file stops with one line saying which file is needed and where."""
    path, name = weights_file(arch, weights_path), _file_name(arch)
    command = f"import torchvision; torchvision.models.{arch}(weights='IMAGENET1K_V1')"
    how = (
        f'on a machine with internet, python -c "{command}" saves it as <torch hub dir>/checkpoints/{name} '
        "(~/.cache/torch/hub by default)"
    )
    fix = f"replace it with {name}: {how}; or set model.pretrained=false"
    if not path.is_file() and weights_path:
        raise MtlrunError(
            f"model.weights_path={path}: no such file; it must hold torchvision's ImageNet weights "
            f"for {arch}: {how}; or set model.pretrained=false"
        )
    if not path.is_file():
        raise MtlrunError(
            f"model.pretrained=true needs torchvision's ImageNet weights for {arch} at {path}, and nothing "
            f"is downloaded at run time: {how}; copy it to {path}, or pass model.weights_path=FILE, "
            "or set model.pretrained=false"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # damaged bytes make the unpickler raise anything (IndexError...)
        problem = f"is not a readable PyTorch weights file ({_one_line(error)})"
        raise MtlrunError(f"{path} {problem}; {fix}") from None
    if not isinstance(state, dict):
        raise MtlrunError(f"{path} holds a {type(state).__name__}, not a state_dict; {fix}")
    try:
        trunk.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=True)
    except RuntimeError as error:
        problem = f"does not hold torchvision's {arch} weights ({_one_line(error)})"
        raise MtlrunError(f"{path} {problem}; {fix}") from None


def _one_line(error: BaseException) -> str:
    """The error's type and first sentence (torch.load's later ones suggest weights_only=False)."""
    first = str(error).strip().split(". ")[0]
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return textwrap.shorten(text, 300, placeholder=" ...")


def _pretrain(trunk: ResNetTrunk, arch: str, pretrained: bool, weights_path: str | None) -> None:
    if pretrained:
        load_imagenet_weights(trunk, arch, weights_path)
    elif weights_path:
        raise MtlrunError("model.weights_path is read only with model.pretrained=true: set that, or drop it")


# --- MTAN's shared f on ResNets: a residual block of the trunk's kind, as LibMTL's -------------------


def residual_block(cin: int, cout: int) -> nn.Module:
    """A ResNet-18 basic block from cin to cout channels at stride 1, its shortcut a conv1x1-BN projection."""
    from torchvision.models.resnet import BasicBlock

    shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
    return BasicBlock(cin, cout, downsample=shortcut)


def bottleneck_block(cin: int, cout: int) -> nn.Module:
    """A ResNet-50 bottleneck block from cin to cout channels (width cout / 4) at stride 1, its shortcut a
    conv1x1-BN projection."""
    from torchvision.models.resnet import Bottleneck

    shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
    return Bottleneck(cin, cout // Bottleneck.expansion, downsample=shortcut)


# --- heads ---------------------------------------------------------------------------------------


def pooled_linear(cin: int, cout: int, pooled_size: int = 1) -> nn.Sequential:
    """A per-image head: average pooling to pooled_size x pooled_size cells, flattened, then one linear."""
    pool = nn.AdaptiveAvgPool2d(pooled_size)
    return nn.Sequential(pool, nn.Flatten(), nn.Linear(cin * pooled_size**2, cout))


def upsampling_head(cin: int, cout: int) -> nn.Sequential:
    """A light dense head: twice (x2 bilinear upsampling, conv3x3-BN-ReLU), cin -> 128 -> 64, then conv1x1."""

    def up(a: int, b: int) -> list[nn.Module]:
        return [
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
        ]

    return nn.Sequential(*up(cin, 128), *up(128, 64), nn.Conv2d(64, cout, 1))


# --- the models ----------------------------------------------------------------------------------


def resnet50_dilated_trunk(pretrained: bool = False, weights_path: str | None = None) -> ResNetTrunk:
    """ResNet-50 with layer3 and layer4 dilated instead of strided (output stride 8), as LibMTL's
    `resnet_dilated('resnet50')`, from ImageNet weights when `pretrained`."""
    from torchvision.models import resnet50

    trunk = ResNetTrunk(resnet50(replace_stride_with_dilation=[False, True, True]))
    _pretrain(trunk, "resnet50", pretrained, weights_path)
    return trunk


def resnet50_dilated_head(cin: int, task: Task) -> nn.Module:
    """DeepLab-v3's ASPP head for a dense task, global average pooling and a linear layer for a per-image one."""
    from mtlrun.models.deeplab import BatchCheckedDeepLabHead

    return BatchCheckedDeepLabHead(cin, task.out_channels) if task.dense else pooled_linear(cin, task.out_channels)


def build_resnet50_dilated(
    tasks: list[Task], pretrained: bool = False, weights_path: str | None = None
) -> MultiTaskModel:
    """LibMTL's NYUv2 model (`examples/nyu/main.py`: `resnet_dilated('resnet50')` + `DeepLabHead(2048, ...)`):
    ResNet-50 with layer3 and layer4 dilated instead of strided (output stride 8; torchvision's
    `replace_stride_with_dilation=[False, True, True]` sets the same strides and dilations as LibMTL's
    `_nostride_dilate`) shared; per dense task DeepLab-v3's head (ASPP with rates 12, 24, 36, conv3x3-BN-ReLU,
    conv1x1: torchvision's `DeepLabHead`, of which LibMTL's `aspp.py` is a copy); per-image tasks global
    average pooling and a linear layer. LibMTL starts from ImageNet weights (`pretrained=true` here)."""
    trunk = resnet50_dilated_trunk(pretrained, weights_path)
    heads = {t.name: resnet50_dilated_head(trunk.out_channels, t) for t in tasks}
    return MultiTaskModel(trunk, heads, align_corners=True)  # LibMTL's `process_preds` upsamples so


def check_resnet18_settings(pretrained: bool, stem: str, pooled_size: int) -> int:
    """The pooled size, once the ResNet-18 settings are known to fit together."""
    Choice(STEMS)("model.stem", stem)
    if pretrained and stem != "imagenet":
        raise MtlrunError(
            "model.pretrained=true loads ImageNet weights made for torchvision's stem: "
            "set model.stem=imagenet too"
        )
    return integer("model.pooled_size", pooled_size, 1)


def resnet18_trunk(pretrained: bool = False, weights_path: str | None = None, stem: str = "cifar") -> ResNetTrunk:
    """A ResNet-18 trunk with the `cifar` stem (3x3 stride-1 conv, no max-pooling) or torchvision's."""
    from torchvision.models import resnet18

    resnet = resnet18()
    if stem == "cifar":
        resnet.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        # initialised as torchvision initialises its own convs
        nn.init.kaiming_normal_(resnet.conv1.weight, mode="fan_out", nonlinearity="relu")
        resnet.maxpool = nn.Identity()
    trunk = ResNetTrunk(resnet)
    _pretrain(trunk, "resnet18", pretrained, weights_path)
    return trunk


def resnet18_head(cin: int, task: Task, pooled_size: int) -> nn.Module:
    """`upsampling_head` for a dense task, `pooled_linear` on pooled_size x pooled_size cells for a per-image one."""
    return upsampling_head(cin, task.out_channels) if task.dense else pooled_linear(cin, task.out_channels, pooled_size)


def build_resnet18_multihead(
    tasks: list[Task],
    pretrained: bool = False,
    weights_path: str | None = None,
    stem: str = "cifar",
    pooled_size: int = 2,
) -> MultiTaskModel:
    """Sener & Koltun's CelebA model (MGDA-UB, NeurIPS 2018; isl-org/MultiObjectiveOptimization
    `multi_task/models/multi_faces_resnet.py`): a ResNet-18 trunk shared, one linear layer per task on its
    pooled layer4 features. Their trunk has the `cifar` stem (3x3 stride-1 conv, no max-pooling) and
    average-pools the 8x8 layer4 map of a 64x64 image with a 4x4 window: `pooled_size=2`, a 2048-d
    representation (`FaceAttributeDecoder` is Linear(2048, 2) + log-softmax per attribute; one logit per
    attribute with BCE here). `stem=imagenet` is torchvision's 7x7 stride-2 conv and max-pooling, needed
    for `pretrained=true`. Dense tasks (not in MGDA-UB) get `upsampling_head` on the layer4 map."""
    size = check_resnet18_settings(pretrained, stem, pooled_size)
    trunk = resnet18_trunk(pretrained, weights_path, stem)
    heads = {t.name: resnet18_head(trunk.out_channels, t, size) for t in tasks}
    return MultiTaskModel(trunk, heads)

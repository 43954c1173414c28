"""`model=celeba_cnn`: the CelebA CNN of Pascal et al. and FAMO, seven convs and two FCs shared, a linear head per task."""

from __future__ import annotations

from torch import Tensor, nn

from mtlrun.constraints import integer
from mtlrun.errors import MtlrunError
from mtlrun.models.base import MultiTaskModel
from mtlrun.tasks import Task

# Each conv's channels as a multiple of `width`, and whether a 2x2 max-pooling follows it.
CONVS = ((1, True), (2, False), (2, True), (4, False), (4, True), (8, False), (8, False))


class CelebaCNN(nn.Module):
    """Seven conv3x3-BN-ReLU layers of 64-128-128-256-256-512-512 channels (width 64) with 2x2 max-pooling
    after the first, third and fifth; for per-image tasks, global average pooling and two FC-BN-ReLU layers of
    512 units: lucaspascal/AITSO_MTL `celeba/models/cnn.py` and Cranial-XIX/FAMO `experiments/celeba/models.py`.
    Convs and FCs have no bias (FAMO's; the batch norm after them removes any constant, so the authors' FC
    biases never move). `running_stats=False` normalises with each batch's own statistics in evaluation too,
    as the authors' `track_running_stats=False`; FAMO keeps running statistics.

    Gives the pooled vector when every task is per-image, the last conv map (1/8 of the input) when every
    task is dense, both (map, vector) otherwise, so a per-image-only model has one representation (MGDA-UB)."""

    def __init__(self, width: int, running_stats: bool, dense: bool, per_image: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for multiple, pool in CONVS:
            cout = multiple * width
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                       nn.BatchNorm2d(cout, track_running_stats=running_stats), nn.ReLU(inplace=True)]
            layers += [nn.MaxPool2d(2)] if pool else []
            cin = cout
        fc = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            *(m for _ in range(2) for m in (nn.Linear(cin, cin, bias=False),
                                            nn.BatchNorm1d(cin, track_running_stats=running_stats),
                                            nn.ReLU(inplace=True))),
        ) if per_image else None
        # With dense tasks too, the FCs are registered first: the last shared layer (GradNorm's W) must be one
        # every task reaches, the last conv, not an FC that dense tasks bypass.
        if dense:
            self.fc = fc
        self.convs = nn.Sequential(*layers)
        if not dense:
            self.fc = fc
        self.dense, self.running_stats, self.out_channels = dense, running_stats, cin

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        self._check(x)
        features = self.convs(x)
        if self.fc is None:
            return features
        vector = self.fc(features)
        return (features, vector) if self.dense else vector

    def _check(self, x: Tensor) -> None:
        n, (height, width) = x.shape[0], x.shape[-2:]
        if min(height, width) < 8:
            raise MtlrunError(
                f"model=celeba_cnn pools 3 times and needs images of at least 8x8 pixels, got {height}x{width}"
            )
        deepest = 1 if self.fc is not None else (height // 8) * (width // 8)  # values per channel and image
        if n * deepest == 1 and (self.training or not self.running_stats):
            why = "" if self.training else (
                " (model.running_stats=false normalises evaluation batches by their own statistics too: choose "
                "trainer.eval_batch_size so that no split ends on one image, or set model.running_stats=true)"
            )
            raise MtlrunError(f"model=celeba_cnn's batch norm needs batches of at least 2 images{why}")


class Reads(nn.Module):
    """A head reading one part of the encoder's output (`part` of a tuple), or all of it (`part` None)."""

    def __init__(self, head: nn.Module, part: int | None) -> None:
        super().__init__()
        self.head, self.part = head, part

    def forward(self, features: Tensor | tuple[Tensor, ...]) -> Tensor:
        return self.head(features if self.part is None else features[self.part])


def build(tasks: list[Task], width: int = 64, running_stats: bool = True) -> MultiTaskModel:
    """The CNN shared; per task a linear layer on the 512-d vector (the authors' and FAMO's heads). Dense tasks
    (not in either paper) get a 1x1 conv on the last conv map, upsampled bilinearly to the image."""
    integer("model.width", width, 1)
    dense, per_image = any(t.dense for t in tasks), any(not t.dense for t in tasks)
    encoder = CelebaCNN(int(width), bool(running_stats), dense, per_image)
    c = encoder.out_channels
    both = dense and per_image
    heads = {
        t.name: Reads(nn.Conv2d(c, t.out_channels, 1), 0 if both else None) if t.dense
        else Reads(nn.Linear(c, t.out_channels), 1 if both else None)
        for t in tasks
    }
    return MultiTaskModel(encoder, heads)

"""DeepLab-v3's ASPP head of the dilated ResNet-50, apart so that torchvision loads only when one is built."""

from __future__ import annotations

from torch import Tensor
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from mtlrun.errors import MtlrunError


class BatchCheckedDeepLabHead(DeepLabHead):
    """DeepLab-v3's head, refusing in training a batch of one image, on which the batch norm after its
    image-pooling branch (one value per channel) cannot be computed."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] == 1:
            raise MtlrunError(
                "the dilated ResNet-50's ASPP heads train on batches of at least 2 images (the batch norm of "
                "their pooling branch needs them): set trainer.batch_size >= 2"
            )
        return super().forward(x)

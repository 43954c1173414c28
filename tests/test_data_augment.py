"""Training augmentation: every target moves with the image, depth is rescaled, normals flip, draws resume."""

import pytest
import torch

from mtlrun.data.augment import Augment
from mtlrun.errors import MtlrunError
from mtlrun.tasks import BinaryAttributes, Depth, Normal, Segmentation

TASKS = [Segmentation("seg", 4), Depth("depth"), Normal("normal"), BinaryAttributes("attr", ["a", "b"])]


def _batch(n: int = 6, height: int = 24, width: int = 32) -> dict[str, torch.Tensor]:
    """Vertical stripes 4 px wide: the label is the stripe's class (-1 on every 5th stripe), the image's
    channel 0 and the normals' y component carry the same value, depth is label + 2 (valid everywhere)."""
    stripe = torch.arange(width) // 4
    label = torch.where(stripe % 5 == 4, -1, stripe % 4).expand(n, height, width).clone()
    field = label.float()
    normal = torch.stack([torch.linspace(-1, 1, width).expand(n, height, width), field, torch.ones_like(field)], 1)
    return {
        "image": torch.stack([field, field + 10, -field], 1),
        "seg": label.to(torch.int16),
        "depth": field + 2,
        "normal": normal,
        "attr": torch.tensor([[0, 1]] * n),
    }


def test_scale_crop_keeps_targets_aligned_and_divides_depth_by_the_scale():
    batch = _batch()
    out = Augment(TASKS, scales=[1.5], flip=False, seed=0)(batch)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in batch.items()}
    assert out["seg"].dtype == torch.int16
    # Labels and depth both come by nearest neighbour from the same crop: exactly aligned, depth / 1.5.
    torch.testing.assert_close(out["depth"] * 1.5, out["seg"].float() + 2)
    # Image and normals both come bilinearly from the same crop: exactly aligned.
    torch.testing.assert_close(out["normal"][:, 1], out["image"][:, 0])
    assert set(out["seg"].unique().tolist()) <= {-1, 0, 1, 2, 3}  # nearest never invents a class
    # Where the bilinear image is a whole stripe value, the nearest label is almost always that stripe.
    whole = (out["image"][:, 0] - out["image"][:, 0].round()).abs() < 1e-4
    agree = out["image"][:, 0][whole].round() == out["seg"][whole].float()
    assert agree.float().mean() > 0.9
    # A 1/1.5 crop of 32 px of 4-px stripes shows at most 6 stripes, each widened to about 6 px.
    assert all(len(row.unique_consecutive()) <= 7 for row in out["seg"][:, 0])
    assert torch.equal(out["attr"], batch["attr"])


def test_crop_positions_vary_and_stay_inside_the_image():
    out = Augment(TASKS, scales=[1.5], flip=False, seed=3)(_batch(n=32))
    first_columns = out["depth"][:, 0, 0] * 1.5 - 2
    assert len(first_columns.unique()) > 1  # different samples, different crops
    assert (out["depth"] > 0).all()  # never outside the image (no zero padding)


def test_flip_mirrors_every_dense_target_and_negates_normals_x():
    batch = _batch(n=16)
    out = Augment(TASKS, scales=[1.0], flip=True, seed=0)(batch)
    flipped = out["image"][:, 0, 0, 0] != batch["image"][:, 0, 0, 0]
    assert 0 < flipped.sum() < 16
    for i in range(16):
        if flipped[i]:
            assert torch.equal(out["image"][i], batch["image"][i].flip(-1))
            assert torch.equal(out["seg"][i], batch["seg"][i].flip(-1))
            assert torch.equal(out["depth"][i], batch["depth"][i].flip(-1))
            assert torch.equal(out["normal"][i, 0], -batch["normal"][i, 0].flip(-1))
            assert torch.equal(out["normal"][i, 1:], batch["normal"][i, 1:].flip(-1))
        else:
            assert all(torch.equal(out[k][i], batch[k][i]) for k in batch)


def test_draws_are_seeded_and_resume_from_the_state():
    first, second = Augment(TASKS, [1.0, 1.2, 1.5], True, seed=1), Augment(TASKS, [1.0, 1.2, 1.5], True, seed=1)
    a, b = first(_batch()), second(_batch())
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = first.state_dict()
    expected = first(_batch())
    resumed = Augment(TASKS, [1.0, 1.2, 1.5], True, seed=99)
    resumed.load_state_dict(state)
    got = resumed(_batch())
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not torch.equal(expected["depth"], a["depth"])  # the next draw differs from the first


def test_identity_settings_are_inactive_and_bad_scales_refused():
    assert not Augment(TASKS, [1.0], False, seed=0).active
    assert Augment(TASKS, [1.0], True, seed=0).active
    with pytest.raises(MtlrunError, match="scales"):
        Augment(TASKS, [0.5], False, seed=0)
    with pytest.raises(MtlrunError, match="scales"):
        Augment(TASKS, [], False, seed=0)

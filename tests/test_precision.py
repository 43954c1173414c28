"""trainer.dtype: a float64 run holds parameters, activations, losses, optimizer state and every strategy's
tensors in float64, starts from its float32 twin's weights and draws, and leaves the default dtype as it was."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from mtlrun import CONF_DIR
from mtlrun.data import build_shapes
from mtlrun.errors import MtlrunError
from mtlrun.precision import LossScaler, Precision, run_dtype
from mtlrun.train.build import build_run, seed_everything

# Strategies that keep tensors of their own (weights, log-variances, logits, random draws, solvers' inputs).
STRATEGIES = ["alternating", "averaged", "uncertainty", "famo", "rlw", "mgda", "nash_mtl", "gradnorm", "dwa"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype")
    build_shapes(root / "shapes-32px-16-8-8-seed0.h5", 32, 16, 8, 8, generator_seed=0)
    return root


def _build(tiny_data, dtype: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"data_dir={tiny_data}", "dataset.image_size=32", "dataset.num_train=16", "dataset.num_val=8",
            "dataset.num_test=8", "trainer.batch_size=4", "model.width=4", "dataset.augment.scales=[1.0,1.5]",
            "dataset.augment.flip=true", *overrides])
    seed_everything(0, False)
    with run_dtype(dtype):
        run = build_run(cfg, torch.device("cpu"), 1, cfg.trainer.batch_size)
    run.model.train()
    return run


def _tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_float64_run_computes_in_float64_from_its_float32_twins_weights(tiny_data, strategy):
    twin = _build(tiny_data, "float32", f"strategy={strategy}")
    run = _build(tiny_data, "float64", f"strategy={strategy}")
    assert torch.get_default_dtype() == torch.float32  # restored after the block
    for (name, p), q in zip(run.model.state_dict().items(), twin.model.state_dict().values()):
        assert p.dtype == (torch.float64 if q.is_floating_point() else q.dtype), name
        assert torch.equal(p, q.to(p.dtype)), f"{name}: not the float32 run's initial value"
    with run_dtype("float64"):
        for _ in range(2):
            losses = run.strategy.iteration(run.ctx)
            run.ctx.counts.iterations += 1
    assert all(v.dtype == torch.float64 for v in losses.values())
    floating = [t for t in _tensors(run.optimizer.state_dict()) + _tensors(run.strategy.state_dict())
                if t.is_floating_point()]
    assert floating and all(t.dtype == torch.float64 for t in floating)
    assert all(p.dtype == torch.float64 for p in run.model.parameters())


def test_float64_and_float32_take_the_same_first_step_to_float32_accuracy(tiny_data):
    """One SGD step from the same weights on the same (augmented) batch: the twins differ by float32 rounding
    alone, so they agree to a few float32 ulps of the update, and float64 moves the weights too."""
    runs = {d: _build(tiny_data, d, "optimizer=sgd", "optimizer.lr=0.1", "strategy=averaged") for d in
            ("float32", "float64")}
    before = {n: p.detach().double().clone() for n, p in runs["float64"].model.named_parameters()}
    for dtype, run in runs.items():
        with run_dtype(dtype):
            run.strategy.iteration(run.ctx)
    moved = 0.0
    for (name, p64), p32 in zip(runs["float64"].model.named_parameters(), runs["float32"].model.parameters()):
        step64, step32 = p64.detach() - before[name], p32.detach().double() - before[name]
        moved = max(moved, float(step64.abs().max()))
        scale = float(step64.abs().max()) + 1e-12
        torch.testing.assert_close(step32, step64, rtol=0, atol=1e-3 * scale, msg=name)
    assert moved > 1e-4


def test_dtype_settings_are_checked(tiny_data):
    with pytest.raises(MtlrunError, match="trainer.dtype='float16' is invalid; valid: float32, float64"):
        with run_dtype("float16"):
            pass
    with pytest.raises(MtlrunError, match="trainer.precision=bf16 autocasts a float32 run"):
        _build(tiny_data, "float64", "trainer.precision=bf16")
    assert torch.get_default_dtype() == torch.float32


def test_loss_scaled_gradients_of_fp16_activations_are_unscaled_in_full_precision():
    """A gradient w.r.t. an fp16 tensor (MGDA-UB's representation under autocast) is representable once scaled
    (1e-9 * 2**16 = 6.6e-5) but not after dividing in fp16 (1e-9 is under fp16's smallest subnormal, 6e-8):
    unscaled in full precision it keeps its value."""
    z = torch.ones(3, dtype=torch.float16, requires_grad=True)
    precision = Precision("fp16", "cpu", LossScaler(scale=2.0**16))
    (grad,) = precision.grad((z.float() * 1e-9).sum(), [z])
    assert grad.dtype == torch.float32
    assert torch.allclose(grad, torch.full((3,), 1e-9), rtol=1e-3) and (grad > 0).all()

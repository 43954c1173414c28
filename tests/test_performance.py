"""Speed features on the CPU: fp16 loss scaling (exact, and skipping a step whole), bf16/fp16 autocast with fp32
optimizer state, channels-last, and torch.compile without a recompilation per subset of heads."""

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir

from mtlrun import CONF_DIR
from mtlrun.data import build_shapes
from mtlrun.errors import MtlrunError
from mtlrun.optim import MultiTaskOptimizer, OptimizerSettings
from mtlrun.precision import LossScaler, Precision, run_dtype
from mtlrun.strategies import STRATEGIES, LossCombiner, build_strategy
from mtlrun.strategies.alternating import Alternating
from mtlrun.strategies.base import StepContext
from mtlrun.train.build import build_run, compiled_graphs, seed_everything
from tests.helpers import Regression, batches, linear_model

TASKS = ["a", "b", "c"]


def _context(data: list[dict], precision: Precision, seed: int = 0) -> StepContext:
    model = linear_model(TASKS, seed=seed)
    settings = OptimizerSettings(name="adam", lr=0.01, moments="per_task")
    optimizer = MultiTaskOptimizer(model.shared_parameters(), {t: model.task_parameters(t) for t in TASKS}, settings)
    return StepContext(model, [Regression(t) for t in TASKS], optimizer, iter(data), lambda b: b, precision)


def _poisoned(data: list[dict], index: int, task: str) -> list[dict]:
    """The same batches, but in batch `index` task `task`'s targets are so large that its gradient, finite
    unscaled (~1e36), overflows float32 once the loss is scaled: what fp16 overflow looks like."""
    data = copy.deepcopy(data)
    data[index][task] = torch.full_like(data[index][task], 1e37)
    return data


def test_loss_scaling_by_a_power_of_two_changes_no_bit():
    data = batches(TASKS, count=8)
    plain = _context(data, Precision())
    scaled = _context(data, Precision(scaler=LossScaler(scale=2.0**12)))
    for ctx in (plain, scaled):
        strategy = Alternating(TASKS, seed=0, order="fixed")
        for _ in range(8):
            strategy.iteration(ctx)
    for p, q in zip(plain.model.parameters(), scaled.model.parameters()):
        assert torch.equal(p, q)


def _same(a: object, b: object) -> bool:
    """Exactly equal nested states (tensors bit for bit, generator states included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_skipped_alternating_step_skips_only_its_task_and_lowers_the_scale():
    data = _poisoned(batches(TASKS, count=6), index=3, task="b")
    ctx = _context(data, Precision(scaler=LossScaler(scale=1024.0)))
    strategy = Alternating(TASKS, seed=0, order="fixed")
    for _ in range(6):
        strategy.iteration(ctx)
    # A hand-written loop on the same batches that leaves out exactly task b's step of iteration 4.
    ref = _context(data, Precision())
    for i in range(6):
        batch = next(ref._batches)
        for t in TASKS:
            if (i, t) != (3, "b"):
                ref.step([t], ref.losses(batch, [t])[t])
    for p, q in zip(ctx.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    steps = {t: ctx.optimizer.shared.slots[t]["step"] for t in TASKS}
    assert steps == {"a": 6, "b": 5, "c": 6} and ctx.optimizer.heads["b"].slots["b"]["step"] == 5
    assert ctx.counts.skipped_steps == 1 and ctx.counts.optimizer_steps == 17
    assert ctx.precision.scaler.scale == 512.0
    for slot in ctx.optimizer.shared.slots.values():
        assert torch.isfinite(slot["exp_avg"]).all() and torch.isfinite(slot["exp_avg_sq"]).all()


COMBINERS = sorted(n for n, cls in STRATEGIES.items() if issubclass(cls, LossCombiner))


@pytest.mark.parametrize("method", COMBINERS)
def test_a_skipped_combined_step_leaves_every_task_state_and_the_method_untouched(method):
    """One task's gradient is not finite (NaN targets: every method's gradient is then NaN, as after an fp16
    overflow) inside a step that combines all tasks: nothing the step would have fed moves. A method's random
    generator may have drawn for the skipped step (RLW's weights): that is no task's state."""
    clean = batches(TASKS, count=30)
    data = copy.deepcopy(clean)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"strategy={method}"])
    strategy = build_strategy(cfg.strategy, TASKS, seed=0)
    ctx = _context(data, Precision(scaler=LossScaler(scale=256.0)))
    for _ in range(2):
        strategy.iteration(ctx)
    params = [p.detach().clone() for p in ctx.model.parameters()]
    optimizer_state, method_state = copy.deepcopy(ctx.optimizer.state_dict()), copy.deepcopy(strategy.state_dict())
    for batch in data:  # the batches not drawn yet, in place
        batch["c"].fill_(float("nan"))
    strategy.iteration(ctx)
    assert ctx.counts.skipped_steps == 1 and ctx.counts.optimizer_steps == 2 and ctx.precision.scaler.scale == 128.0
    for p, q in zip(params, ctx.model.parameters()):
        assert torch.equal(p, q)
    assert _same(ctx.optimizer.state_dict(), optimizer_state)
    without_generator = [{k: v for k, v in state.items() if k != "generator"}
                         for state in (strategy.state_dict(), method_state)]
    assert _same(*without_generator)
    for batch, original in zip(data, clean):
        batch["c"].copy_(original["c"])
    strategy.iteration(ctx)  # and the next batches step as usual
    assert ctx.counts.optimizer_steps == 3
    assert all(torch.isfinite(p).all() for p in ctx.model.parameters())


def test_the_scale_grows_after_a_run_of_finite_steps():
    scaler = LossScaler(scale=8.0, growth_interval=3)
    finite = [torch.ones(2)]
    for _ in range(3):
        assert scaler.finite(finite)
        scaler.stepped()
    assert scaler.scale == 16.0 and scaler.finite_steps == 0
    assert not scaler.finite([torch.tensor([1.0, float("nan")])]) and scaler.scale == 8.0


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    build_shapes(root / "shapes-32px-16-8-8-seed0.h5", 32, 16, 8, 8, generator_seed=0)
    return root


def _build(tiny_data, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"data_dir={tiny_data}", "dataset.image_size=32", "dataset.num_train=16", "dataset.num_val=8",
            "dataset.num_test=8", "trainer.batch_size=4",
            *([] if any(o.startswith("model=") for o in overrides) else ["model.width=4"]), *overrides])
    seed_everything(0, False)
    run = build_run(cfg, torch.device("cpu"), 1, cfg.trainer.batch_size)
    run.model.train()
    return run


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_runs_in_low_precision_and_keeps_fp32_parameters_and_moments(tiny_data, precision):
    run = _build(tiny_data, f"trainer.precision={precision}", "trainer.channels_last=true")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with run.precision.autocast():
        assert run.model.encoder(run.ctx.next_batch()["image"]).dtype == dtype
    for _ in range(3):
        losses = run.strategy.iteration(run.ctx)
        assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    counts = run.ctx.counts  # alternating, 4 tasks; fp16 may skip a first step while the scale settles
    assert counts.optimizer_steps + counts.skipped_steps == 12 and counts.optimizer_steps >= 9
    assert counts.skipped_steps == 0 or precision == "fp16"
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    states = [run.optimizer.shared.slots[t] for t in run.ctx.task_names]
    assert len({id(s) for s in states}) == 4  # one Adam state per task
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)
    conv = run.model.encoder.stem[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert (run.precision.scaler is not None) == (precision == "fp16")


def test_bad_precision_and_flags_are_one_line(tiny_data):
    with pytest.raises(MtlrunError, match="trainer.precision='fp8' is invalid; valid: fp32, bf16, fp16"):
        _build(tiny_data, "trainer.precision=fp8")
    with pytest.raises(MtlrunError, match="trainer.compile must be true or false"):
        _build(tiny_data, "trainer.compile=yes")
    with pytest.raises(MtlrunError, match="trainer.compile_backend='nope' is not a torch.compile backend"):
        _build(tiny_data, "trainer.compile=true", "trainer.compile_backend=nope")


def test_compiled_steps_on_subsets_of_heads_compile_each_graph_once(tiny_data):
    """Alternating steps on one head at a time: one graph for the encoder and one per head, reused by every
    later step (aot_eager traces as inductor does, without generating code, so the test stays quick)."""
    # In float64 (trainer.dtype): compiled graphs may sum in another order than eager kernels, and 5 Adam
    # iterations amplify that rounding (about 1e5 times; see tests/test_run_distributed.py), which float64's unit
    # roundoff of 1.1e-16 keeps far below the tolerance on any CPU; a different computation would not be.
    with run_dtype("float64"):
        run = _build(tiny_data, "trainer.compile=true", "trainer.compile_backend=aot_eager", "strategy=alternating")
        before = compiled_graphs()
        run.strategy.iteration(run.ctx)
        first = compiled_graphs() - before
        assert first == 1 + 4
        for _ in range(4):
            run.strategy.iteration(run.ctx)
        assert compiled_graphs() - before == first
        eager = _build(tiny_data, "strategy=alternating")
        for _ in range(5):
            eager.strategy.iteration(eager.ctx)
    for p, q in zip(run.model.parameters(), eager.model.parameters()):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)


def test_in_memory_splits_go_to_the_gpu_only_when_they_fit_and_are_allowed(monkeypatch):
    from mtlrun.data import loading

    split = loading.Split("train", torch.zeros(10, 4, 4, 3, dtype=torch.uint8), {"depth": torch.zeros(10, 4, 4)})
    assert split.nbytes == 10 * 48 + 10 * 16 * 4
    moved = []
    monkeypatch.setattr(loading.Split, "to", lambda self, device: moved.append(device) or "on gpu")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * split.nbytes, 8 * split.nbytes))
    cuda = torch.device("cuda")
    lazy = object()
    assert loading.on_device({"train": split, "test": lazy}, cuda, True) == {"train": "on gpu", "test": lazy}
    assert loading.on_device({"train": split}, cuda, "auto") == {"train": "on gpu"}
    for device, setting in ((cuda, "host"), (cuda, False), (torch.device("cpu"), True)):
        assert loading.on_device({"train": split}, device, setting) == {"train": split}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * split.nbytes, 8 * split.nbytes))
    assert loading.on_device({"train": split}, cuda, True) == {"train": split}  # not under half the free memory
    assert moved == [cuda, cuda]


def test_compiled_task_parts_are_compiled_too(tiny_data):
    """An architecture's task parts (MTAN's attention masks) are compiled as graphs of their own, like the
    heads (the test above checks that such graphs are built once; tracing MTAN here would take long)."""
    run = _build(tiny_data, "model=mtan", "model.backbone.width=4", "trainer.compile=true",
                 "trainer.compile_backend=aot_eager", "strategy=alternating")
    modules = [run.model.encoder, *run.model.task_parts.values(), *run.model.heads.values()]
    assert len(run.model.task_parts) == 4
    assert all(getattr(m, "_compiled_call_impl", None) is not None for m in modules)

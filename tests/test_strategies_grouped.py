"""Random grouping's regrouping schedules and loss reductions, against hand-written loops."""

import numpy as np
import pandas as pd
import pytest
import torch

from mtlrun.errors import MtlrunError
from mtlrun.strategies.averaged import Averaged
from mtlrun.strategies.grouped import Grouped
from mtlrun.strategies.pcgrad import PCGrad
from tests.helpers import batches, context, linear_model

TASKS = ["a", "b", "c", "d"]


def _one_step_change(strategy, tasks, **optimizer):
    model = linear_model(tasks)
    before = model.encoder.weight.detach().clone()
    data = batches(tasks, count=1)
    strategy.iteration(context(model, tasks, data, **optimizer))
    return model.encoder.weight.detach() - before


def test_reduction_sum_is_the_mean_times_t_in_the_gradient():
    mean = _one_step_change(Averaged(TASKS), TASKS, name="sgd", lr=0.01)
    total = _one_step_change(Averaged(TASKS, reduction="sum"), TASKS, name="sgd", lr=0.01)
    torch.testing.assert_close(total, 4 * mean)
    # inside groups of 2 (one group holding every task would be averaged): the sum is twice the mean
    mean = _one_step_change(Grouped(TASKS[:2], seed=0, group_size=2), TASKS[:2], name="sgd", lr=0.01)
    total = _one_step_change(Grouped(TASKS[:2], seed=0, group_size=2, reduction="sum"), TASKS[:2], name="sgd", lr=0.01)
    torch.testing.assert_close(total, 2 * mean)


def _run_epochs(strategy, epochs: int, per_epoch: int) -> list[list[list[str]]]:
    """The partition used at each iteration."""
    data = batches(TASKS, count=epochs * per_epoch)
    ctx = context(linear_model(TASKS), TASKS, data)
    used = []
    for _ in range(epochs):
        for _ in range(per_epoch):
            strategy.iteration(ctx)
            ctx.counts.iterations += 1
            used.append([list(g) for g in strategy.partition])
        strategy.epoch_end()
    return used


@pytest.mark.parametrize("combine", [False, True])
def test_regroup_once_keeps_one_partition_for_the_whole_run(combine):
    combiner = PCGrad(TASKS, seed=0) if combine else None
    strategy = Grouped(TASKS, seed=3, group_size=2, regroup="once", combiner=combiner)
    if combiner is not None:  # every group's step is the method's, on the same groups throughout
        stepped = []
        original = combiner.combine
        combiner.combine = lambda ctx, losses: (stepped.append(sorted(losses)), original(ctx, losses))
    used = _run_epochs(strategy, epochs=3, per_epoch=4)
    assert all(p == used[0] for p in used)
    if combiner is not None:
        assert stepped == [sorted(g) for g in used[0]] * 12
    assert strategy.records() == [{"epoch": 1, "iteration": 1, "groups": " | ".join(",".join(g) for g in used[0])}]


def test_regroup_epoch_draws_exactly_at_epoch_boundaries():
    strategy = Grouped(TASKS, seed=1, group_size=2, regroup="epoch")
    used = _run_epochs(strategy, epochs=4, per_epoch=3)
    for epoch in range(4):
        assert all(p == used[3 * epoch] for p in used[3 * epoch : 3 * epoch + 3])
    assert [(r["epoch"], r["iteration"]) for r in strategy.records()] == [(1, 1), (2, 4), (3, 7), (4, 10)]
    assert len({r["groups"] for r in strategy.records()}) > 1  # seed 1 draws different partitions
    every = Grouped(TASKS, seed=1, group_size=2)  # regroup=iteration: one draw, and one row, per iteration
    _run_epochs(every, 2, 3)
    assert [r["iteration"] for r in every.records()] == [1, 2, 3, 4, 5, 6]


def test_regroup_once_with_per_task_moments_is_one_adam_per_group():
    """The authors' MTL-IO with random groups (lucaspascal/AITSO_MTL, celeba/models/MTL_model.py): one
    torch.optim.Adam per group over ALL the model's parameters, each step zero_grad (their PyTorch's
    default, set_to_none=False), backward of the sum of the group's losses, step; groups in the drawn
    order, across epochs. A head outside the group gets a zero gradient there, so that group's Adam never
    moves it: the same as mtlrun's one state per group for the shared parameters and one per head."""
    tasks = ["a", "b", "c", "d", "e"]  # groups of 2, 2 and 1
    data = batches(tasks, count=12)
    model, replica = linear_model(tasks), linear_model(tasks)
    strategy = Grouped(tasks, seed=2, group_size=2, regroup="once", reduction="sum")
    ctx = context(model, tasks, data, name="adam", lr=0.01, moments="per_task")
    for i in range(len(data)):
        strategy.iteration(ctx)
        ctx.counts.iterations += 1
        if i % 4 == 3:
            strategy.epoch_end()
    groups = strategy.partition
    assert sorted(t for g in groups for t in g) == tasks and sorted(map(len, groups)) == [1, 2, 2]
    adams = [torch.optim.Adam(replica.parameters(), lr=0.01) for _ in groups]
    for batch in data:
        for group, adam in zip(groups, adams):
            adam.zero_grad(set_to_none=False)
            outputs = replica(batch["image"], tasks)
            loss = sum(((outputs[t].squeeze(-1) - batch[t]) ** 2).mean() for t in group)
            loss.backward()
            adam.step()
    for mine, theirs in zip(model.parameters(), replica.parameters()):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    states = ctx.optimizer.shared.slots
    assert len({id(states[t]) for t in tasks}) == 3  # one state per group
    assert all(states[g[0]]["step"] == len(data) for g in groups)


def test_state_round_trip_keeps_the_partition_and_its_history():
    strategy = Grouped(TASKS, seed=4, group_size=3, regroup="epoch")
    _run_epochs(strategy, epochs=2, per_epoch=2)
    resumed = Grouped(TASKS, seed=99, group_size=3, regroup="epoch")
    resumed.load_state_dict(strategy.state_dict())
    assert resumed.records() == strategy.records() and resumed.epochs_done == 2
    assert _run_epochs(resumed, 1, 2) == _run_epochs(strategy, 1, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"regroup": "sometimes"}, "strategy.regroup"), ({"reduction": "max"}, "strategy.reduction"),
     ({"reduction": "sum", "combiner": PCGrad(TASKS, seed=0)}, "strategy.reduction=sum"),
     ({"grouping": "learned"}, "strategy.grouping"),
     ({"grouping": "affinity", "regroup": "once"}, "leave strategy.regroup=iteration"),
     ({"grouping": "affinity", "warmup": 0}, "strategy.warmup must be an integer >= 1"),
     ({"grouping": "affinity", "decay": 0.0}, "strategy.decay"),
     ({"grouping": "affinity", "batch": "fresh"}, "strategy.batch=same")],
)
def test_bad_settings_are_refused_in_one_line(kwargs, match):
    with pytest.raises(MtlrunError, match=match):
        Grouped(TASKS, seed=0, group_size=2, **kwargs)


@pytest.mark.slow
def test_partitions_are_written_and_survive_resume_exactly(tmp_path):
    from mtlrun.data import build_shapes
    from tests.test_run_cli import TINY, mtlrun

    build_shapes(tmp_path / "data/shapes-64px-64-16-32-seed0.h5", 64, 64, 16, 32, generator_seed=0)
    args = [*TINY, "strategy=grouped", "strategy.regroup=epoch", "strategy.reduction=sum", "trainer.epochs=2"]
    whole = mtlrun(*args, "hydra.run.dir=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    first = mtlrun(*args, "trainer.stop_after_epochs=1", "hydra.run.dir=parts", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    rest = mtlrun(*args, "resume=true", "hydra.run.dir=parts", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    log = pd.read_csv(tmp_path / "whole/strategy_log.csv")
    assert list(log.epoch) == [1, 2] and list(log.iteration) == [1, 5]  # 64 samples, batch 16
    assert (tmp_path / "whole/strategy_log.csv").read_bytes() == (tmp_path / "parts/strategy_log.csv").read_bytes()
    whole, parts = (pd.read_csv(tmp_path / f"{r}/metrics.csv").drop(columns="train_seconds") for r in ("whole", "parts"))
    pd.testing.assert_frame_equal(whole, parts)


def test_affinity_propagation_finds_two_obvious_clusters():
    from mtlrun.strategies.affinity import affinity_propagation

    similarity = -np.array([[0, 1, 9, 9], [1, 0, 9, 9], [9, 9, 0, 1], [9, 9, 1, 0]], dtype=float)
    labels = affinity_propagation(similarity)
    assert labels is not None and labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]
    assert len(set(affinity_propagation(similarity, preference=0.0))) == 4  # each its own exemplar


def _affinity_propagation_by_the_equations(similarity, preference=None, refine=True, damping=0.5, conv=50):
    """Frey & Dueck (2007) element by element: r(i,k) = s(i,k) - max_{k' != k} [a(i,k') + s(i,k')],
    a(i,k) = min(0, r(k,k) + sum_{i' not in {i,k}} max(0, r(i',k))), a(k,k) = sum_{i' != k} max(0, r(i',k)),
    both damped; stop once the exemplars {k: a(k,k) + r(k,k) > 0} held for `conv` iterations; then each
    cluster's exemplar is the member of largest summed similarity (the paper's reference code)."""
    n = len(similarity)
    s = similarity.copy()
    np.fill_diagonal(s, np.median(similarity) if preference is None else preference)
    noise = np.random.default_rng(0).standard_normal((n, n))  # the same tie-breaking as the implementation
    s = s + (np.finfo(float).eps * np.abs(s) + np.finfo(float).tiny * 100) * noise
    r, a = np.zeros((n, n)), np.zeros((n, n))
    decisions = []
    for _ in range(200):
        r = damping * r + (1 - damping) * np.array([
            [s[i, k] - max(a[i, j] + s[i, j] for j in range(n) if j != k) for k in range(n)] for i in range(n)
        ])
        a = damping * a + (1 - damping) * np.array([[
            sum(max(0.0, r[j, k]) for j in range(n) if j != k) if i == k
            else min(0.0, r[k, k] + sum(max(0.0, r[j, k]) for j in range(n) if j not in (i, k)))
            for k in range(n)] for i in range(n)
        ])
        decisions.append(tuple(a[k, k] + r[k, k] > 0 for k in range(n)))
        if len(decisions) > conv and len(set(decisions[-conv - 1 :])) == 1 and any(decisions[-1]):
            break
    else:
        return None

    def nearest(centres):
        return [i if i in centres else max(centres, key=lambda c: s[i, c]) for i in range(n)]

    labels = nearest([k for k in range(n) if decisions[-1][k]])
    if not refine:
        return labels
    clusters = [[i for i in range(n) if labels[i] == c] for c in sorted(set(labels))]
    return nearest([max(m, key=lambda j: sum(s[i, j] for i in m)) for m in clusters])


def test_affinity_propagation_follows_frey_and_dueck_on_random_similarities():
    from mtlrun.strategies.affinity import affinity_propagation

    rng = np.random.default_rng(1)
    refinement_mattered = 0
    for case in range(12):
        n = int(rng.integers(2, 8))
        if case % 2:  # negative squared distances, as in the paper
            x = rng.standard_normal((n, 2))
            similarity = -((x[:, None] - x[None]) ** 2).sum(-1)
        else:  # a symmetric matrix of any sign, as the self-normalised task affinity
            m = rng.standard_normal((n, n))
            similarity = (m + m.T) / 2
        preference = None if case % 3 else float(rng.uniform(similarity.min(), similarity.max()))
        expected = _affinity_propagation_by_the_equations(similarity, preference)
        assert expected is not None
        assert affinity_propagation(similarity, preference) == expected, case
        unrefined = _affinity_propagation_by_the_equations(similarity, preference, refine=False)
        refinement_mattered += expected != unrefined
    assert refinement_mattered  # the cases exercise the final refinement too


def test_affinity_credits_a_group_with_its_own_step_split_among_its_tasks():
    """After the warm-up, groups {a, b} and {c} (the clustering fixed here): each group's step on the mean of
    its losses, replayed with SGD, moves rows a and b by decay * (1 - L_t(after)/L_t(before)) / 2 and row c
    by the same for its own step; G + 1 forward passes, G backward passes."""
    tasks = TASKS[:3]
    data = batches(tasks, count=2)
    model, replica = linear_model(tasks), linear_model(tasks)
    strategy = Grouped(tasks, seed=5, group_size=1, grouping="affinity", decay=0.5, warmup=1)
    ctx = context(model, tasks, data, name="sgd", lr=0.05)
    strategy.iteration(ctx)
    ctx.counts.iterations += 1
    strategy.affinity.groups = lambda: [["a", "b"], ["c"]]
    replica.load_state_dict(model.state_dict())
    expected = strategy.affinity.matrix.clone()
    before_counts = (ctx.counts.forward_passes, ctx.counts.backward_passes, ctx.counts.optimizer_steps)
    strategy.iteration(ctx)
    assert sorted(map(sorted, strategy.partition)) == [["a", "b"], ["c"]]
    opt = torch.optim.SGD(replica.parameters(), lr=0.05)
    batch = data[1]

    def losses():
        out = replica(batch["image"], tasks)
        return {t: ((out[t].squeeze(-1) - batch[t]) ** 2).mean() for t in tasks}

    for group in strategy.partition:
        before = losses()
        opt.zero_grad()
        (sum(before[t] for t in group) / len(group)).backward()
        opt.step()
        with torch.no_grad():
            after = losses()
        for s in group:
            for j, t in enumerate(tasks):
                measured = (1 - float(after[t]) / float(before[t].detach())) / len(group)
                expected[tasks.index(s), j] = 0.5 * expected[tasks.index(s), j] + 0.5 * measured
    torch.testing.assert_close(strategy.affinity.matrix, expected, rtol=1e-5, atol=1e-7)
    for mine, theirs in zip(model.parameters(), replica.parameters()):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    spent = (ctx.counts.forward_passes, ctx.counts.backward_passes, ctx.counts.optimizer_steps)
    assert [x - y for x, y in zip(spent, before_counts)] == [3, 2, 2]


def test_affinity_state_round_trip_continues_exactly(tmp_path):
    """The running matrix, the last groups and the generator survive a checkpoint (saved and read back as
    train() does, weights_only): the resumed strategy takes the same steps and keeps the same matrix."""

    def run(strategy, model, data, start, stop):
        ctx = context(model, TASKS, data, name="sgd", lr=0.05)
        ctx.counts.iterations = start
        for _ in range(start, stop):
            strategy.iteration(ctx)
            ctx.counts.iterations += 1

    data = batches(TASKS, count=8)
    settings = {"group_size": 2, "grouping": "affinity", "decay": 0.3, "warmup": 2}
    whole, whole_model = Grouped(TASKS, seed=3, **settings), linear_model(TASKS)
    run(whole, whole_model, data, 0, 8)
    first, model = Grouped(TASKS, seed=3, **settings), linear_model(TASKS)
    run(first, model, data, 0, 4)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = Grouped(TASKS, seed=11, **settings)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    run(resumed, model, data[4:], 4, 8)
    assert torch.equal(resumed.affinity.matrix, whole.affinity.matrix)
    assert resumed.records() == whole.records() and resumed.partition == whole.partition
    for mine, theirs in zip(model.parameters(), whole_model.parameters()):
        assert torch.equal(mine, theirs)


def test_affinity_credits_each_group_with_its_own_step_on_the_same_batch():
    """Hand-computed: with decay 1 the matrix holds the last measurement, (1 - L_t(after)/L_t(before)) / |G|
    for the group's own step, every loss measured on the iteration's batch with SGD steps replayed here."""
    tasks = TASKS[:3]
    data = batches(tasks, count=1)
    model = linear_model(tasks)
    replica = linear_model(tasks)
    strategy = Grouped(tasks, seed=0, group_size=1, grouping="affinity", decay=1.0, warmup=5)
    ctx = context(model, tasks, data, name="sgd", lr=0.05)
    strategy.iteration(ctx)
    order = [g[0] for g in strategy.partition]
    assert sorted(order) == tasks  # warm-up: every task alone, in a shuffled order
    batch = data[0]
    expected = torch.zeros(3, 3, dtype=torch.float64)
    opt = torch.optim.SGD(replica.parameters(), lr=0.05)

    def all_losses():
        out = replica(batch["image"], tasks)
        return {t: ((out[t].squeeze(-1) - batch[t]) ** 2).mean() for t in tasks}

    for task in order:
        before = all_losses()
        opt.zero_grad()
        before[task].backward()
        opt.step()
        with torch.no_grad():
            after = all_losses()
        for j, t in enumerate(tasks):
            expected[tasks.index(task), j] = 1 - float(after[t]) / float(before[t].detach())
    torch.testing.assert_close(strategy.affinity.matrix, expected, rtol=1e-5, atol=1e-7)
    assert ctx.counts.forward_passes == 4 and ctx.counts.backward_passes == 3 and ctx.counts.optimizer_steps == 3


def test_affinity_groups_tasks_that_help_each_other():
    from mtlrun.strategies.affinity import TaskAffinity

    affinity = TaskAffinity(TASKS, decay=1.0, preference=None)
    helps = {("a", "b"), ("b", "a"), ("c", "d"), ("d", "c")}
    for s in TASKS:
        before = dict.fromkeys(TASKS, 1.0)
        after = {t: 0.5 if t == s else (0.6 if (s, t) in helps else 1.3) for t in TASKS}
        affinity.update([s], before, after)
    groups = sorted(sorted(g) for g in affinity.groups())
    assert groups == [["a", "b"], ["c", "d"]]


@pytest.mark.slow
def test_affinity_grouping_runs_from_the_cli(tmp_path):
    from mtlrun.data import build_shapes
    from tests.test_run_cli import TINY, mtlrun

    build_shapes(tmp_path / "data/shapes-64px-64-16-32-seed0.h5", 64, 64, 16, 32, generator_seed=0)
    result = mtlrun(*TINY, "strategy=grouped", "strategy.grouping=affinity", "strategy.warmup=2",
                    "diagnostics=true", "diagnostics_every=2", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    row = pd.read_csv(tmp_path / "run/results.csv").iloc[0]
    log = pd.read_csv(tmp_path / "run/strategy_log.csv")
    assert len(log) == 4 and all(len(g.split(" | ")) == 4 for g in log.groups[:2])  # warm-up: singletons
    groups = [g.count("|") + 1 for g in log.groups]
    assert row.steps_per_iteration == sum(groups) / 4
    assert row.passes_per_iteration == sum(g + 1 for g in groups) / 4  # the measurement after the last step
    assert row.backward_passes_per_iteration == sum(groups) / 4
    assert pd.isna(row.group_size)  # the clustering sets the groups' sizes
    diagnostics = pd.read_csv(tmp_path / "run/diagnostics.csv")
    tasks = row.tasks.split()
    for kind in ("affinity", "running_affinity"):
        assert diagnostics[[f"{kind}/{s}/{t}" for s in tasks for t in tasks]].notna().all().all()
    from mtlrun.report.build import build
    from mtlrun.report.affinity import plot_affinity

    assert plot_affinity(build([tmp_path / "run"], None, "test"), tmp_path / "a.png") == f"wrote {tmp_path / 'a.png'}"

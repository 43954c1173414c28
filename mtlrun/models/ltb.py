"""LTB on a chosen backbone (`model=ltb`): a tree of stage copies whose branching is learned, then fixed.

Learning to Branch: Guo, Lee & Ulbricht, "Learning to Branch for Multi-Task Learning" (ICML 2020); LibMTL's
`LTB`. Level k of the tree holds `branches[k]` copies (nodes) of the backbone's stage k (default: one per
task, as LibMTL; on ResNets the stages are the stem and layer1..layer4, so 4 branch points, as LibMTL's);
the last level holds one node per task, read by that task's head. Each node of a
level below chooses its parent among the nodes of the level above; the first level reads the image.
A node's history (for a U-Net's skips) is its parent's plus its own output.

Its schedule, in two runs (the search, then the tree it found):

1. Search (`model.tree=null`, the default): each node's choice is a learned distribution over the
   nodes above (logits, starting uniform). Every training forward pass draws one parent per node by
   Gumbel-softmax at temperature tau (`hard=true`, as LibMTL: a one-hot draw in the forward pass with
   the relaxed sample's gradient; `false`: the relaxed sample itself), and a node reads its draw's
   mixture of the parents' histories. Before each epoch e the run sets tau = tau_0 / sqrt(e + 1), and
   the first `warmup_epochs` epochs every node reads the mean of its parents instead of a draw (LibMTL's
   warm-up reads their sum, its branching weights being all ones then: the mean keeps a node's input on the
   scale of a draw's, so the warm-up trains the nodes on inputs like those of the search). Defaults as
   LibMTL's: tau_0 = the run's epochs / 20 (`temperature=null`; 10 at its 200 epochs) and ceil(epochs / 100)
   warm-up epochs (`warmup_epochs=null`). Evaluation uses each node's most probable
   parent, and after every epoch the run logs that tree as `model.tree=[[...], ...]`.
2. The tree (`model.tree=<that list>`): each list gives, for the nodes of a level (from the second),
   their parents' indices on the level above; the last list has one entry per task, in the dataset's
   order. Only the nodes on some task's path are built, and a fresh model trains that tree with every
   choice fixed: the paper's final network, trained anew. (LibMTL keeps sampling until the end.)

Shared and task parameters. Search: every node above the last level and the branching logits of those
nodes are shared (every task's draw may pass through any of them); task t owns its last-level node, that
node's logits over its parents, and its head. A step on some tasks runs every level above the last and
only their last-level nodes. Fixed tree: a node on the paths of two or more tasks is shared, one on a
single task's path is that task's, with its head; a step on some tasks runs only the nodes on their
paths. MGDA-UB's representation: in the search, the stack of the second-to-last level's outputs (not on
a backbone whose last stage reads an earlier one, convnet's U-Net skip); on a fixed tree, the output of
the node where every task branches off, where there is one such node (otherwise no representation).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrun.errors import MtlrunError
from mtlrun.models.backbones import Stage, build_backbone
from mtlrun.models.base import MultiTaskModel
from mtlrun.models.mmoe import check_count
from mtlrun.tasks import Task

Node = tuple[int, int]  # (level, index within the level)


class Branching:
    """The search's temperature and warm-up, set by the schedule and read by every node's choice."""

    def __init__(self, hard: bool) -> None:
        self.hard, self.temperature, self.warmup = hard, 1.0, False

    def weights(self, logits: Tensor, training: bool) -> Tensor:
        """Each row's parent weights: a Gumbel-softmax draw in training, the mean of the parents in the
        warm-up, the most probable parent (one-hot) in evaluation."""
        if not training:
            return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
        if self.warmup:
            return torch.full_like(logits, 1 / logits.shape[-1])
        return F.gumbel_softmax(logits, tau=self.temperature, hard=self.hard, dim=-1)


def _kept(skips: Sequence[int | None], level: int) -> list[int]:
    """The history entries that stages `level` on still read, of their `skips` (history: level + 1 entries)."""
    return sorted({s for s in skips[level:] if s is not None and s <= level} | {level})


def _mix(weights: Tensor, histories: Sequence[Sequence[Tensor | None]], kept: list[int]) -> list[list[Tensor | None]]:
    """Row i of `weights` mixes the parents' histories into child i's, only at the entries `kept`."""
    children: list[list[Tensor | None]] = [[None] * len(histories[0]) for _ in range(weights.shape[0])]
    for m in kept:
        mixed = torch.einsum("ip,p...->i...", weights, torch.stack([h[m] for h in histories]))
        for child, value in zip(children, mixed):
            child[m] = value
    return children


class SearchLevels(nn.Module):
    """The search's shared part: every level above the last and its branching logits; gives the stack of
    the second-to-last level's histories at the entries the last stage reads, by entry."""

    def __init__(self, levels: list[list[Stage]], branching: Branching, skips: list[int | None]) -> None:
        super().__init__()
        # Logits registered before the nodes, so the last shared weight matrix is a conv (gradnorm).
        self.logits = nn.ParameterList(
            nn.Parameter(torch.zeros(len(below), len(above))) for above, below in itertools.pairwise(levels)
        )
        self.levels = nn.ModuleList(nn.ModuleList(nodes) for nodes in levels)
        self.skips, self.branching = skips, branching  # which earlier output each stage reads

    def forward(self, image: Tensor) -> dict[int, Tensor]:
        histories = [[image, node([image])[1]] for node in self.levels[0]]
        for k in range(1, len(self.levels)):
            weights = self.branching.weights(self.logits[k - 1], self.training)
            inputs = _mix(weights, histories, _kept(self.skips, k))
            histories = [history + [node(history)[1]] for node, history in zip(self.levels[k], inputs)]
        return {m: torch.stack([h[m] for h in histories]) for m in _kept(self.skips, len(self.levels))}


class Leaf(nn.Module):
    """A task's last-level node in the search, with its logits over the nodes above."""

    def __init__(self, node: Stage, parents: int, branching: Branching, length: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(parents))
        self.node, self.branching, self.length = node, branching, length

    def forward(self, features: dict[int, Tensor]) -> Tensor:
        weights = self.branching.weights(self.logits, self.training)
        history: list[Tensor | None] = [None] * self.length
        for m, stacked in features.items():
            history[m] = torch.einsum("p,p...->...", weights, stacked)
        return self.node(history)[1]


class TreeOutputs:
    """The shared nodes' histories of one forward pass, each computed the first time a task asks for it."""

    def __init__(self, tree: FixedNodes, image: Tensor) -> None:
        self.tree, self.image = tree, image
        self.memo: dict[Node, list[Tensor]] = {}

    def history(self, node: Node) -> list[Tensor]:
        if node not in self.memo:
            level, _ = node
            above = [self.image] if level == 0 else self.history(self.tree.parents[node])
            self.memo[node] = above + [self.tree.nodes[_key(node)](above)[1]]
        return self.memo[node]


class FixedNodes(nn.Module):
    """A fixed tree's shared nodes, run lazily: only those on the paths of the tasks asked for."""

    def __init__(self, nodes: dict[Node, Stage], parents: dict[Node, Node]) -> None:
        super().__init__()
        self.nodes = nn.ModuleDict({_key(node): stage for node, stage in nodes.items()})
        self.parents = parents

    def forward(self, image: Tensor) -> TreeOutputs:
        return TreeOutputs(self, image)


class Branch(nn.Module):
    """A task's own nodes on a fixed tree, run from the shared node it branches off (or from the image)."""

    def __init__(self, attach: Node | None, stages: list[Stage]) -> None:
        super().__init__()
        self.attach, self.stages = attach, nn.ModuleList(stages)

    def forward(self, features: TreeOutputs) -> Tensor:
        history = [features.image] if self.attach is None else list(features.history(self.attach))
        for stage in self.stages:
            history.append(stage(history)[1])
        return history[-1]


def _key(node: Node) -> str:
    return f"{node[0]}_{node[1]}"


class LTB(MultiTaskModel):
    """The tree with its schedule (search) or fixed; see the module docstring."""

    def __init__(
        self, encoder: nn.Module, heads: dict[str, nn.Module], align_corners: bool,
        task_parts: dict[str, nn.Module],
        branching: Branching, temperature: float | None, warmup_epochs: int | None,
    ) -> None:
        super().__init__(encoder, heads, align_corners, task_parts)
        self.branching, self.temperature, self.warmup_epochs = branching, temperature, warmup_epochs

    @property
    def searching(self) -> bool:
        return isinstance(self.encoder, SearchLevels)

    def schedule(self, epoch: int, epochs: int) -> None:
        start = self.temperature if self.temperature is not None else epochs / 20
        warmup = self.warmup_epochs if self.warmup_epochs is not None else math.ceil(epochs / 100)
        self.branching.temperature = start / math.sqrt(epoch + 1)
        self.branching.warmup = epoch < warmup

    def tree(self) -> list[list[int]]:
        """Each node's most probable parent, level by level: the value to pass as `model.tree`."""
        levels = [logits.argmax(dim=-1).tolist() for logits in self.encoder.logits]
        return levels + [[int(self.task_parts[t].logits.argmax()) for t in self.heads]]

    def describe(self) -> str | None:
        if not self.searching:
            return None
        tree = str(self.tree()).replace(" ", "")
        state = "warm-up" if self.branching.warmup else f"temperature {self.branching.temperature:.3g}"
        return f"ltb search ({state}): most probable tree model.tree={tree}"

    def representation(self, features: object) -> list[Tensor]:
        if self.searching and isinstance(features, dict) and len(features) > 1:
            raise MtlrunError(
                "strategy.rep_grad=true (MGDA-UB) cannot run on model=ltb over this backbone: its last stage also "
                "reads an earlier stage's output (a U-Net skip), so no one representation separates the levels "
                "above from the tasks' nodes: use strategy.rep_grad=false or a ResNet backbone"
            )
        if self.searching or not isinstance(features, TreeOutputs):
            return super().representation(features)
        attach = {part.attach for part in self.task_parts.values()}
        if len(attach) == 1 and None not in attach and not any(
            stage.skip is not None and stage.skip < len(features.history(next(iter(attach)))) - 1
            for part in self.task_parts.values() for stage in part.stages
        ):
            return [features.history(attach.pop())[-1]]
        raise MtlrunError(
            "strategy.rep_grad=true (MGDA-UB) needs one node where every task branches off (and no skip "
            "from above it); this model.tree branches at several: use strategy.rep_grad=false"
        )


def _as_lists(tree: Sequence) -> list[list[int]]:
    try:
        return [[int(p) for p in level] for level in tree]
    except (TypeError, ValueError):
        raise MtlrunError(f"model.tree must be a list of lists of parent indices, got {tree!r}") from None


def build(
    tasks: list[Task], backbone: Mapping | None = None, branches: Sequence[int] | None = None,
    tree: Sequence | None = None, temperature: float | None = None, warmup_epochs: int | None = None,
    hard: bool = True,
) -> MultiTaskModel:
    spec = build_backbone(backbone or {"name": "convnet"}, tasks)
    first = spec.stages("ltb")
    depth = len(first)
    if depth < 2:
        raise MtlrunError("model=ltb needs a backbone of at least two stages")
    counts = [len(tasks)] * (depth - 1) if branches is None else [check_count("branches", int(b)) for b in branches]
    if len(counts) != depth - 1:
        raise MtlrunError(
            f"model.branches gives the node counts of the {depth - 1} levels above the last "
            f"({spec.name} has {depth} stages), got {len(counts)}: {list(counts)}"
        )
    if temperature is not None and not temperature > 0:
        raise MtlrunError(f"model.temperature must be > 0 (or null: epochs / 20), got {temperature!r}")
    if warmup_epochs is not None:
        check_count("warmup_epochs", warmup_epochs, least=0)
    counts.append(len(tasks))
    trunks = [first] + [spec.stages("ltb") for _ in range(max(counts) - 1)]  # node (k, i): stage k of trunk i
    branching = Branching(bool(hard))
    names = [t.name for t in tasks]
    heads = {t.name: spec.head(t) for t in tasks}
    settings = {"branching": branching, "temperature": temperature, "warmup_epochs": warmup_epochs}
    if tree is None:
        levels = [[trunks[i][k] for i in range(n)] for k, n in enumerate(counts[:-1])]
        skips = [stage.skip for stage in first]
        leaves = {t: Leaf(trunks[i][depth - 1], counts[-2], branching, depth) for i, t in enumerate(names)}
        return LTB(SearchLevels(levels, branching, skips), heads, spec.align_corners, leaves, **settings)
    parents = _check_tree(_as_lists(tree), counts)
    paths = {t: _path(parents, (depth - 1, i)) for i, t in enumerate(names)}
    owners: dict[Node, set[str]] = {}
    for t, path in paths.items():
        for node in path:
            owners.setdefault(node, set()).add(t)
    # Nodes of every task registered last, deepest last: the last shared layer (gradnorm's) is then one
    # that every task reaches, where there is one.
    order = sorted((node for node, who in owners.items() if len(who) > 1), key=lambda n: (len(owners[n]) == len(names), n))
    shared = {node: trunks[node[1]][node[0]] for node in order}
    if not shared:
        raise MtlrunError(
            f"model.tree={_as_lists(tree)} shares no node between the {len(tasks)} task(s): every task would train "
            "a network of its own; give a tree whose tasks meet (the search's model.tree), or use model=hps"
        )
    branches_of = {}
    for t, path in paths.items():
        own = [node for node in path if len(owners[node]) == 1]
        attach = max((node for node in path if node in shared), default=None)
        branches_of[t] = Branch(attach, [trunks[node[1]][node[0]] for node in own])
    return LTB(FixedNodes(shared, parents), heads, spec.align_corners, branches_of, **settings)


def _check_tree(tree: list[list[int]], counts: list[int]) -> dict[Node, Node]:
    """Each node's parent, once `tree` fits the level counts (the last level: the tasks)."""
    if len(tree) != len(counts) - 1 or any(len(level) != n for level, n in zip(tree, counts[1:])):
        raise MtlrunError(
            f"model.tree must hold {len(counts) - 1} lists with {counts[1:]} entries (the nodes of each level "
            f"from the second; the last: one per task), got {tree}"
        )
    parents = {}
    for k, level in enumerate(tree, start=1):
        for i, p in enumerate(level):
            if not 0 <= p < counts[k - 1]:
                raise MtlrunError(
                    f"model.tree: node {i} of level {k} names parent {p}, but level {k - 1} has {counts[k - 1]} nodes"
                )
            parents[(k, i)] = (k - 1, p)
    return parents


def _path(parents: dict[Node, Node], leaf: Node) -> list[Node]:
    """The nodes from the first level down to `leaf`."""
    path = [leaf]
    while path[-1][0] > 0:
        path.append(parents[path[-1]])
    return path[::-1]

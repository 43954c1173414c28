"""Datasets by name: the table from `dataset=<name>` to where its HDF5 file comes from, and loading it."""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mtlrun.data.hdf5 import DatasetFile, write_dataset
from mtlrun.data.loading import LazySplit, Split, SplitSource, TargetTransform
from mtlrun.errors import MtlrunError
from mtlrun.run.locks import FileLock, remove_dead_writers_files
from mtlrun.settings import DatasetSettings, ShapesSettings
from mtlrun.tasks import Task, build_task, count_in_delta_m


@dataclass
class MultiTaskData:
    """A dataset ready to train on: its tasks in a fixed order and its splits in memory."""

    name: str
    tasks: list[Task]
    splits: dict[str, SplitSource]
    mean: list[float]
    std: list[float]


def build_shapes(path: Path, image_size: int, num_train: int, num_val: int, num_test: int, generator_seed: int) -> None:
    """Generate the built-in benchmark and store it as HDF5 at `path` (a few seconds)."""
    from mtlrun.data import shapes

    sizes = {"train": num_train, "val": num_val, "test": num_test}
    # Disjoint seeds per split keep the splits' scenes independent.
    splits = {
        split: shapes.generate(n, image_size, seed=generator_seed * 10 + i)
        for i, (split, n) in enumerate(sizes.items())
    }
    write_dataset(
        path, "shapes", splits, source="procedural (mtlrun.data.shapes)",
        options={"image_size": image_size, "generator_seed": generator_seed, **sizes},
        attribute_names=list(shapes.ATTRIBUTE_NAMES), class_names=list(shapes.CLASS_NAMES),
    )


def check_shapes_options(image_size: object, num_train: object, num_val: object, num_test: object,
                         generator_seed: object, prefix: str = "dataset.") -> None:
    """The built-in benchmark's options, checked before anything is generated (an empty split would be
    generated and cached for good)."""
    given = {"image_size": image_size, "num_train": num_train, "num_val": num_val, "num_test": num_test,
             "generator_seed": generator_seed}
    ShapesSettings.from_config(given, prefix)


def _check_shapes(cfg: DictConfig) -> None:
    check_shapes_options(cfg.image_size, cfg.num_train, cfg.num_val, cfg.num_test, cfg.generator_seed)


def _make_shapes(cfg: DictConfig, path: Path) -> None:
    print(f"mtlrun: building the built-in benchmark at {path} (once) ...", file=sys.stderr, flush=True)
    build_shapes(path, int(cfg.image_size), int(cfg.num_train), int(cfg.num_val), int(cfg.num_test),
                 int(cfg.generator_seed))


@dataclass(frozen=True)
class Source:
    """Where a dataset's file comes from: generated here when missing, or converted by the user."""

    how_to_make: str  # completes the error shown when the file is missing or unreadable; {path} is filled in
    generate: Callable[[DictConfig, Path], None] | None = None
    check: Callable[[DictConfig], None] | None = None  # the dataset's own options, before the file is opened


def _converted(script: str) -> Source:
    return Source(f"convert your copy with `python {script} --src RAW --out {{path}}` (docs/data.md: Real datasets)")


DATASETS: dict[str, Source] = {
    "shapes": Source("delete it and mtlrun regenerates it", _make_shapes, _check_shapes),
    "nyuv2": _converted("data_scripts/nyuv2.py"),
    "cityscapes": _converted("data_scripts/cityscapes.py"),
    "celeba": _converted("data_scripts/celeba.py"),
}


def check_dataset(cfg: DictConfig) -> DatasetSettings:
    """The settings every dataset has, checked before its file is opened (declared in DatasetSettings: one
    finite number per input channel, std > 0 since a zero std turns every image into inf and NaN, and the
    augmentation)."""
    return DatasetSettings.from_config(cfg)


def open_dataset(
    cfg: DictConfig, tasks: list[str] | None = None, split_names: tuple[str, ...] = ("train", "val", "test"),
    settings: DatasetSettings | None = None,
) -> MultiTaskData:
    """Open the dataset file (generating it first where it is generated) and load the splits of `tasks`
    (default: the config's selection). `settings`: the run's checked `dataset` group (left out: checked here)."""
    if cfg.name not in DATASETS:
        raise MtlrunError(f"no dataset named {cfg.name!r}; known: {', '.join(sorted(DATASETS))}")
    settings = settings or check_dataset(cfg)
    path = Path(cfg.path)
    source = DATASETS[cfg.name]
    if source.check is not None:
        source.check(cfg)
    if source.generate is not None and (not path.exists() or _partials(path)):
        _generate_once(source.generate, cfg, path)
    file = DatasetFile(path, cfg.name, source.how_to_make.format(path=path))
    try:
        return _load(cfg, file, tasks or task_names(cfg), split_names, settings.in_memory)
    finally:
        file.close()


def _partials(path: Path) -> list[Path]:
    """The temporary files of writers of `path` (`<file>.<pid>-<random>.partial`)."""
    return list(path.parent.glob(f"{glob.escape(path.name)}.*.partial"))


def _generate_once(generate: Callable[[DictConfig, Path], None], cfg: DictConfig, path: Path) -> None:
    """Generate the file at `path`, or, while another process generates it (runs sharing a data_dir), wait for
    it and use its file: a lock beside the file (`<file>.lock`) lets one process build at a time. Whoever
    holds the lock removes the temporaries of killed builders (a builder writes only while holding it)."""
    if path.exists():  # only leftovers to remove, where no builder is at work and the folder can be written
        lock = FileLock(path.with_name(path.name + ".lock"))
        try:
            if lock.acquire(wait=False) and lock.supported:
                remove_dead_writers_files(_partials(path))
        except OSError:
            pass  # a read-only data_dir: its file is read as it is
        lock.release()
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path.with_name(path.name + ".lock"))
        if not lock.acquire(wait=False):
            print(f"mtlrun: waiting for {lock.holder()}, which is building {path} ...", file=sys.stderr, flush=True)
            lock.acquire(wait=True)
    except OSError as e:
        raise MtlrunError(f"cannot write the dataset file {path} ({e.strerror}): point data_dir at a writable "
                          f"folder") from None
    try:
        if lock.supported:
            remove_dead_writers_files(_partials(path))
        if not path.exists():
            generate(cfg, path)
    except OSError as e:
        raise MtlrunError(f"cannot write the dataset file {path} ({e.strerror or e}): free space or point "
                          f"data_dir at a writable folder") from None
    finally:
        lock.release()


def task_specs(cfg: DictConfig) -> dict[str, dict]:
    """From the config alone, the specs of the tasks a run trains, in order: `dataset.tasks` (null = all), after
    `dataset.binary_maps` has cut the segmentation tasks into binary maps; naming one selects all its maps."""
    specs, parts = _binary_maps(cfg, OmegaConf.to_container(cfg.task_specs, resolve=True))
    if isinstance(cfg.get("tasks"), str):
        raise MtlrunError(
            f"dataset.tasks={cfg.tasks} must be a list of task names, e.g. dataset.tasks=[{cfg.tasks}]; "
            f"{cfg.name} has: {', '.join(specs)}"
        )
    asked = list(cfg.tasks) if cfg.get("tasks") is not None else list(specs)
    if not asked:
        raise MtlrunError(f"dataset.tasks=[] selects no task: name at least one, e.g. dataset.tasks="
                          f"[{next(iter(specs))}], or null for all; {cfg.name} has: {', '.join(specs)}")
    repeated = [str(n) for n in dict.fromkeys(asked) if asked.count(n) > 1]
    if repeated:
        once = ",".join(map(str, dict.fromkeys(asked)))
        given = ",".join(map(str, asked))
        raise MtlrunError(f"dataset.tasks=[{given}] names {', '.join(repeated)} more than once: name each "
                          f"task once, e.g. dataset.tasks=[{once}]")
    names = list(dict.fromkeys(n for name in asked for n in parts.get(name, [name])))
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise MtlrunError(
            f"dataset.tasks={asked} names unknown tasks {unknown}; {cfg.name} has: {', '.join(specs)}"
        )
    return {n: specs[n] for n in names}


def _binary_maps(cfg: DictConfig, specs: dict[str, dict]) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """`dataset.binary_maps`: null keeps each segmentation task (cross-entropy over its classes); `per_class`
    replaces it by one binary-map task per class, named after the class (`class_names` in its spec, else
    <task>_<i>); `joint` by one task holding a binary map per class. Returns the specs and, per replaced task,
    the names of the tasks that replace it."""
    mode = cfg.get("binary_maps")
    if mode is None:
        return specs, {}
    DatasetSettings.check("binary_maps", mode)
    out: dict[str, dict] = {}
    parts: dict[str, list[str]] = {}
    for name, spec in specs.items():
        if spec.get("kind") != "segmentation":
            out[name] = spec
            continue
        classes = _class_names(name, spec)
        common = {"kind": "binary_map", "key": spec["key"], "ignore_index": spec.get("ignore_index", -1)}
        if mode == "joint":
            out[name] = {**common, "classes": list(range(len(classes))), "class_names": classes}
            continue
        taken = [c for c in classes if c in specs or c in out]
        if taken:
            raise MtlrunError(
                f"dataset.binary_maps=per_class names a task after each class of '{name}', and {taken} is "
                f"already a task: rename it in dataset.task_specs.{name}.class_names"
            )
        out.update({c: {**common, "classes": [i], "class_names": [c], "group": name} for i, c in enumerate(classes)})
        parts[name] = classes
    return out, parts


def _class_names(name: str, spec: dict) -> list[str]:
    count = int(spec["num_classes"])
    names = spec.get("class_names")
    if names is None:
        return [f"{name}_{i}" for i in range(count)]
    if len(names) != count or len(set(names)) != count:
        raise MtlrunError(
            f"dataset.task_specs.{name}.class_names lists {len(names)} names for num_classes={count} (each "
            f"once): list {count} distinct names, or set it to null to name the binary maps {name}_0 ..."
        )
    return [str(n) for n in names]


def task_names(cfg: DictConfig) -> list[str]:
    """The names of the tasks a run trains, in the dataset's order, from the config alone."""
    return list(task_specs(cfg))


def _load(
    cfg: DictConfig, file: DatasetFile, tasks: list[str], split_names: tuple[str, ...], in_memory: object,
) -> MultiTaskData:
    specs = {name: spec for name, spec in task_specs(cfg).items() if name in tasks}
    present = [s for s in split_names if s in file.splits() and _length(file, s, required=s != "val")]
    if "train" not in present or "test" not in present:
        raise MtlrunError(f"{file.path} must hold 'train' and 'test' splits, found {file.splits()}: {file.how_to_make}")
    attribute_names = file.attribute_names("train")
    tasks = [build_task(name, spec, attribute_names) for name, spec in specs.items()]
    if cfg.get("delta_m_metrics") is not None:
        for task in tasks:
            count_in_delta_m(task, list(cfg.delta_m_metrics))
    _check_classes(cfg, file, tasks)
    _check_binary_maps(file, specs)
    targets = {name: (spec["key"], _target_transform(spec, attribute_names, file)) for name, spec in specs.items()}
    for split in present:
        for name, (key, _) in targets.items():
            if not file.has(split, key):
                others = [n for n in specs if n != name]
                # The converter records why an array is absent (the official NYUv2 .mat has no normals).
                why = json.loads(file.attrs.get("options", "{}")).get(key)
                remake = f"the file says: {key} {why}" if isinstance(why, str) else \
                    f"or remake the file with it ({file.how_to_make})"
                raise MtlrunError(
                    f"{file.path} has no '{split}/{key}' array, which task '{name}' needs: leave the task out "
                    f"(dataset.tasks=[{','.join(others)}]); {remake}"
                )
    for split in present:
        _check_arrays(file, split, {spec["key"]: spec["kind"] for spec in specs.values()})
    keys = {"image", *(key for key, _ in targets.values())}
    if _in_memory(in_memory, file, present, keys):
        splits: dict[str, SplitSource] = {split: _read_split(file, split, targets) for split in present}
    else:
        splits = {split: LazySplit(split, file.path, targets) for split in present}
    return MultiTaskData(cfg.name, tasks, splits, list(cfg.mean), list(cfg.std))


def _length(file: DatasetFile, split: str, required: bool) -> int:
    """The number of images of `split`; an empty train or test split is an error, an empty val one is skipped."""
    if not file.has(split, "image"):
        raise MtlrunError(f"{file.path} has no '{split}/image' array: {file.how_to_make}")
    length = file.shape_dtype(split, "image")[0][0]
    if not length and required:
        raise MtlrunError(f"{file.path} holds no '{split}' images: {file.how_to_make}")
    return length


# What each target kind's stored array looks like: dtype kinds ("iu": integers, "f": floats) and shape after N.
_STORED = {
    "segmentation": ("iu", "HW"), "binary_map": ("iu", "HW"), "depth": ("f", "HW"), "normal": ("f", "HW3"),
    "binary": ("biu", "K"),
}


def _check_arrays(file: DatasetFile, split: str, kinds: dict[str, str]) -> None:
    """The stored arrays are what the schema says (a hand-made file may not be): a uint8 N x H x W x 3 image
    and, per target, the right dtype and a shape of N samples of the image's size; checked without reading."""
    shape, dtype = file.shape_dtype(split, "image")
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise MtlrunError(
            f"{file.path}: '{split}/image' is {dtype} of shape {shape}, the schema wants uint8 N x H x W x 3 "
            f"(0..255): {file.how_to_make}"
        )
    count, height, width = shape[:3]
    for key, kind in kinds.items():
        shape, dtype = file.shape_dtype(split, key)
        dtype_kinds, rest = _STORED[kind]
        expected = {"HW": (height, width), "HW3": (height, width, 3), "K": shape[1:2]}[rest]
        if dtype.kind not in dtype_kinds or len(shape) != 1 + len(rest) or shape[0] != count or shape[1:] != expected:
            want = {"iu": "integer", "f": "float", "biu": "integer"}[dtype_kinds]
            raise MtlrunError(
                f"{file.path}: '{split}/{key}' is {dtype} of shape {shape}, the schema wants {want} of shape "
                f"{(count, *expected) if rest != 'K' else (count, 'K')} ({count} images of {height}x{width}): "
                f"{file.how_to_make}"
            )


def _read_split(file: DatasetFile, split: str, targets: dict[str, tuple[str, TargetTransform]]) -> Split:
    arrays: dict[str, np.ndarray] = {}
    tensors = {}
    for name, (key, transform) in targets.items():
        if key not in arrays:
            arrays[key] = file.read(split, key)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(transform(arrays[key])))
    return Split(split, torch.from_numpy(file.read(split, "image")), tensors)


def _in_memory(setting: object, file: DatasetFile, splits: list[str], keys: set[str]) -> bool:
    """`dataset.in_memory`: true or host, false, or auto = when the arrays take under half the available
    memory (true and auto also put them on the GPU when they fit there: `loading.on_device`)."""
    if setting != "auto":
        return setting is True or setting == "host"
    needed = sum(file.nbytes(split, key) for split in splits for key in keys)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not every system reports free memory (macOS): judge by the total
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2
    return needed < available / 2


def _target_transform(spec: dict, attribute_names: list[str], file: DatasetFile) -> TargetTransform:
    """From rows of the stored array to the task's target: the selected attribute columns, normals channels
    first (once at load, or per batch for a lazy split)."""
    if spec["kind"] == "binary" and spec.get("columns"):
        missing = [c for c in spec["columns"] if c not in attribute_names]
        if missing:
            raise MtlrunError(f"{file.path} has no attribute {missing}; it has: {', '.join(attribute_names)}")
        columns = [attribute_names.index(c) for c in spec["columns"]]
        return lambda rows: rows[:, columns]
    if spec["kind"] == "normal":
        return lambda rows: rows.transpose(0, 3, 1, 2)
    return lambda rows: rows


def _check_classes(cfg: DictConfig, file: DatasetFile, tasks: list[Task]) -> None:
    specs = OmegaConf.to_container(cfg.task_specs, resolve=True)
    for task in tasks:
        if not hasattr(task, "num_classes"):
            continue
        stored = file.class_names(specs[task.name]["key"])
        if stored is not None and task.num_classes != len(stored):
            raise MtlrunError(
                f"task '{task.name}' expects {task.num_classes} classes but {file.path} has {len(stored)}: "
                f"set dataset.task_specs.{task.name}.num_classes={len(stored)}"
            )
        named = specs[task.name].get("class_names")
        if stored is not None and named is not None and [str(n) for n in named] != list(stored):
            # Other names (or another order) mean other labels than the user thinks: another array, another set
            raise MtlrunError(
                f"task '{task.name}' names its classes [{', '.join(map(str, named))}] but {file.path} stores "
                f"[{', '.join(stored)}] in '{specs[task.name]['key']}': set dataset.task_specs.{task.name}"
                f".class_names to the file's names (or null), or point the task at the right array"
            )


def _check_binary_maps(file: DatasetFile, specs: dict[str, dict]) -> None:
    """Each binary map's class exists in its label array and, where the spec names it, has that name in the
    file: a map trained under a wrong name would report its numbers under that name."""
    for name, spec in specs.items():
        if spec["kind"] != "binary_map":
            continue
        stored = file.class_names(spec["key"])
        if stored is None:
            continue
        named = spec.get("class_names") or [None] * len(spec["classes"])
        for index, expected in zip(spec["classes"], named):
            if index >= len(stored) or (expected is not None and stored[index] != expected):
                found = f"names class {index} {stored[index]!r}" if index < len(stored) else \
                    f"has only {len(stored)} classes"
                raise MtlrunError(
                    f"task '{name}' is class {index} ({expected or 'unnamed'}) of '{spec['key']}', but {file.path} "
                    f"{found}; its classes are {', '.join(stored)}: set the segmentation task's class_names "
                    f"(dataset.task_specs.<task>.class_names) to them"
                )

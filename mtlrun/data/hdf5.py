"""The HDF5 file schema every dataset is stored in, and its checked reader and atomic writer."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import h5py
import numpy as np

from mtlrun.errors import MtlrunError

SCHEMA_VERSION = 1
CHUNK_BYTES = 64 * 1024
# Layout: root attrs {mtlrun_schema, dataset, source, options (JSON), complete (true, set last; files written
# before it existed lack it)}; one group per split
# (train, val, test) holding `image` (uint8 N,H,W,3) and one array per target key: segmentation
# (int16 N,H,W, -1 = ignore), depth (float N,H,W, 0 = invalid), normal (float N,H,W,3, 0 = invalid),
# attributes (uint8 N,K with attr `names`). Class names: root attr `class_names` (JSON list), or, where a file
# holds several label sets (Cityscapes' 7 and 19 classes), attr `class_names` on each label array.


def write_dataset(
    path: Path, dataset: str, splits: dict[str, dict[str, np.ndarray]], source: str, options: dict,
    attribute_names: list[str] | None = None, class_names: list[str] | dict[str, list[str]] | None = None,
) -> None:
    """Write all splits to `path` through a temporary file, so a reader never sees a half-written file.

    `class_names` is one list for the file, or a list per label array key."""
    with StreamingWriter(path, dataset, source, options, attribute_names, class_names) as writer:
        for split, arrays in splits.items():
            for key, array in arrays.items():
                writer.create(split, key, array.shape, array.dtype)[...] = array


class StreamingWriter:
    """Writes a dataset file array slice by array slice, for data too large to hold in memory at once.

    Use it as a context manager: arrays are created empty with `create` and filled by slice assignment;
    the file appears at `path` only when the block ends without an error (written to a temporary
    `<path>.<pid>-<random>.partial` of its own, so writers running at once never touch each other's file,
    then renamed), so a reader never sees a half-written file; its `complete` attribute, set last, says it
    was written to the end. `write_dataset` is this for in-memory arrays."""

    def __init__(
        self, path: Path, dataset: str, source: str, options: dict, attribute_names: list[str] | None = None,
        class_names: list[str] | dict[str, list[str]] | None = None,
    ) -> None:
        self.path, self.tmp = path, path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
        self.attrs = {
            "mtlrun_schema": SCHEMA_VERSION, "dataset": dataset, "source": source, "options": json.dumps(options),
        }
        self.per_array = class_names if isinstance(class_names, dict) else {}
        if class_names is not None and not self.per_array:
            self.attrs["class_names"] = json.dumps(list(class_names))
        self.attribute_names = attribute_names

    def __enter__(self) -> StreamingWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.tmp, "x")
        self.file.attrs.update({**self.attrs, "complete": False})
        return self

    def create(self, split: str, key: str, shape: tuple[int, ...], dtype: np.dtype | type) -> h5py.Dataset:
        """An empty array `split/key`, to be filled by slice assignment; chunked by whole samples, one per chunk
        where a sample is large (random reads touch only their own), enough for ~64 KiB where it is small."""
        chunks = None
        if len(shape) > 1 and shape[0]:
            sample_bytes = max(1, int(np.prod(shape[1:])) * np.dtype(dtype).itemsize)
            chunks = (min(shape[0], max(1, CHUNK_BYTES // sample_bytes)), *shape[1:])
        ds = self.file.require_group(split).create_dataset(key, shape=shape, dtype=dtype, chunks=chunks)
        if key == "attributes" and self.attribute_names is not None:
            ds.attrs["names"] = json.dumps(list(self.attribute_names))
        if key in self.per_array:
            ds.attrs["class_names"] = json.dumps(list(self.per_array[key]))
        return ds

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if exc_type is None:
                self.file.attrs["complete"] = True
        finally:
            self.file.close()
        try:
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)  # a failed block or rename leaves no complete-looking file


class DatasetFile:
    """An opened, schema-checked dataset file; every error names the file and how to remake it."""

    def __init__(self, path: Path, dataset: str, how_to_make: str) -> None:
        self.path, self.how_to_make = path, how_to_make
        if path.is_dir():
            raise MtlrunError(f"dataset.path={path} is a folder: point dataset.path at the {dataset} HDF5 file in it")
        if not path.is_file():
            raise MtlrunError(f"{dataset} data file {path} not found: {how_to_make}, or point dataset.path at it")
        try:
            self.file = h5py.File(path, "r")
        except OSError as e:
            raise MtlrunError(
                f"{path} is not a readable HDF5 file ({_first_line(e)}): {how_to_make}"
            ) from None
        version = self.file.attrs.get("mtlrun_schema")
        if version is None:
            raise MtlrunError(f"{path} is not an mtlrun dataset file (no mtlrun_schema attribute): {how_to_make}")
        if not (isinstance(version, int | np.integer) and version == SCHEMA_VERSION):
            shown = version.item() if isinstance(version, np.generic) else version
            raise MtlrunError(
                f"{path} has schema version {shown!r}, this mtlrun reads version {SCHEMA_VERSION}: {how_to_make}"
            )
        if not self.file.attrs.get("complete", True):
            raise MtlrunError(f"{path} is incomplete (its writer stopped before the end): {how_to_make}")
        made_for = self.file.attrs.get("dataset")
        if made_for is not None and made_for != dataset:
            raise MtlrunError(
                f"{path} holds the {made_for} dataset, not {dataset}: pass dataset={made_for}, or point "
                f"dataset.path at a {dataset} file ({how_to_make})"
            )
        self.attrs = dict(self.file.attrs)

    def splits(self) -> list[str]:
        return list(self.file.keys())

    def read(self, split: str, key: str) -> np.ndarray:
        if split not in self.file or key not in self.file[split]:
            raise MtlrunError(f"{self.path} has no '{split}/{key}' array: {self.how_to_make}")
        try:
            return self.file[split][key][...]
        except OSError as e:
            raise MtlrunError(
                f"{self.path} is corrupt: reading '{split}/{key}' failed ({_first_line(e)}): {self.how_to_make}"
            ) from None

    def has(self, split: str, key: str) -> bool:
        return split in self.file and key in self.file[split]

    def shape_dtype(self, split: str, key: str) -> tuple[tuple[int, ...], np.dtype]:
        ds = self.file[split][key]
        return tuple(ds.shape), ds.dtype

    def nbytes(self, split: str, key: str) -> int:
        return int(self.file[split][key].nbytes)

    def attribute_names(self, split: str) -> list[str]:
        ds = self.file[split].get("attributes")
        return json.loads(ds.attrs["names"]) if ds is not None and "names" in ds.attrs else []

    def class_names(self, key: str) -> list[str] | None:
        """The class names of label array `key`: its own, else the file's, else None."""
        for split in self.splits():
            ds = self.file[split].get(key)
            if ds is not None and "class_names" in ds.attrs:
                return json.loads(ds.attrs["class_names"])
        stored = self.attrs.get("class_names")
        return json.loads(stored) if stored is not None else None

    def close(self) -> None:
        self.file.close()


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__

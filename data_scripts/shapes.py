"""Build the built-in benchmark's HDF5 file ahead of time (mtlrun also builds it on first use)."""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import ConversionError, one_line_errors

from mtlrun.data import build_shapes, check_shapes_options
from mtlrun.errors import MtlrunError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="HDF5 file to write")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=1600)
    parser.add_argument("--num-val", type=int, default=400)
    parser.add_argument("--num-test", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    with one_line_errors("shapes"):
        try:
            check_shapes_options(
                args.image_size, args.num_train, args.num_val, args.num_test, args.seed, "--"
            )
        except MtlrunError as e:
            raise ConversionError(str(e).replace("_", "-")) from None
        if args.out.is_dir():
            raise ConversionError(
                f"--out {args.out} is a folder: give a file name, e.g. {args.out / 'shapes.h5'}"
            )
        if args.out.exists() and not args.force:
            raise ConversionError(
                f"--out {args.out} exists: pass --force to replace it, or choose another name"
            )
        try:
            build_shapes(args.out, args.image_size, args.num_train, args.num_val, args.num_test, args.seed)
        except OSError as e:
            raise ConversionError(f"cannot write {args.out} ({e.strerror or e})") from None
    print(f"wrote {args.out}; train with: mtlrun dataset.path={args.out}")


if __name__ == "__main__":
    main()

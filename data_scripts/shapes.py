"""Build the built-in benchmark's HDF5 file ahead of time (mtlrun also builds it on first use)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mtlrun.data import build_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="HDF5 file to write")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=2400)
    parser.add_argument("--num-val", type=int, default=400)
    parser.add_argument("--num-test", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    args = parser.parse_args()
    build_shapes(args.out, args.image_size, args.num_train, args.num_val, args.num_test, args.seed)
    print(f"wrote {args.out}; train with: mtlrun dataset.path={args.out}")


if __name__ == "__main__":
    main()

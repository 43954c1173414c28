"""`python -m mtlrun.bench` (`make bench`): its options, checked, and the settings it times in turn."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from mtlrun import CONF_DIR, bench
from mtlrun.bench.architectures import architectures_table, measure_architecture
from mtlrun.bench.cases import DEFAULT_METHODS, cases, compose_config
from mtlrun.bench.report import device_name, format_row, header, write_csv
from mtlrun.bench.setting import bench_setting
from mtlrun.bench.stats import least_repeats
from mtlrun.bench.workloads import GPU_WORKLOADS, workload_overrides
from mtlrun.data import task_names
from mtlrun.errors import MtlrunError
from mtlrun.train.build import pick_device

# Timed iterations of a case per repeat (CPU, GPU: a block ends with a synchronisation, which on a GPU drains
# the queue that training keeps full), and of an architecture.
ITERATIONS, ITERATIONS_GPU, ARCHITECTURE_ITERATIONS = 1, 5, 20


def _choices(value: str, allowed: tuple[str, ...], option: str, parser: argparse.ArgumentParser) -> list[str]:
    chosen = [v for v in value.split(",") if v]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        parser.error(f"unknown {option} {unknown}; known: {', '.join(allowed)}")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mtlrun.bench", description=bench.__doc__)
    parser.add_argument("--workloads", default=None,
                        help="comma-separated: shapes (the built-in benchmark) and experiments of conf/experiment/ "
                             f"(random inputs of the real shapes); default: {','.join(GPU_WORKLOADS)} on a GPU, "
                             "shapes on the CPU")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"timed iterations of a case in each repeat (default: {ITERATIONS} on the CPU, "
                             f"{ITERATIONS_GPU} on a GPU; with --architectures: timed iterations per "
                             f"architecture, default {ARCHITECTURE_ITERATIONS})")
    parser.add_argument("--repeats", type=int, default=20,
                        help="round-robin sweeps over the cases, each timing every case once; the medians "
                             f"and intervals are over them (default: %(default)s; at least "
                             f"{least_repeats()})")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed iterations of each case before any is timed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None, help="instead of each workload's own batch size")
    parser.add_argument("--precision", default=None, help="fp32, bf16 or both (default: both on a GPU, fp32 on the CPU)")
    parser.add_argument("--compile", default=None, choices=("off", "on", "both"),
                        help="trainer.compile (default: both on a GPU, off on the CPU, where inductor takes minutes)")
    parser.add_argument("--group-size", type=int, default=2, help="k of the grouped case (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated baseline methods to time as well, 'all', or 'none' (default: %(default)s)")
    parser.add_argument("--csv", default="bench.csv", help="where the rows go (default: %(default)s)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--architectures", default=None,
                        help="instead: parameters, peak memory and time per averaged iteration of these "
                             "architectures (comma-separated, or 'all') relative to hps, each in its own process")
    parser.add_argument("--measure-architecture", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every workload, e.g. model.width=32")
    return parser


def main(argv: list[str] | None = None) -> None:
    options = build_parser()
    args = options.parse_args(argv)
    try:
        device = pick_device(args.device)
    except MtlrunError as e:
        options.error(str(e))
    if args.iterations is not None and args.iterations < 1:
        options.error(f"--iterations must be >= 1, got {args.iterations}")
    if args.measure_architecture:
        iterations = args.iterations or ARCHITECTURE_ITERATIONS
        print(json.dumps(measure_architecture(args.measure_architecture, args.overrides, device, iterations)))
        return
    if args.architectures:
        _architectures(args, device, options)
        return
    _strategies(args, device, options)


def _architectures(args: argparse.Namespace, device: torch.device, parser: argparse.ArgumentParser) -> None:
    from mtlrun.models import ARCHITECTURES

    names = list(ARCHITECTURES) if args.architectures == "all" else args.architectures.split(",")
    unknown = sorted(set(names) - set(ARCHITECTURES))
    if unknown:
        parser.error(f"unknown --architectures {unknown}; known: {', '.join(ARCHITECTURES)}")
    iterations = args.iterations or ARCHITECTURE_ITERATIONS
    print(f"device: {device}, threads: {torch.get_num_threads()}, torch {torch.__version__}, strategy=averaged, "
          f"{iterations} timed iterations per architecture after 3 warm-up")
    architectures_table(names, args.overrides, args.device, iterations)


def _methods(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    from mtlrun.strategies import STRATEGIES, LossCombiner

    known = [n for n, cls in STRATEGIES.items() if issubclass(cls, LossCombiner) and n != "averaged"]
    methods = [] if args.methods == "none" else known if args.methods == "all" else \
        [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(known))
    if unknown:
        parser.error(f"unknown --methods {unknown}; known: {', '.join(sorted(known))}")
    return methods


def _strategies(args: argparse.Namespace, device: torch.device, parser: argparse.ArgumentParser) -> None:
    methods = _methods(args, parser)
    gpu = device.type == "cuda"
    experiments = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    workloads = _choices(args.workloads or ",".join(GPU_WORKLOADS if gpu else ("shapes",)),
                         ("shapes", *experiments), "--workloads", parser)
    precisions = _choices(args.precision or ("fp32,bf16" if gpu else "fp32"), ("fp32", "bf16"), "--precision", parser)
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile or ("both" if gpu else "off")]
    for option, value, least in (("--group-size", args.group_size, 1), ("--batch-size", args.batch_size, 1),
                                 ("--repeats", args.repeats, least_repeats()), ("--warmup", args.warmup, 1)):
        if value is not None and value < least:
            parser.error(f"{option} must be >= {least}, got {value}")
    iterations = args.iterations or (ITERATIONS_GPU if gpu else ITERATIONS)
    print(f"device: {device_name(device)}, torch {torch.__version__}; each case warmed up ({args.warmup} "
          f"iterations), then {args.repeats} round-robin repeats of {iterations} timed iterations per case; "
          f"workloads {', '.join(workloads)}; precision {', '.join(precisions)}; "
          f"compile {args.compile or ('both' if gpu else 'off')}; load average {os.getloadavg()[0]:.1f} (other "
          f"processes slow the timings); rows go to {args.csv}", flush=True)
    try:
        rows = _run_settings(args, device, methods, workloads, precisions, compiles, iterations)
    except MtlrunError as e:
        sys.exit(f"mtlrun.bench: {e}")
    print(f"\nwrote {len(rows)} rows to {args.csv}")


def _run_settings(args: argparse.Namespace, device: torch.device, methods: list[str], workloads: list[str],
                  precisions: list[str], compiles: list[bool], iterations: int) -> list[dict]:
    """Every workload at every precision and compile setting, each printed as a table; the CSV is rewritten after
    each, so that an interrupted bench keeps what it measured."""
    rows: list[dict] = []
    case_list = cases(methods, args.group_size)
    with tempfile.TemporaryDirectory(prefix="mtlrun-bench-") as folder:
        for workload in workloads:
            overrides = workload_overrides(workload, Path(folder), args.batch_size, args.overrides)
            for precision in precisions:
                for compile_ in compiles:
                    cfg = compose_config(overrides)
                    print(f"\n{workload}: dataset={cfg.dataset.name} model={cfg.model.name} "
                          f"T={len(task_names(cfg.dataset))} batch {cfg.trainer.batch_size}, {precision}, "
                          f"compile {'on' if compile_ else 'off'}", flush=True)
                    print(header(), flush=True)
                    rows += bench_setting(workload, overrides, device, precision, compile_, case_list,
                                          args.group_size, iterations, args.repeats, args.warmup,
                                          lambda row: print(format_row(row), flush=True), warm_process=not rows)
                    write_csv(rows, Path(args.csv))
    return rows

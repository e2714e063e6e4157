"""The ``osslbench`` command: run, bench, list, show, splits, leaderboard, plot."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import parse_overrides
from .errors import ConfigError, HostError, OsslbenchError
from .protocol import SEED_LIMIT

DEFAULT_PROTOCOL = "digits-openset"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _common(p: argparse.ArgumentParser, protocol_required: bool = False) -> None:
    p.add_argument("--protocol", default=None if protocol_required else DEFAULT_PROTOCOL, required=protocol_required,
                   help=f"protocol name or .toml path (default: {DEFAULT_PROTOCOL})")
    p.add_argument("--scale", default=None, help="named scale: full (the paper), mini (2 CPU cores), smoke (tests)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any protocol or method key, e.g. train.epochs=3 or method.srd.beta=2")


def _data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get("OSSLBENCH_DATA", "data")),
                   help="folder with the datasets (default: $OSSLBENCH_DATA or ./data)")
    p.add_argument("--download", action="store_true", help="download missing datasets (needs internet)")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="osslbench", description="Open-set semi-supervised learning and distillation benchmark")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run protocol x methods x seeds and print the leaderboard")
    _common(run)
    _data_root(run)
    run.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                     help="run every value of a protocol key, e.g. mismatch=0,0.25,0.5,0.75,1 (repeat for a grid)")
    run.add_argument("--methods", default=None,
                     help="comma-separated names and groups: all, distillers, ssl, openset (each group with supervised, "
                          "the reference); default: the protocol's list")
    run.add_argument("--seeds", default=None, help="comma-separated seeds (default: the protocol's)")
    run.add_argument("--out", type=Path, default=Path("results"), help="output folder (default: ./results)")
    run.add_argument("--teacher", default=None, help="teacher checkpoint (RepDistiller format); default: train one")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    run.add_argument("--jobs", type=int, default=1, help="runs in parallel on this machine (joblib)")
    run.add_argument("--cluster", default=None, help="Dask scheduler address: run on that cluster")
    run.add_argument("--threads", type=int, default=0, help="torch threads per run (default: cores / jobs)")
    run.add_argument("--overwrite", action="store_true", help="discard results of another config in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    bench = sub.add_parser("bench", help="time osslbench's training step against the conventional pipeline")
    _common(bench)
    _data_root(bench)
    bench.add_argument("--method", default="srd", help="the method to time (default: srd)")
    bench.add_argument("--steps", type=int, default=20, help="timed steps per pipeline (default: 20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    bench.add_argument("--workers", type=int, default=-1,
                       help="DataLoader workers of the reference pipeline (default: min(8, cores))")
    bench.add_argument("--teacher", default=None, help="teacher checkpoint (default: the architecture, untrained)")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    bench.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    bench.add_argument("--labelled-hit-rate", type=float, default=None,
                       help="share of labelled views served by the labelled-view cache while timed (default: the mean "
                            "of a whole run at the protocol's scale; 0 = a run's first epoch; 1 = a run after another "
                            "method of the same seed, e.g. SRD after KD)")
    bench.add_argument("--prior-runs", type=int, default=0,
                       help="time the mean of a run that finds the labelled views of this many whole earlier runs "
                            "stored (a grid's later seeds with the same teacher; default: 0)")
    bench.add_argument("--rounds", type=int, default=4,
                       help="split the timed steps into this many rounds, the two pipelines taking turns (default: 4)")
    bench.add_argument("--no-reference", action="store_true", help="time osslbench only")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")

    ls = sub.add_parser("list", help="list protocols, methods, models or sources")
    ls.add_argument("what", choices=["protocols", "methods", "models", "sources"])

    show = sub.add_parser("show", help="print the fully resolved protocol as JSON")
    show.add_argument("name")
    show.add_argument("--scale", default=None)
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    sp = sub.add_parser("splits", help="print the size and classes of every split as JSON")
    _common(sp, protocol_required=True)
    _data_root(sp)
    sp.add_argument("--seed", type=int, default=0)

    lb = sub.add_parser("leaderboard", help="aggregate result.json files into leaderboard CSV / Markdown")
    lb.add_argument("--out", type=Path, default=Path("results"))
    lb.add_argument("--protocol", default=None)
    lb.add_argument("--markdown", action="store_true", help="print Markdown instead of CSV")
    lb.add_argument("--versus", metavar="METHOD", default=None,
                    help="print (and write to <protocol>/versus-METHOD.csv / .md) every method's mean per-seed "
                         "difference from METHOD and a paired t-test's p over the seeds both ran")

    pl = sub.add_parser("plot", help="plot leaderboards and training curves into <out>/<protocol>/")
    pl.add_argument("--out", type=Path, default=Path("results"))
    pl.add_argument("--protocol", default=None)
    return ap


def _seed(value: int, flag: str) -> int:
    if not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{flag}: seed {value} is outside [0, 2**32)")
    return value


def _seeds(text: str | None, default: list[int]) -> list[int]:
    """``--seeds 0,1,2`` (each in [0, 2**32), a repeated seed collapsed: it is one run) or the protocol's."""
    if text is None:
        return default
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers") from None
    if not seeds:
        raise ConfigError(f"--seeds {text!r}: no seed given")
    return list(dict.fromkeys(_seed(s, "--seeds") for s in seeds))


def cmd_run(args: argparse.Namespace) -> None:
    from .registry import resolve_method_names
    from .results import markdown, write_leaderboard
    from .runner import RunOptions, preflight, run_grid
    from .sweep import sweep_protocols

    points = sweep_protocols(args.protocol, args.scale, parse_overrides(args.overrides), args.sweep)
    protocol = points[0]
    methods = resolve_method_names(args.methods, protocol)
    seeds = _seeds(args.seeds, protocol.seeds)
    if args.jobs < 1:
        raise OsslbenchError(f"--jobs {args.jobs}: must be >= 1 (runs at once)")
    if args.threads < 0:
        raise OsslbenchError(f"--threads {args.threads}: must be >= 0 (0 = the cores divided among the jobs)")
    opts = RunOptions(data_root=args.data_root, out=args.out, teacher=args.teacher, device=args.device,
                      jobs=args.jobs, cluster=args.cluster, threads=args.threads, download=args.download,
                      overwrite=args.overwrite, progress=not args.quiet)
    for point in points:
        preflight(point, methods, seeds, opts)
    t0 = time.perf_counter()
    swept = f" sweep={' '.join(args.sweep)}" if args.sweep else ""
    print(f"osslbench: {protocol.name} [{protocol.scale}]{swept} methods={','.join(methods)} seeds={seeds} -> "
          f"{args.out}", file=sys.stderr)
    run_grid(points, methods, seeds, opts)
    table = write_leaderboard(args.out, protocol.name)
    if not table.empty:
        table = table[table["scale"] == protocol.scale_label]
    print(markdown(table))
    print(f"osslbench: done in {time.perf_counter() - t0:.0f} s; {args.out / protocol.name / 'leaderboard.csv'}",
          file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import BenchOptions, format_report, run_bench
    from .protocol_loader import load_protocol
    from .registry import get_method

    protocol = load_protocol(args.protocol, args.scale, parse_overrides(args.overrides))
    get_method(args.method)  # an unknown name is one line naming it
    opts = BenchOptions(data_root=args.data_root, steps=args.steps, warmup=args.warmup, workers=args.workers,
                        device=args.device, threads=args.threads, teacher=args.teacher, reference=not args.no_reference,
                        labelled_hit_rate=args.labelled_hit_rate, prior_runs=args.prior_runs,
                        rounds=args.rounds)
    report = run_bench(protocol, args.method, opts)
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def cmd_list(args: argparse.Namespace) -> None:
    if args.what == "protocols":
        from .protocol_loader import protocol_files, read_tree

        items = {name: read_tree(path).get("description", "") for name, path in protocol_files().items()}
    elif args.what == "methods":
        from .registry import family, methods, origin

        items = {name: f"[{family(cls)}] ({origin(name)}) {cls.description}" for name, cls in methods().items()}
    elif args.what == "models":
        from .models import describe_models

        items = describe_models()
    else:
        from .sources import describe_sources

        items = describe_sources()
    width = max(map(len, items), default=0)
    for name, text in items.items():
        print(f"{name:<{width}}  {text}")


def cmd_show(args: argparse.Namespace) -> None:
    from .config import as_tree
    from .protocol_loader import load_protocol
    from .registry import get_method, method_config

    protocol = load_protocol(args.name, args.scale, parse_overrides(args.overrides))
    tree = as_tree(protocol)
    tree["method"] = {}
    for name in protocol.methods:
        cfg, optim = method_config(get_method(name), protocol)
        tree["method"][name] = {**as_tree(cfg), "optim": as_tree(optim)}
    print(json.dumps(tree, indent=2))


def cmd_splits(args: argparse.Namespace) -> None:
    from .data.dataset import make_splits, splits_report
    from .protocol_loader import load_protocol

    protocol = load_protocol(args.protocol, args.scale, parse_overrides(args.overrides))
    splits = make_splits(protocol, _seed(args.seed, "--seed"), args.data_root, args.download)
    report = splits_report(protocol, splits, args.data_root, args.download)
    print(json.dumps({"protocol": protocol.name, "scale": protocol.scale, "seed": args.seed, **report}, indent=2))


def cmd_leaderboard(args: argparse.Namespace) -> None:
    from .results import collect, leaderboard, markdown, unfinished, versus, versus_markdown, write_leaderboard

    runs = collect(args.out, args.protocol) if args.out.is_dir() else None
    if runs is None or runs.empty:
        raise OsslbenchError(f"no results under {args.out}" + (f" for protocol {args.protocol}" if args.protocol else ""))
    waiting = unfinished(args.out, args.protocol)
    if waiting:  # so that a row's seed count is not read as all there will be
        shown = ", ".join(str(p.relative_to(args.out)) for p in waiting[:3]) + (", ..." if len(waiting) > 3 else "")
        print(f"osslbench: note: {len(waiting)} run(s) interrupted or still running, not in the leaderboard: {shown}",
              file=sys.stderr)
    if args.versus:  # (refused before anything is written when there is no such method to compare with)
        paired = versus(runs, args.versus)
    try:
        for protocol in sorted(set(runs["protocol"])):
            write_leaderboard(args.out, protocol, args.versus)
    except HostError as exc:  # finished results on a read-only disk can still be read
        print(f"osslbench: warning: {exc}; printing the leaderboard only", file=sys.stderr)
    if args.versus:
        print(versus_markdown(paired) if args.markdown else paired.to_csv(index=False), end="")
        return
    table = leaderboard(runs)
    print(markdown(table) if args.markdown else table.to_csv(index=False), end="")


def cmd_plot(args: argparse.Namespace) -> None:
    from .plots import plot_all

    for path in plot_all(args.out, args.protocol):
        print(path)


COMMANDS = {"run": cmd_run, "bench": cmd_bench, "list": cmd_list, "show": cmd_show, "splits": cmd_splits,
            "leaderboard": cmd_leaderboard, "plot": cmd_plot}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    """The command line. Exit status: 0 done, 2 a mistake in the input (config, data, checkpoint, arguments),
    3 the machine (disk full, read-only folder, no such device), 130 interrupted; every error is one line."""
    args = parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except OsslbenchError as exc:
        print(f"osslbench: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the machine, wherever it happened: a full disk, a read-only folder, a vanished file
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"osslbench: error: {where}{exc.strerror or _one_line(exc)}", file=sys.stderr)
        return HostError.exit_code
    except MemoryError:
        print("osslbench: error: out of memory; use a smaller scale, batch size or --jobs", file=sys.stderr)
        return HostError.exit_code
    except KeyboardInterrupt:
        print("osslbench: interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

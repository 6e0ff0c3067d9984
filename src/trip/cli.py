"""The `trip` command line."""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from pathlib import Path

from trip.config import load_config
from trip.errors import TripError

QUICK = ["train.rounds=2", "data.images_per_class=12"]
TINY_NOTE = ("Note: a tiny CLIP pretrained for seconds on synthetic shapes. These numbers show the "
             "machinery works; they say nothing about TRIP on real benchmarks (see docs/reproduce.md).")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except TripError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are in results.json of the run folder", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trip", description="TRIP and baselines for federated domain "
                                "generalization with prompt learning on a frozen CLIP.")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole protocol offline on synthetic data with a tiny CLIP")
    demo.add_argument("--out", type=Path, help="run folder (default runs/demo-<time>)")
    demo.add_argument("--quick", action="store_true", help="fewer rounds and images: a smoke test")
    demo.set_defaults(func=_demo)

    run = sub.add_parser("run", help="run the experiment a YAML config describes")
    run.add_argument("config", type=Path)
    run.add_argument("--out", type=Path, help="run folder (default runs/<config name>-<time>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.rounds=3 (repeatable)")
    run.set_defaults(func=_run)
    return p


def _demo(args: argparse.Namespace) -> int:
    config = resources.files("trip") / "configs" / "demo.yaml"
    with resources.as_file(config) as path:
        cfg = load_config(path, QUICK if args.quick else [])
    return _execute(cfg, args.out or _default_out("demo"), note=TINY_NOTE)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    note = TINY_NOTE if cfg.backbone.name == "tiny" else ""
    return _execute(cfg, args.out or _default_out(args.config.stem), note=note)


def _execute(cfg, out: Path, note: str) -> int:
    from trip.experiment import run_experiment
    from trip.results import table_rows, text_table

    start = time.perf_counter()
    runs = run_experiment(cfg, out)
    print(f"\n{cfg.name}: target accuracy (%) per held-out domain, selected by source validation\n")
    print(text_table(*table_rows(runs)))
    print(f"\n{len(runs)} runs in {time.perf_counter() - start:.0f} s; run folder: {out}")
    if note:
        print(note)
    return 0


def _default_out(stem: str) -> Path:
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


if __name__ == "__main__":
    sys.exit(main())

"""The `trip` command line."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
import time
from importlib import resources
from pathlib import Path

from trip.config import load_config
from trip.data.synthetic import DOMAINS as SYNTHETIC_STYLES
from trip.data.synthetic import in_style_order
from trip.data.tools import add_data_command
from trip.errors import TripError
from trip.federation import privacy, secure
from trip.federation.flower.cli import add_parser as add_flower_command
from trip.shared_cores import share_the_cores

QUICK = ["train.rounds=2", "data.images_per_class=12"]
TINY_NOTE = ("Note: a tiny CLIP pretrained on synthetic shapes (its weights ship with trip). These numbers show the "
             "machinery works; they say nothing about TRIP on real benchmarks (see docs/reproduce.md), and on this "
             "task the frozen features still cap every method near zero-shot (the linear probe row; docs/studies.md).")
RANDOM_TINY_NOTE = ("Note: a tiny CLIP with random weights: a smoke test of the pipeline; the accuracies mean "
                    "nothing (see docs/reproduce.md).")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP (as a KeyboardInterrupt: every `finally` and context manager runs, and the
    Flower engine stops its processes); `detail` says what was kept."""

    def __init__(self, signum: int = signal.SIGINT, detail: str = ""):
        super().__init__(signum, detail)
        self.signum, self.detail = signum, detail


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main(argv: list[str] | None = None) -> int:
    share_the_cores()  # before any command imports torch (this module does not)
    args = _parser().parse_args(argv)
    previous = {s: signal.signal(s, _raise_interrupted) for s in STOP_SIGNALS} if _main_thread() else {}
    try:
        return args.func(args)
    except TripError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        stop = err if isinstance(err, Interrupted) else Interrupted()
        print(f"interrupted ({signal.Signals(stop.signum).name}){stop.detail}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal handlers can be set there only


def _raise_interrupted(signum: int, frame) -> None:
    # The first signal stops the command; more of them must not cut short the clean-up it started.
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


ENGINES = ["inprocess", "flower", "flower-sim"]  # docs/federation.md, engines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trip", description="TRIP and baselines for federated domain "
                                "generalization with prompt learning on a frozen CLIP.")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole protocol offline on synthetic data with a tiny CLIP")
    demo.add_argument("--out", type=Path, help="run folder (default runs/demo-<time>)")
    demo.add_argument("--quick", action="store_true", help="fewer rounds and images: a smoke test")
    demo.add_argument("--engine", choices=ENGINES, default="inprocess",
                      help="flower: the same protocol on a local Flower federation; flower-sim: on Flower's "
                           "simulation runtime (ray) (docs/federation.md)")
    demo.set_defaults(func=_demo)

    run = sub.add_parser("run", help="run the experiment a YAML config describes")
    run.add_argument("config", type=Path)
    run.add_argument("--out", type=Path, help="run folder (default runs/<config name>-<time>)")
    run.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                     help="override config keys, e.g. --set train.rounds=3 seeds=[0] (or --set again)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out: finished entries are kept, an interrupted one resumes "
                          "from its last checkpoint (re-running into the same folder does the same)")
    run.add_argument("--dry-run", action="store_true",
                     help="check the config and its data and print the plan (runs, clients, splits, params); "
                          "train nothing")
    run.add_argument("--data-root", type=Path, metavar="DIR",
                     help="folder holding the data sets (default: data.root of the config, else $TRIP_DATA)")
    run.add_argument("--backbone", metavar="NAME",
                     help="an open_clip model name (keeps backbone.pretrained) or 'tiny' (random weights): "
                          "smoke-test a paper config on a small tree")
    run.add_argument("--engine", choices=ENGINES, default="inprocess",
                     help="inprocess (default): clients in turn in this process; flower: a local Flower "
                          "federation (SuperLink + one SuperNode per source domain on 127.0.0.1); flower-sim: "
                          "Flower's simulation runtime, a virtual SuperNode per client (needs ray); same numbers")
    run.set_defaults(func=_run)

    add_data_command(sub)  # trip data list | verify | download
    add_flower_command(sub)  # trip flower certs | superlink | supernode | worker | run-config

    viz = sub.add_parser("viz", help="pictures").add_subparsers(dest="picture", required=True)
    maps = viz.add_parser("routing", help="token routing map and mixture weights of image files, at the train "
                          "and inference capacity factors of the config's first trip / trip-lite method")
    maps.add_argument("images", type=Path, nargs="+",
                      help="image files; one inside <domain>/<class>/ of the config's data set seeds its k-means "
                           "as the cache does (matching the cached weights), any other by its file name")
    maps.add_argument("--config", type=Path, required=True, help="the backbone and router settings come from here")
    maps.add_argument("--out", type=Path, default=Path("routing-maps"), help="folder for the PNGs")
    maps.set_defaults(func=_viz)

    report = sub.add_parser("report", help="one Markdown report putting run folders side by side")
    report.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", type=Path, help="the Markdown file (default: <first RUN_DIR>-report.md beside it)")
    report.add_argument("--html", action="store_true", help="also write a self-contained HTML page beside it")
    report.set_defaults(func=_report)

    study = sub.add_parser("study", help="one of the paper's open checks on the embedded task (docs/studies.md)")
    study.add_argument("name", choices=["shift-ladder", "anchor", "router", "lite"])
    study.add_argument("--out", type=Path, help="study folder (default runs/study-<name>-<time>)")
    study.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    study.add_argument("--quick", action="store_true", help="2 rounds and 12 images per class: a smoke test")
    study.set_defaults(func=_study)

    bench = sub.add_parser("bench", help="speed of the fast paths against the official-style ones (ratios)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when visible, else cpu")
    bench.add_argument("--out", type=Path, help="also write the measurements to this JSON file")
    bench.add_argument("--tiny", action="store_true", help="a tiny model and sizes: seconds, for tests")
    bench.set_defaults(func=_bench)

    weights = sub.add_parser("weights", help="backbone weights files").add_subparsers(dest="action", required=True)
    convert = weights.add_parser("convert", help="OpenAI's CLIP file (ViT-B-16.pt, a TorchScript archive) to "
                                 "safetensors for backbone.pretrained; prints its SHA-256 against OpenAI's URL")
    convert.add_argument("source", type=Path, help="OpenAI's file, e.g. ViT-B-16.pt (only from a trusted source)")
    convert.add_argument("out", type=Path, help="the .safetensors file to write")
    convert.add_argument("--force", action="store_true", help="replace OUT if it exists")
    convert.set_defaults(func=_convert_weights)
    tiny = weights.add_parser("pretrain-tiny", help="pretrain the demo's tiny CLIP on synthetic captions and write "
                              "its weights file into a folder (the default styles give the file trip ships in "
                              "src/trip/assets); prints the file's SHA-256")
    tiny.add_argument("folder", type=Path, help="where to write tiny-clip-synthetic-<recipe>.safetensors")
    tiny.add_argument("--styles", nargs="+", choices=SYNTHETIC_STYLES, help="the corpus' styles (default: all four)")
    tiny.add_argument("--force", action="store_true", help="overwrite the file if it is there")
    tiny.set_defaults(func=_pretrain_tiny)
    return p


def _convert_weights(args: argparse.Namespace) -> int:
    from trip.weights import convert_openai

    convert_openai(args.source, args.out, force=args.force)
    return 0


def _pretrain_tiny(args: argparse.Namespace) -> int:
    from trip.pretrain import write_pretrained

    path, sha256 = write_pretrained(args.folder, in_style_order(args.styles or SYNTHETIC_STYLES), force=args.force)
    print(f"wrote {path}\nsha256 {sha256}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    config = resources.files("trip") / "configs" / "demo.yaml"
    with resources.as_file(config) as path:
        cfg = load_config(path, QUICK if args.quick else [])
    _check_engine(cfg, args.engine)
    out = args.out or _default_out("demo")
    flags = (["--quick"] if args.quick else []) + (["--engine", args.engine] if args.engine != "inprocess" else [])
    again = shlex.join(["trip", "demo", *flags, "--out", str(out)])
    return _execute(cfg, out, again, note=TINY_NOTE, engine=args.engine, fresh=args.out is None)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _backbone_overrides(args.backbone) + args.overrides)
    if args.data_root:
        cfg.data.root = str(args.data_root)
    _check_engine(cfg, args.engine)
    if args.dry_run:
        from trip.plan import format_plan, make_plan

        print(format_plan(make_plan(cfg)))
        return 0
    note = ""
    if cfg.backbone.name == "tiny" and cfg.backbone.pretrained in ("synthetic", None):
        note = TINY_NOTE if cfg.backbone.pretrained == "synthetic" else RANDOM_TINY_NOTE
    if args.resume and args.out is None:
        raise TripError("--resume needs --out RUN_FOLDER: the folder of the run to continue")
    out = args.out or _default_out(args.config.stem)
    again = shlex.join(["trip", "run", str(args.config), *_flags(args), "--out", str(out), "--resume"])
    return _execute(cfg, out, again, note=note, engine=args.engine, resume=args.resume, fresh=args.out is None)


def _check_engine(cfg, engine: str) -> None:
    """What the engine cannot run is refused at once, before torch is imported and the data prepared."""
    privacy.check_engine(cfg, engine)
    secure.check_engine(cfg, engine)


def _flags(args: argparse.Namespace) -> list[str]:
    """The options of `trip run` that shape the config or the engine, as given."""
    flags = [flag for o in args.overrides for flag in ("--set", o)]
    for name, value in (("--backbone", args.backbone), ("--data-root", args.data_root)):
        flags += [name, str(value)] if value is not None else []
    return flags + (["--engine", args.engine] if args.engine != "inprocess" else [])


def _backbone_overrides(name: str | None) -> list[str]:
    """--backbone as config overrides, before the --set ones (which win). 'tiny' cannot use a paper config's
    weights, so it starts from random ones; --set backbone.pretrained=synthetic gives the demo's."""
    if name is None:
        return []
    if name == "tiny":
        return ["backbone.name=tiny", "backbone.pretrained=null", "backbone.quick_gelu=null"]
    return [f"backbone.name={name}"]


def _viz(args: argparse.Namespace) -> int:
    from trip.viz import write_routing_maps

    for path in write_routing_maps(args.images, load_config(args.config), args.out):
        print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from trip.report import default_out, write_report

    for path in write_report(args.run_dirs, args.out or default_out(args.run_dirs), html_page=args.html):
        print(path)
    return 0


def _study(args: argparse.Namespace) -> int:
    from trip.studies import run_study

    out = run_study(args.name, args.out or _default_out(f"study-{args.name}"), args.seeds, quick=args.quick)
    print((out / "study.md").read_text())
    print(f"study folder: {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from trip.bench import main as bench_main

    return bench_main(args.device, args.out, tiny=args.tiny)


def _execute(cfg, out: Path, again: str, note: str, engine: str = "inprocess", resume: bool = False,
             fresh: bool = False) -> int:
    """`again`: the command that continues this run after an interruption; `fresh`: `out` is a default run
    folder made for this run (removed again if the run never began)."""
    from trip.run_lock import remove_unused, run_folder_lock

    start = time.perf_counter()
    try:
        with run_folder_lock(out):  # before torch is imported: a second run into `out` is refused in a second
            from trip.experiment import run_experiment

            runs = run_experiment(cfg, out, engine=engine, resume=resume)
    except BaseException as err:
        if fresh:
            remove_unused(out)
        if isinstance(err, KeyboardInterrupt):
            raise _interrupted(err, out, again) from None
        raise
    from trip.results import accuracy_tables, text_table

    if cfg.protocol == "multidomain":
        from trip.multidomain_results import text_tables

        print(f"\n{cfg.name}: in-domain test accuracy (%) per domain, selected by validation\n")
        print(text_tables(cfg, runs))
    else:
        for title, header, rows in accuracy_tables(runs, cfg.data.name):
            print(f"\n{cfg.name}: target accuracy (%) per held-out domain{', ' + title if title else ''}, "
                  f"selected by source validation\n")
            print(text_table(header, rows))
    print(f"\n{len(runs)} runs in {time.perf_counter() - start:.0f} s; run folder: {out}")
    if note:
        print(note)
    return 0


def _interrupted(err: KeyboardInterrupt, out: Path, again: str) -> Interrupted:
    """What an interruption kept: nothing during start-up, else the run folder that `again` continues."""
    signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
    if not (out / "config.yaml").is_file():
        return Interrupted(signum, ": stopped during start-up, before the run began; nothing to resume")
    results = out / "results.json"
    kept = f"finished runs are in {results}" if results.is_file() else f"no run in {out} had finished yet"
    return Interrupted(signum, f": {kept}; `{again}` continues the run")


def _default_out(stem: str) -> Path:
    """A new folder runs/<stem>-<time>, made here so that two runs started in the same second get two."""
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
        except OSError as err:
            raise TripError(f"cannot make the run folder {path} ({err.strerror}): pass --out DIR") from None
    raise TripError(f"{base}-2 … -999 all exist: pass --out DIR")


if __name__ == "__main__":
    sys.exit(main())

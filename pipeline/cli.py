"""`curate` command line. Exit codes: 0 ok, 1 run failure, 2 bad config or usage."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

from curate.pipeline import __version__

# Only the standard library above: the engine is imported inside main(), where a Ctrl-C during the imports (half a
# second of pyarrow and the stages) still ends with the one-line message, not a traceback.

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
curate turns raw web image-text pairs (LAION-style URL + caption tables, or WebDataset tars) into a small,
clean CLIP training set: clean captions -> download -> pHash dedup against eval sets -> CLIP similarity
filter -> curated Parquet + WebDataset shards, on Dask (captions first: a row they reject is never downloaded).

Exit codes: 0 ok, 1 run failure, 2 bad config or usage."""

EPILOG = """\
examples:
  curate demo                                   offline demo on the bundled corpus
  curate validate configs/laion_subset.yaml
  curate run configs/laion_subset.yaml --set input.path=part-00000.parquet --set output.path=runs/p0
  curate hash-evalset /data/imagenet/val --name imagenet-val -o indexes/imagenet-val.parquet
  curate dedup-report --corpus runs/p0 --index indexes/imagenet-val.parquet -o runs/p0/dedup
  curate report runs/p0

docs: docs/config.md (every option), docs/architecture.md, docs/operations.md"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see docs/config.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (YAML syntax), repeatable, e.g. --set clip.threshold=0.3")


def build_parser() -> argparse.ArgumentParser:
    from curate.pipeline import registry

    parser = argparse.ArgumentParser(prog="curate", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"curate {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # `curate run -v` works like `curate -v run` (SUPPRESS: an absent sub-command flag keeps the global one).
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", parents=[verbose], help="run the pipeline described by a config",
                       description="Run the pipeline. Re-running the same config resumes: finished partitions "
                                   "are skipped.")
    _add_config_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("validate", parents=[verbose], help="check a config without running it",
                       description="Parse and validate a config; same messages and exit codes as `run`.")
    _add_config_args(p)

    for stage in registry.registered():  # tools a stage provides (e.g. dedup: hash-evalset, dedup-report)
        for command in stage.cls.commands():
            p = sub.add_parser(command.name, parents=[verbose], help=command.help, description=command.description)
            command.add_arguments(p)
            p.set_defaults(handler=command.run)

    p = sub.add_parser("report", parents=[verbose], help="(re)write RUN_DIR/report.html",
                       description="Write the HTML run report of a finished run directory.")
    p.add_argument("run_dir")

    p = sub.add_parser("demo", parents=[verbose], help="run the bundled offline demo (starts its own loopback image server)",
                       description="Serve the bundled demo images on 127.0.0.1 and run configs/demo.yaml on them.")
    p.add_argument("-o", "--output", default="demo-run", help="run directory (default: ./demo-run)")
    p.add_argument("--config", default=None, help="demo config (default: configs/demo.yaml of this checkout)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return parser


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from curate.pipeline.config import load_config

    return load_config(args.config, args.overrides)


def _cmd_validate(args: argparse.Namespace) -> int:
    from curate.pipeline.runner import Runner

    config = _load(args)
    Runner(config, echo=lambda _msg: None).check()  # the same checks `run` makes before any work
    print(f"{args.config}: ok (input {config.input.path}, output {config.output.path})")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from curate.pipeline.runner import run

    config = _load(args)
    run(config, progress=False if args.no_progress else None)
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from curate.pipeline.report import write_run_report

    print(f"curate: report -> {write_run_report(args.run_dir)}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from curate.pipeline.demo import run_demo

    run_demo(args.output, config_path=args.config, overrides=args.overrides)
    return EXIT_OK


@contextlib.contextmanager
def _first_ctrl_c_only() -> Iterator[None]:
    """The first Ctrl-C stops the run (KeyboardInterrupt); later ones are ignored until the process exits.

    Pressed again while Dask closes the cluster, a second KeyboardInterrupt would cancel that close half-way, and
    the thread closing the same cluster beside it would then wait for it forever (seen: a run that never exited).
    The stop itself is bounded by the closes' own timeouts. Left as it is where SIGINT is not Python's default
    (ignored by a background shell job, or a handler of the caller's) and off the main thread.
    """
    import signal
    import threading

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    fired = False

    def first(_signum: int, _frame: object) -> None:
        nonlocal fired
        if fired:  # a second Ctrl-C close behind the first can run this again before SIG_IGN is in place
            return
        fired = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        if not fired:  # no Ctrl-C came: as before
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _close_clusters_quietly() -> None:
    """After Ctrl-C, close what Dask still has open now, silently, instead of at exit with a traceback of a
    half-started cluster."""
    spec = sys.modules.get("distributed.deploy.spec")
    if spec is None:
        return
    import atexit
    import io

    with contextlib.suppress(Exception, KeyboardInterrupt), contextlib.redirect_stderr(io.StringIO()):
        spec.close_clusters()
    atexit.unregister(spec.close_clusters)


COMMANDS = {
    "run": _cmd_run,
    "validate": _cmd_validate,
    "report": _cmd_report,
    "demo": _cmd_demo,
}
# Commands that run the pipeline: any other error there is a run failure (exit 1), not a usage error.
PIPELINE_COMMANDS = ("run", "demo")


_interrupted = False  # main() handled a Ctrl-C: see entry()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (`argv` as on the command line; None: sys.argv) and return its exit code."""
    global _interrupted
    with _first_ctrl_c_only():
        try:
            return _main(argv)
        except KeyboardInterrupt:  # at any point: imports, parsing, cluster start, the run, the final writes
            _interrupted = True
            print("curate: interrupted; re-run the same command to resume", file=sys.stderr)
            _close_clusters_quietly()
            return EXIT_FAILED


def entry() -> None:
    """The `curate` command: `main()`, then exit with its code.

    After a Ctrl-C that main() handled, the process ends with os._exit: CPython sets a flag when a
    KeyboardInterrupt passes through code compiled from a string (exec/eval of source text, as dataclasses and
    namedtuple build their methods while modules import), never clears it when the exception is caught later,
    and `python -m curate.pipeline.cli` then ends a normal exit by killing itself with SIGINT (exit -2: 3 of 40
    Ctrl-Cs 0.3-1.2 s after start). Nothing is left to wait for by then: the interrupted run closed its cluster in
    place and released its lock.
    """
    code = main()
    if _interrupted:
        import os

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _main(argv: Sequence[str] | None) -> int:
    from curate.pipeline import console
    from curate.pipeline.configspec import ConfigError
    from curate.pipeline.runlock import RunLocked

    parser = build_parser()
    args = parser.parse_args(argv)
    console.configure(args.verbose)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args)
    except ConfigError as err:
        print(f"curate: config error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RunLocked as err:  # nothing ran: the user picks another output.path or waits
        print(f"curate: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError) as err:
        if args.command not in PIPELINE_COMMANDS:
            print(f"curate: {err}", file=sys.stderr)
            return EXIT_USAGE
        print(f"curate: run failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as err:
        logging.getLogger("curate").debug("run failed", exc_info=True)
        print(f"curate: run failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    entry()

#!/usr/bin/env python3
"""gpt-oss QAT Studio. Run it with the Python `make setup` installs in .venv:

    .venv/bin/python launch.py                          the app on http://127.0.0.1:7860 (starts the engine if needed)
    .venv/bin/python launch.py run RECIPE.yaml          the whole recipe headless; prints the results table
    .venv/bin/python launch.py resume RUN_ID            continue a run's interrupted/failed/cancelled jobs
    .venv/bin/python launch.py cancel RUN_ID            stop a run (kills its jobs' process trees)
    .venv/bin/python launch.py status [RUN_ID] [--json] runs, or one run's header, jobs and results
    .venv/bin/python launch.py engine                   the background engine, in the foreground
    .venv/bin/python launch.py stop                     stop the background engine (running jobs become interrupted)
    .venv/bin/python launch.py serve CHECKPOINT         serve an exported checkpoint (OpenAI-compatible API)

Every command takes --workdir DIR (default: $QAT_STUDIO_HOME or ./workspace), before or after the command's name.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from cli.flags import StudioParser, add_recipe_flags

    # --workdir (and the app's --host/--port/--auth) are accepted before or after the subcommand: each subcommand
    # declares them again with a SUPPRESSed default, so a value given on either side survives the other's parse.
    common = StudioParser(add_help=False)
    common.add_argument("--workdir", default=argparse.SUPPRESS, metavar="DIR",
                        help="workspace directory (default: $QAT_STUDIO_HOME or ./workspace)")
    parser = StudioParser(prog="launch.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="workspace directory (default: $QAT_STUDIO_HOME or ./workspace)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=StudioParser)
    _app_flags(parser)

    app = sub.add_parser("app", parents=[common], help="the web app (default command)")
    _app_flags(app)

    run = sub.add_parser("run", parents=[common], help="run a recipe headless and print the results table")
    run.add_argument("recipe", help="recipe YAML, e.g. assets/recipes/demo.yaml")
    run.add_argument("--no-wait", action="store_true", help="queue the run and return at once")
    add_recipe_flags(run)

    resume = sub.add_parser("resume", parents=[common], help="resume a run from its last checkpoints")
    resume.add_argument("run_id")
    resume.add_argument("--no-wait", action="store_true", help="re-queue the jobs and return at once")

    cancel = sub.add_parser("cancel", parents=[common], help="cancel a run")
    cancel.add_argument("run_id")

    status = sub.add_parser("status", parents=[common], help="list runs, or show one")
    status.add_argument("run_id", nargs="?")
    status.add_argument("--json", action="store_true", help="print JSON only (runs, or one run with jobs and results)")

    engine = sub.add_parser("engine", parents=[common], help="run the engine in the foreground")
    engine.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                        help="exit after this many idle seconds")

    sub.add_parser("stop", parents=[common],
                   help="stop the engine; its running jobs become interrupted (resume them later)")

    serve = sub.add_parser("serve", parents=[common], help="serve a checkpoint with an OpenAI-compatible API")
    serve.add_argument("checkpoint")
    serve.add_argument("--backend", default="transformers", choices=["transformers", "vllm", "sglang", "trtllm"])
    serve.add_argument("--host", default=argparse.SUPPRESS, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=argparse.SUPPRESS, help="port (default 8000)")
    return parser


def _app_flags(parser: argparse.ArgumentParser) -> None:
    """Defaults are applied in main(), not here: a default set by the subcommand's parser would overwrite a value
    given before the subcommand."""
    parser.add_argument("--host", default=argparse.SUPPRESS, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=argparse.SUPPRESS, help="port (default 7860)")
    parser.add_argument("--auth", default=argparse.SUPPRESS, metavar="USER:PASS|FILE",
                        help="user:password, or a file with one user:password per line; "
                        "required when binding a non-loopback address")


# Imported by every command; a Python without them is not the one `make setup` prepared.
REQUIRED = ("pydantic", "yaml", "sqlite_utils", "torch")


def missing_packages_message() -> str | None:
    """A two-line explanation instead of a ModuleNotFoundError traceback when launch.py runs under a Python that
    lacks the studio's packages (e.g. the system python instead of .venv's)."""
    import importlib.util

    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"error: this Python ({sys.executable}) lacks the studio's packages (no module {missing[0]!r}).\n"
            "Set up once with `make setup` (it creates .venv), then run `.venv/bin/python launch.py ...`.")


def main(argv: list[str] | None = None) -> int:
    problem = missing_packages_message()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    from engine.runtime import workspace
    from engine.runs import UserError

    workdir = workspace.resolve_workdir(args.workdir)
    command = args.command or "app"
    try:
        if command == "run":
            from cli.commands import cmd_run
            from cli.flags import overrides_from_args

            return cmd_run(args.recipe, workdir, overrides_from_args(args), wait=not args.no_wait)
        if command == "resume":
            from cli.commands import cmd_resume

            return cmd_resume(args.run_id, workdir, wait=not args.no_wait)
        if command == "cancel":
            from cli.commands import cmd_cancel

            return cmd_cancel(args.run_id, workdir)
        if command == "status":
            from cli.commands import cmd_status

            return cmd_status(args.run_id, workdir, as_json=args.json)
        if command == "engine":
            from engine.runtime.worker import Engine

            workdir.mkdir(parents=True, exist_ok=True)
            return Engine(workdir, idle_exit=args.idle_exit).serve()
        if command == "stop":
            from cli.commands import cmd_stop

            return cmd_stop(workdir)
        if command == "serve":
            from engine.serving.server_process import cmd_serve

            return cmd_serve(args.checkpoint, workdir, backend=args.backend, host=getattr(args, "host", "127.0.0.1"),
                             port=getattr(args, "port", 8000))
        from ui.app import launch_app

        return launch_app(workdir, host=getattr(args, "host", "127.0.0.1"), port=getattr(args, "port", 7860),
                          auth=getattr(args, "auth", None))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

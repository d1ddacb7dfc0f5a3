#!/usr/bin/env python3
"""gpt-oss QAT Studio.

    python launch.py                        the app on http://127.0.0.1:7860 (starts the engine if needed)
    python launch.py run RECIPE.yaml        the whole recipe headless; prints the results table
    python launch.py resume RUN_ID          continue a run's interrupted/failed/cancelled jobs from their checkpoints
    python launch.py cancel RUN_ID          stop a run (kills its jobs' process trees)
    python launch.py status [RUN_ID]        runs, or one run's jobs and results
    python launch.py engine                 the background engine, in the foreground
    python launch.py stop                   stop the background engine (running jobs become interrupted)
    python launch.py serve CHECKPOINT       serve an exported checkpoint (OpenAI-compatible API on 127.0.0.1)

Every command takes --workdir (default: $QAT_STUDIO_HOME or ./workspace).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from cli.flags import add_recipe_flags

    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="workspace directory (default: $QAT_STUDIO_HOME or ./workspace)")
    sub = parser.add_subparsers(dest="command")

    app = sub.add_parser("app", help="the web app (default command)")
    _app_flags(app)
    _app_flags(parser, top_level=True)

    run = sub.add_parser("run", help="run a recipe headless and print the results table")
    run.add_argument("recipe", help="recipe YAML, e.g. assets/recipes/demo.yaml")
    run.add_argument("--no-wait", action="store_true", help="queue the run and return at once")
    add_recipe_flags(run)

    resume = sub.add_parser("resume", help="resume a run from its last checkpoints")
    resume.add_argument("run_id")
    resume.add_argument("--no-wait", action="store_true")

    cancel = sub.add_parser("cancel", help="cancel a run")
    cancel.add_argument("run_id")

    status = sub.add_parser("status", help="list runs, or show one")
    status.add_argument("run_id", nargs="?")
    status.add_argument("--json", action="store_true")

    engine = sub.add_parser("engine", help="run the engine in the foreground")
    engine.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")

    sub.add_parser("stop", help="stop the engine; its running jobs become interrupted (resume them later)")

    serve = sub.add_parser("serve", help="serve a checkpoint with an OpenAI-compatible API")
    serve.add_argument("checkpoint")
    serve.add_argument("--backend", default="transformers", choices=["transformers", "vllm", "sglang", "trtllm"])
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    return parser


def _app_flags(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    kw = {"default": argparse.SUPPRESS} if top_level else {}
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)", **({"default": "127.0.0.1"} | kw))
    parser.add_argument("--port", type=int, help="port (default 7860)", **({"default": 7860} | kw))
    parser.add_argument("--auth", help="user:password, or a file with one user:password per line; "
                        "required when binding a non-loopback address", **({"default": None} | kw))


def main(argv: list[str] | None = None) -> int:
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

            return cmd_serve(args.checkpoint, workdir, backend=args.backend, host=args.host, port=args.port)
        from ui.app import launch_app

        return launch_app(workdir, host=getattr(args, "host", "127.0.0.1"), port=getattr(args, "port", 7860),
                          auth=getattr(args, "auth", None))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The CLI as README writes it (issue 17, items 4, 6, 7): flags on either side of the command, `status` and its JSON,
short errors for bad flags, a clear message under a Python without the packages, README's commands, a second app.
Real `launch.py` processes on a real SQLite workspace; runs are queued with no engine, so nothing trains."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import launch
from tests.helpers import REPO, launch as launch_process

README = (REPO / "README.md").read_text()


@pytest.fixture(scope="module")
def queued_run(tmp_path_factory) -> tuple[Path, str]:
    """A workspace with one queued smoke run (no engine is started: its jobs stay queued)."""
    from engine.runs import load_and_validate
    from engine.runtime.pipeline import enqueue
    from storage import Store

    workdir = tmp_path_factory.mktemp("ws")
    run_id = enqueue(Store(workdir / "studio.db"), load_and_validate(str(REPO / "assets/recipes/smoke.yaml"), {}),
                     workdir)
    return workdir, run_id


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = launch.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _required_positionals(sub: argparse.ArgumentParser) -> list[str]:
    return ["X" for a in sub._actions if not a.option_strings and a.nargs is None]


@pytest.mark.parametrize("command", list(_subcommands()))
def test_workdir_before_or_after_every_command(command):
    args = [command, *_required_positionals(_subcommands()[command])]
    before = launch.build_parser().parse_args(["--workdir", "/tmp/before", *args])
    after = launch.build_parser().parse_args([*args, "--workdir", "/tmp/after"])
    assert (before.command, before.workdir) == (command, "/tmp/before")
    assert (after.command, after.workdir) == (command, "/tmp/after")
    assert launch.build_parser().parse_args(args).workdir is None  # neither: main() picks the default


def test_app_and_serve_flags_before_the_command_are_kept():
    parse = launch.build_parser().parse_args
    assert parse(["--port", "7999", "app"]).port == 7999  # the subcommand's parse used to reset it to 7860
    assert parse(["app", "--port", "7999"]).port == 7999
    assert parse(["--host", "::1", "serve", "ckpt"]).host == "::1"
    assert not hasattr(parse(["serve", "ckpt"]), "port")  # main() applies serve's default, 8000


def test_status_with_workdir_after_the_command(queued_run):
    workdir, run_id = queued_run
    for argv in (["status", "--workdir", str(workdir)], ["--workdir", str(workdir), "status"]):
        proc = launch_process(argv, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split()[:3] == [run_id, "queued", "smoke"], proc.stdout


def test_status_json_is_json_only(queued_run):
    workdir, run_id = queued_run
    runs = json.loads(launch_process(["status", "--json", "--workdir", str(workdir)], timeout=120).stdout)
    assert [r["id"] for r in runs] == [run_id]
    one = json.loads(launch_process(["status", run_id, "--json", "--workdir", str(workdir)], timeout=120).stdout)
    assert one["run"]["id"] == run_id and one["run"]["status"] == "queued"
    assert {j["status"] for j in one["jobs"]} == {"queued"} and len(one["jobs"]) > 3
    assert one["results"] == {"run_id": run_id, "rows": [], "exports": {}}


def test_status_of_a_run_starts_with_its_header(queued_run):
    workdir, run_id = queued_run
    from storage import Store

    run = Store(workdir / "studio.db").get_run(run_id)
    proc = launch_process(["status", run_id, "--workdir", str(workdir)], timeout=120)
    header = proc.stdout.splitlines()[:2]
    assert header[0].split() == ["run", run_id, "smoke", "queued"], proc.stdout
    assert re.fullmatch(r"created 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d   run dir: (.+)", header[1]).group(1) == run["run_dir"]


def test_bad_flag_value_gets_a_short_error_naming_the_flag(tmp_path):
    proc = launch_process(["--workdir", str(tmp_path / "ws"), "run", "assets/recipes/smoke.yaml",
                           "--sft.learning_rate", "abc"], timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["launch.py run: error: argument --sft.learning_rate: invalid float value: 'abc'",
                                        "(see: launch.py run --help)"]
    assert not (tmp_path / "ws").exists()


def test_help_shows_readable_metavars():
    text = launch_process(["run", "--help"], timeout=120).stdout
    assert "SET__" not in text and "set__" not in text
    assert "--sft.learning_rate FLOAT" in text and "--sft.max_steps INT" in text
    assert "--sft.lora {true,false}" in text and "--ptq.formats [{mxfp4,nvfp4,nvfp4_w4a4} ...]" in text


def test_a_python_without_the_packages_gets_told_what_to_run(tmp_path):
    # -S: no site-packages, as a system python that never saw `make setup`.
    proc = subprocess.run([sys.executable, "-S", "launch.py", "status"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "lacks the studio's packages" in proc.stderr and "`.venv/bin/python launch.py" in proc.stderr


def test_cancel_of_never_started_jobs_prints_no_missing_log(tmp_path, capsys):
    from cli.commands import finish
    from engine.runs import load_and_validate
    from engine.runtime.pipeline import enqueue
    from storage import Store

    store = Store(tmp_path / "studio.db")
    run_id = enqueue(store, load_and_validate(str(REPO / "assets/recipes/smoke.yaml"), {}), tmp_path)
    proc = launch_process(["cancel", run_id, "--workdir", str(tmp_path)], timeout=120)
    assert proc.returncode == 0 and "None" not in proc.stdout, proc.stdout
    assert finish(store, run_id, 1.0) == 1
    err = capsys.readouterr().err
    assert "cancelled by the user before it started" in err and "None" not in err and "log:" not in err


# ---- README's commands, as written ------------------------------------------------------------------------------

def _readme_commands() -> list[str]:
    blocks = re.findall(r"```\n(.*?)```", README, flags=re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    return [line.split("#")[0].strip() for line in lines if "launch.py" in line and "─" not in line]  # not the diagram


def test_readme_runs_launch_py_one_way_with_the_venv_python():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^VENV\s*\?=\s*\.venv$", makefile, flags=re.M)  # what `make setup` creates
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    inline = [c for c in re.findall(r"`([^`\n]*launch\.py[^`\n]*)`", prose) if c != "launch.py"]  # not the file name
    commands = _readme_commands()
    assert len(commands) >= 4 and len(inline) >= 3
    for command in commands + inline:
        assert command.startswith(".venv/bin/python launch.py"), command
    assert not re.search(r"(?<![/\w])python launch\.py", README.replace(".venv/bin/python launch.py", ""))


def test_readme_commands_parse():
    """Each headless command of README's block is accepted by launch.py's parser (alternatives split at '|')."""
    parser = launch.build_parser()
    for command in _readme_commands():
        first, *alternatives = command.removeprefix(".venv/bin/python launch.py").split("|")
        words = shlex.split(first)
        for argv in [words, *[shlex.split(a) for a in alternatives]]:
            argv = [w for w in argv if not (w.startswith("[") and w.endswith("]"))]  # optional parts: leave out
            argv = ["X" if w.isupper() and "_" in w else w for w in argv]  # RUN_ID etc.
            if argv and argv[0] not in _subcommands():
                argv = [words[0], *argv]  # "status ... | resume RUN_ID": a new command each side of '|'
            parser.parse_args(argv)


# ---- a second app on the same port --------------------------------------------------------------------------------

@pytest.mark.slow
def test_second_app_says_already_running(tmp_path):
    from tests.browser_app import _wait_http, stop_app
    from engine.serving import server_process

    port = server_process.free_port()
    app = subprocess.Popen([sys.executable, "launch.py", "--workdir", str(tmp_path), "--port", str(port)], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/", app, timeout=180)
        second = launch_process(["--workdir", str(tmp_path), "--port", str(port)], timeout=120)
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip() == f"already running at http://127.0.0.1:{port}" and second.stderr == ""
    finally:
        stop_app(app, tmp_path)


def test_port_held_by_another_program(tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = launch_process(["--workdir", str(tmp_path / "ws"), "--port", str(port)], timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: port {port} on 127.0.0.1 is in use by another program; stop it or pick "
                                   "another port with --port N")

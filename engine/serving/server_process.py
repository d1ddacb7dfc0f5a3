"""Serve a checkpoint with an OpenAI-compatible server, as a detached process the workspace keeps track of.

    plan_server(model_path, backend, host, port, options) -> Plan   the exact command + what the format needs here
    start_server(store, model_path, backend=..., ...) -> dict       start, record, wait for /health, mark running
    refresh_server(store, id) / stop_server(store, id) / stop_all_servers(store) / reconcile_servers(store)
    cmd_serve(checkpoint, workdir, backend=, host=, port=)          `python launch.py serve` (foreground, Ctrl-C)

Servers run in their own session (process group) with stdout+stderr appended to workspace/servers/<name>/server.log,
so closing the app never blocks or kills them; stopping kills the whole group. Rows in the `servers` table go
starting -> running | failed, then stopped (by us) or gone (found dead, e.g. after a reboot).

What `transformers serve` (5.24) does with our checkpoints, measured on the tiny gpt-oss (tests/test_serving.py):
- `transformers serve PATH` preloads PATH before /health answers and pins every request to it (requests must name
  PATH or nothing); `--device cpu` and `--dtype auto` (= the export's bf16) are explicit flags.
- An MXFP4 export loads on CPU: without Triton >= 3.5 and `use_kernels` (the `kernels` package) the Mxfp4
  quantizer falls back to dequantizing the experts to bf16 itself (two warnings in the server log), i.e. what
  `Mxfp4Config(dequantize=True)` does. Start-up of the tiny model: ~11-25 s on 2 CPU cores, mostly imports.
  The served logits match the in-process dequantized model's (test_served_logits_match_in_process).
- transformers cannot load NVFP4 (modelopt) checkpoints: a weight-only export is served through its dequantized
  copy (engine/fp4/dequantize_nvfp4.py; exact fake-quant weights); W4A4 is refused with a reason (formats.py).
- Chat completions render messages with the checkpoint's own chat template (our harmony template), but gpt_oss has
  no built-in response template, so replies arrive decoded with skip_special_tokens=True:
  "analysis{thinking}assistantfinal{answer}". We therefore serve a view of the checkpoint whose tokenizer carries
  harmony's `response_template` (engine/serving/harmony_view.py): the server then streams the analysis channel as
  `reasoning_content` and the final channel as `content`, both token by token. engine.serving.chat still parses the
  flattened and the raw-marker forms, for servers (or checkpoints) without it.
- No logprobs: `logprobs`/`top_logprobs` are accepted and ignored (as are `reasoning_effort` and `stream_options`;
  usage comes with the last chunk anyway). The only logits it exposes are through /v1/systemone (a softmax over
  the next-token logits of option labels), which is what the logits test compares.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from engine.fp4 import dequantize_nvfp4
from engine.serving.backends import BACKENDS, ServerBackend, get_backend
from engine.serving.formats import CheckpointInfo, Finding, check_compatibility, detect_gpus, inspect_checkpoint
from engine.serving.harmony_view import served_dir

LIVE = ("starting", "running")
KILL_GRACE_S = 10.0
START_TIMEOUT_S = 600.0


class ServingError(RuntimeError):
    """A server that cannot start here, said in a sentence (with the command to run elsewhere when that helps)."""


@dataclass
class Plan:
    backend: ServerBackend
    model_path: str
    host: str
    port: int
    options: object
    command: str  # portable: what to run on another machine
    installed: bool
    info: CheckpointInfo
    findings: list[Finding]
    served_path: str = ""  # what the server loads: model_path, or the dequantized copy of an NVFP4 export


    @property
    def errors(self) -> list[str]:
        return [f.text for f in self.findings if f.level == "error"]


def plan_server(model_path: str | Path, backend: str = "transformers", host: str = "127.0.0.1", port: int | None = None,
                options: dict | None = None) -> Plan:
    be = get_backend(backend)
    parsed = be.parse_options(options)
    if be.name == "transformers" and parsed.device == "auto" and not detect_gpus():
        parsed = parsed.model_copy(update={"device": "cpu"})  # say it: the command shown is the command run
    info = inspect_checkpoint(model_path)
    findings = check_compatibility(be, info)
    if not be.installed():
        findings.insert(0, Finding("error", f"{be.label} is not installed here (pip install "
                                            f"'gpt-oss-qat-studio[{be.name}]'); run the command below where it is."))
    shown_port = port or 8000
    served = str(model_path)
    command = be.shell_command(model_path, host, shown_port, parsed)
    if needs_dequantized_copy(be, info):  # the copy is written first; elsewhere, by the module's own command
        served = str(dequantize_nvfp4.default_dir(model_path))
        command = (f"{shlex.join(['python', '-m', 'engine.fp4.dequantize_nvfp4', str(model_path)])} && "
                   f"{be.shell_command(served, host, shown_port, parsed)}")
    return Plan(be, str(model_path), host, shown_port, parsed, command, be.installed(), info, findings, served)


def needs_dequantized_copy(backend: ServerBackend, info: CheckpointInfo) -> bool:
    return backend.name == "transformers" and info.format == "nvfp4"


def start_server(store, model_path: str | Path, backend: str = "transformers", host: str = "127.0.0.1",
                 port: int | None = None, run_id: str | None = None, options: dict | None = None,
                 allow_network: bool = False, wait: bool = True, timeout: float = START_TIMEOUT_S) -> dict:
    """Start a server for `model_path`; returns its row (plus base_url). Raises ServingError when it cannot start
    (not installed, wrong format for this machine, port taken, died or never healthy: with the log tail)."""
    if not is_loopback(host) and not allow_network:
        raise ServingError(f"binding {host} exposes the server (no authentication) to the network; "
                           "pass allow_network=True (--host is explicit on the CLI) to do it anyway")
    plan = plan_server(model_path, backend, host, port, options)
    if plan.errors:
        raise ServingError("\n".join(plan.errors) + f"\ncommand: {plan.command}")
    port = port or free_port(host)
    if not port_is_free(host, port):
        raise ServingError(f"port {port} on {host} is already in use; choose another (or leave it empty)")
    if needs_dequantized_copy(plan.backend, plan.info):
        try:
            dequantize_nvfp4.dequantized_copy(model_path, plan.served_path)
        except (OSError, ValueError) as exc:
            raise ServingError(f"could not write the dequantized copy of {model_path} at {plan.served_path}: "
                               f"{exc}") from exc
    server_dir = _new_server_dir(store, plan.backend.name, port)
    served = served_dir(plan.served_path, server_dir) if plan.backend.name == "transformers" else plan.served_path
    argv = plan.backend.launch_argv(plan.backend.command(served, host, port, plan.options))
    log = server_dir / "server.log"
    try:
        proc = _spawn(argv, log, local_model=Path(model_path).is_dir())
    except OSError as exc:  # e.g. the program vanished since installed() looked
        raise ServingError(f"could not run {argv[0]}: {exc}") from exc
    try:
        server_id = store.add_server(run_id=run_id, model_path=str(model_path), backend=plan.backend.name, host=host,
                                     port=port, pid=proc.pid, command=shlex.join(argv), status="starting",
                                     log_path=str(log))
    except BaseException:  # an unrecorded server would run on unseen: take it down again
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if wait:
        wait_until_healthy(store, server_id, timeout)
    return get_server(store, server_id)


def wait_until_healthy(store, server_id: int, timeout: float = START_TIMEOUT_S, poll_s: float = 0.5) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = refresh_server(store, server_id)
        if row["status"] == "running":
            return row
        if row["status"] != "starting":
            raise ServingError(f"the {row['backend']} server exited while starting; its log ends with:\n"
                               f"{log_tail(row)}")
        time.sleep(poll_s)
    stop_server(store, server_id, status="failed")
    raise ServingError(f"the {get_server(store, server_id)['backend']} server did not answer its health check within "
                       f"{timeout:.0f} s; stopped it. Its log ends with:\n{log_tail(get_server(store, server_id))}")


def refresh_server(store, server_id: int, dead: str | None = None) -> dict:
    """Re-check a live row: starting -> running once healthy; when its process has died, -> `dead` (default:
    failed if it never got healthy, gone if it was running)."""
    row = get_server(store, server_id)
    if row["status"] not in LIVE:
        return row
    if not server_alive(row):
        status = dead or ("failed" if row["status"] == "starting" else "gone")
        store.update_server(server_id, status=status, stopped_at=time.time())
    elif row["status"] == "starting" and is_healthy(row):
        store.update_server(server_id, status="running")
    return get_server(store, server_id)


def stop_server(store, server_id: int, grace: float = KILL_GRACE_S, status: str = "stopped") -> dict:
    """Kill the server's process group (TERM, then KILL after `grace`), wait until none of it is left, mark it."""
    row = get_server(store, server_id)
    if row["pid"] and server_alive(row):
        _kill_group(row["pid"], signal.SIGTERM)
        if not _wait_group_gone(row["pid"], grace):
            _kill_group(row["pid"], signal.SIGKILL)
            _wait_group_gone(row["pid"], 5.0)
    _reap(row["pid"])
    if row["status"] in LIVE or status != "stopped":
        store.update_server(server_id, status=status, stopped_at=time.time())
    return get_server(store, server_id)


def stop_all_servers(store) -> list[dict]:
    return [stop_server(store, row["id"]) for row in store.list_servers() if row["status"] in LIVE]


def reconcile_servers(store) -> list[dict]:
    """On app start: rows whose process is gone are marked 'gone'; live ones are returned (and re-checked)."""
    rows = [refresh_server(store, r["id"], dead="gone") for r in store.list_servers() if r["status"] in LIVE]
    return [row for row in rows if row["status"] in LIVE]


# ------------------------------------------------------------------------------------------------ rows and urls


def get_server(store, server_id: int) -> dict:
    for row in store.list_servers():
        if row["id"] == server_id:
            return with_urls(row)
    raise ServingError(f"no server {server_id}")


def with_urls(row: dict) -> dict:
    backend = BACKENDS.get(row["backend"])
    if backend is not None and row.get("port"):
        row = {**row, "base_url": backend.base_url(row["host"], row["port"]),
               "health_url": backend.health_url(row["host"], row["port"])}
    return row


def is_healthy(row: dict, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(row["health_url"], timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def log_tail(row: dict, lines: int = 40) -> str:
    path = row.get("log_path")
    if not path or not Path(path).exists():
        return "(no log)"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64_000))
        return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------------ processes

_children: dict[int, subprocess.Popen] = {}  # servers this process started: reaped here, or they linger as zombies


def _spawn(argv: list[str], log: Path, local_model: bool) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if local_model:
        env["HF_HUB_OFFLINE"] = "1"  # a local directory needs nothing from the Hub; offline machines stall otherwise
    with open(log, "ab") as out:
        out.write(f"$ {shlex.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    _children[proc.pid] = proc
    return proc


def server_alive(row: dict) -> bool:
    """The row's process still runs and is still the process we started (pids get reused after a reboot)."""
    pid = row.get("pid")
    if not pid:
        return False
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    cmdline = _cmdline(pid)
    if cmdline is None:
        return False
    return cmdline == [] or _same_command(cmdline, shlex.split(row.get("command") or ""))  # []: unreadable


def _same_command(cmdline: list[str], argv: list[str]) -> bool:
    """A console script runs as `python /path/script args`: compare the arguments and the program's name."""
    if not argv or len(cmdline) < len(argv):
        return False
    head = cmdline[: len(cmdline) - len(argv) + 1]
    return cmdline[len(head):] == argv[1:] and any(Path(c).name == Path(argv[0]).name for c in head)


def _cmdline(pid: int) -> list[str] | None:
    """argv of a live pid, [] when it lives but cannot be read, None when it is gone (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return None if Path("/proc/self").exists() else ([] if _pid_exists(pid) else None)
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0")[:-1]] if raw else None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is left (zombies of our own children count until reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)  # started with start_new_session: the group id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pgid)
        if not group_alive(pgid):
            return True
        time.sleep(0.1)
    return False


def _reap(pid: int | None) -> None:
    child = _children.get(pid) if pid else None
    if child is not None and child.poll() is not None:
        _children.pop(pid, None)


# ------------------------------------------------------------------------------------------------ helpers


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _new_server_dir(store, backend: str, port: int) -> Path:
    root = Path(store.path).parent / "servers"
    path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{backend}-{port}"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------------ CLI


def cmd_serve(checkpoint: str, workdir: Path, backend: str = "transformers", host: str = "127.0.0.1",
              port: int = 8000) -> int:
    """`python launch.py serve CHECKPOINT`: start, print the URL and command, stay until Ctrl-C, then stop it."""
    from storage import Store

    from engine.runtime import workspace

    plan = plan_server(checkpoint, backend, host, port)
    if plan.errors:
        print("cannot serve here:\n  " + "\n  ".join(plan.errors) + f"\ncommand: {plan.command}", file=sys.stderr)
        return 2
    store = Store(workspace.db_path(Path(workdir)))
    print(f"starting {plan.backend.label} for {checkpoint} ...", flush=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops the server too, like Ctrl-C
    row = None
    try:
        row = start_server(store, checkpoint, backend, host, port, allow_network=True)
        print(f"serving at {row['base_url']}  (OpenAI-compatible; health: {row['health_url']})\n"
              f"command: {row['command']}\nlog: {row['log_path']}\nCtrl-C stops the server.", flush=True)
        while server_alive(row):
            time.sleep(1.0)
        print(f"the server exited; its log ends with:\n{log_tail(row)}", file=sys.stderr)
        return 1
    except ServingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopping the server ...", flush=True)
        return 0
    finally:
        for live in store.list_servers():
            if live["status"] in LIVE and (row is None or live["id"] == row["id"]) and live["pid"] in _children:
                stop_server(store, live["id"])


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt

"""Rows that are not about runs: telemetry samples, engine heartbeats, model servers (a mixin of Store)."""

from __future__ import annotations

import time
from typing import Any


class ServiceRows:
    """Uses Store's plumbing (_insert, _update, _select, _where, _write)."""

    def add_telemetry(self, sample: dict, run_id: str | None = None, time: float | None = None) -> None:
        self._insert("telemetry", {"run_id": run_id, "time": _now() if time is None else time, "sample": sample})

    def telemetry(self, run_id: str | None = None, since: float | None = None, limit: int = 5000) -> list[dict]:
        """The newest `limit` samples, returned oldest first (ready to plot)."""
        where, params = self._where(run_id=run_id)
        if since is not None:
            where.append("time > ?")
            params.append(since)
        return self._select("telemetry", where, params, "time DESC, id DESC", limit)[::-1]

    def prune_telemetry(self, before: float) -> int:
        """Drop samples older than `before`: at one sample a second the table grows ~86k rows a day."""
        with self._write() as db:
            return db.execute("DELETE FROM telemetry WHERE time < ?", [before]).rowcount

    def register_engine(self, pid: int, host: str) -> int:
        now = time.time()
        return self._insert("engines", {"pid": pid, "host": host, "started_at": now, "heartbeat_at": now,
                                        "status": "running"})

    def engine_heartbeat(self, engine_id: int) -> None:
        self._update("engines", engine_id, {"heartbeat_at": time.time()})

    def stop_engine(self, engine_id: int) -> None:
        self._update("engines", engine_id, {"status": "stopped", "stopped_at": time.time()})

    def live_engines(self, max_age_s: float = 10.0) -> list[dict]:
        """Engines that say they run and have beaten recently (a killed engine stops beating, so it drops out)."""
        return self._select("engines", ["status = 'running'", "heartbeat_at >= ?"], [time.time() - max_age_s], "id")

    def mark_engine_dead(self, engine_id: int) -> None:
        """An engine row whose process is gone (killed, or the machine rebooted): it stopped at its last beat."""
        with self._write():
            rows = self._select("engines", ["id = ?"], [engine_id], "id")
            if rows and rows[0]["status"] == "running":
                self._update("engines", engine_id, {"status": "dead", "stopped_at": rows[0]["heartbeat_at"]})

    def list_engines(self) -> list[dict]:
        return self._select("engines", [], [], "id")

    def running_engines(self) -> list[dict]:
        """Every engine row that says it runs, fresh heartbeat or not (see live_engines)."""
        return self._select("engines", ["status = 'running'"], [], "id")

    def app_heartbeat(self, app_id: int | None, pid: int, host: str) -> int:
        """The web app says it is alive (every APP_HEARTBEAT_S); returns its row id for the next beat."""
        now = time.time()
        if app_id is None:
            return self._insert("apps", {"pid": pid, "host": host, "started_at": now, "heartbeat_at": now})
        self._update("apps", app_id, {"heartbeat_at": now})
        return app_id

    def last_app_seen(self) -> float | None:
        """When any app last beat (None: never)."""
        rows = self._select("apps", [], [], "heartbeat_at DESC", 1)
        return rows[0]["heartbeat_at"] if rows else None

    def add_server(self, **fields: Any) -> int:
        return self._insert("servers", {"status": "starting", "started_at": time.time(), **fields})

    def update_server(self, server_id: int, **fields: Any) -> None:
        self._update("servers", server_id, fields)

    def list_servers(self, status: str | None = None) -> list[dict]:
        return self._select("servers", *self._where(status=status), "id")


def _now() -> float:
    return time.time()

"""Machine telemetry: GPUs through NVML (nvidia-ml-py), CPU / RAM / disk through psutil. Pure data, no UI.

    sample(workdir) -> dict          one snapshot (the app's header shows it every second)
    compact(snapshot) -> dict        the few numbers worth keeping in storage
    record_telemetry(store, run_id)  store a compact snapshot for a run (its telemetry history)
    Recorder(store)                  a thread that records every ~10 s for each running run

A missing driver or GPU is normal (CPU demo machines): the snapshot then says so in `gpu_note` and carries CPU/RAM
only. A reading a driver does not support (NVMLError_NotSupported, e.g. power on some boards) becomes None, shown
as "n/a"; no NVML error ever escapes sample().
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import psutil

NO_GPU_NOTE = "No NVIDIA GPU on this machine"
# Why NVML found none, in words (pynvml's error class names mean nothing to most users).
NO_GPU_REASONS = {
    "LibraryNotFound": "no NVIDIA driver installed",
    "DriverNotLoaded": "the NVIDIA driver is not loaded",
    "NoPermission": "no permission to read the GPUs",
    "ModuleNotFoundError": "nvidia-ml-py is not installed",
    "ImportError": "nvidia-ml-py is not installed",
}
GB = 1024**3  # binary: the '_gb' fields are GiB, and the UI labels them so

_nvml_lock = threading.Lock()
_nvml_state: dict = {"ready": None, "note": None}  # ready: None = not tried yet, True/False afterwards


def _nvml():
    """pynvml, initialised once per process; None (with the reason in _nvml_state) when there is no usable GPU."""
    with _nvml_lock:
        if _nvml_state["ready"] is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_state["ready"] = pynvml.nvmlDeviceGetCount() > 0
                _nvml_state["module"] = pynvml
                if not _nvml_state["ready"]:
                    _nvml_state["note"] = f"{NO_GPU_NOTE} (the NVIDIA driver sees none)"
            except Exception as exc:  # noqa: BLE001 - library missing, driver not loaded, ...: all mean "no GPU"
                _nvml_state["ready"] = False
                _nvml_state["note"] = no_gpu_note(exc)
        return _nvml_state.get("module") if _nvml_state["ready"] else None


def no_gpu_note(exc: BaseException) -> str:
    """'No NVIDIA GPU on this machine (no NVIDIA driver installed)': one plain sentence for the header and forms."""
    name = type(exc).__name__.removeprefix("NVMLError_")
    return f"{NO_GPU_NOTE} ({NO_GPU_REASONS.get(name, f'the NVIDIA driver could not be read: {name}')})"


def _read(call, *args, scale: float = 1.0):
    """One NVML reading; None when the driver lacks it (NotSupported, NoPermission, ...) or the GPU fails it."""
    try:
        value = call(*args)
    except Exception:  # noqa: BLE001 - each NVMLError_* subclass means "this reading is not available here"
        return None
    if scale != 1.0 and isinstance(value, (int, float)):
        return value * scale  # counts (device count, pids) stay ints: only scaled readings become floats
    return value


def _gpu(nvml, index: int) -> dict:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    util = _read(nvml.nvmlDeviceGetUtilizationRates, handle)
    mem = _read(nvml.nvmlDeviceGetMemoryInfo, handle)
    name = _read(nvml.nvmlDeviceGetName, handle)
    return {
        "index": index,
        "name": name.decode() if isinstance(name, bytes) else name,
        "util_percent": getattr(util, "gpu", None),
        "mem_used_gb": mem.used / GB if mem else None,
        "mem_total_gb": mem.total / GB if mem else None,
        "power_w": _read(nvml.nvmlDeviceGetPowerUsage, handle, scale=1e-3),  # NVML reports milliwatts
        "power_limit_w": _read(nvml.nvmlDeviceGetEnforcedPowerLimit, handle, scale=1e-3),
        "temp_c": _read(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        "sm_clock_mhz": _read(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
        "capability": _read(nvml.nvmlDeviceGetCudaComputeCapability, handle),  # (9, 0) on an H100
        "processes": _gpu_processes(nvml, handle),
    }


def _gpu_processes(nvml, handle) -> list[dict]:
    seen: dict[int, dict] = {}
    for call in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        for proc in _read(call, handle) or []:
            used = getattr(proc, "usedGpuMemory", None)
            seen[proc.pid] = {"pid": proc.pid, "name": _process_name(proc.pid),
                              "mem_gb": used / GB if isinstance(used, int) else None}
    return list(seen.values())


def _process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):  # another container's process, or it just ended
        return "?"


def gpus() -> tuple[list[dict], str | None]:
    """(one dict per GPU, a note when there are none)."""
    nvml = _nvml()
    if nvml is None:
        return [], _nvml_state["note"]
    out = []
    for index in range(_read(nvml.nvmlDeviceGetCount) or 0):
        try:
            out.append(_gpu(nvml, index))
        except Exception as exc:  # noqa: BLE001 - a GPU that fell off the bus must not hide the others
            out.append({"index": index, "name": f"unreadable ({type(exc).__name__})", "processes": []})
    return out, None


def sample(workdir: Path | str | None = None) -> dict:
    """One snapshot. `workdir`: the disk to report (the workspace's); default the current directory."""
    mem = psutil.virtual_memory()
    disk = _disk(Path(workdir) if workdir else Path.cwd())
    gpu_list, note = gpus()
    return {
        "time": time.time(),
        "cpu_percent": psutil.cpu_percent(interval=None),  # since the previous call: no blocking sleep here
        "cpu_count": psutil.cpu_count(),
        "ram_used_gb": (mem.total - mem.available) / GB,
        "ram_total_gb": mem.total / GB,
        "disk_used_gb": disk[0],
        "disk_total_gb": disk[1],
        "gpus": gpu_list,
        "gpu_note": note,
    }


def _disk(path: Path) -> tuple[float | None, float | None]:
    while not path.exists() and path != path.parent:  # a workspace not created yet: its nearest parent's disk
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None, None
    return usage.used / GB, usage.total / GB


def compact(snapshot: dict) -> dict:
    """The numbers the run's telemetry chart plots (a stored sample stays ~200 bytes)."""
    out = {"cpu_percent": snapshot.get("cpu_percent"), "ram_used_gb": _round(snapshot.get("ram_used_gb"))}
    for gpu in snapshot.get("gpus") or []:
        i = gpu["index"]
        out[f"gpu{i}_util_percent"] = gpu.get("util_percent")
        out[f"gpu{i}_mem_used_gb"] = _round(gpu.get("mem_used_gb"))
        out[f"gpu{i}_power_w"] = _round(gpu.get("power_w"))
    return out


def _round(value, digits: int = 2):
    return None if value is None else round(value, digits)


def record_telemetry(store, run_id: str | None, snapshot: dict | None = None, workdir: Path | None = None) -> dict:
    """Store a compact sample for `run_id` (None: machine-wide); returns what was stored."""
    data = compact(snapshot if snapshot is not None else sample(workdir))
    store.add_telemetry(data, run_id=run_id)
    return data


def record_running(store, workdir: Path | None = None) -> list[str]:
    """One sample for every run that is running now (one snapshot shared by all); returns their ids."""
    running = [run["id"] for run in store.list_runs() if run["status"] == "running"]
    if running:
        snapshot = sample(workdir)
        for run_id in running:
            record_telemetry(store, run_id, snapshot)
    return running


class Recorder(threading.Thread):
    """Records running runs' telemetry every `every_s` seconds, downsampled from the 1 s header refresh so a
    finished run keeps a readable history without the table growing 86k rows a day per run."""

    def __init__(self, store, workdir: Path | None = None, every_s: float = 10.0):
        super().__init__(name="telemetry-recorder", daemon=True)
        self.store, self.workdir, self.every_s = store, workdir, every_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            try:
                record_running(self.store, self.workdir)
            except Exception:  # noqa: BLE001 - a locked or vanished DB must not kill the thread; try again later
                continue

    def stop(self) -> None:
        self._stop_event.set()


psutil.cpu_percent(interval=None)  # prime the counter so the first real sample is meaningful, not 0.0


def gpu_release_note(pids: set[int], gpu_indices: list[int], timeout: float = 10.0) -> str:
    """After a job was killed: do any of its processes still hold memory on its GPUs (NVML)? Waits up to `timeout`
    for the driver to let go, then says what it found, so a cancel reports released memory instead of assuming it."""
    if not gpu_indices:
        return ""
    deadline = time.time() + timeout
    while True:
        found, note = gpus()
        if note:
            return f"GPU memory release not checked ({note})"
        holders = [(g["index"], p["pid"]) for g in found if g["index"] in gpu_indices for p in g["processes"]
                   if p["pid"] in pids]
        if not holders:
            return f"GPU memory released: no process of this job on cuda:{','.join(map(str, gpu_indices))} (NVML)"
        if time.time() > deadline:
            held = ", ".join(f"pid {pid} on cuda:{index}" for index, pid in holders)
            return f"GPU memory still held after the cancel: {held}"
        time.sleep(0.5)

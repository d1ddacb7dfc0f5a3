"""Plain-language advice for the failures users hit most, shown in the UI next to the error itself."""

from __future__ import annotations

import errno

_RULES: list[tuple[tuple[str, ...], str]] = [
    (("CUDA out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED"),
     "The GPU ran out of memory. Lower per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
     "effective batch), turn on gradient_checkpointing, train with LoRA, or give the run more GPUs."),
    (("No space left on device",),
     "The disk is full. Free space in the workspace (delete old runs in the History tab) or point --workdir elsewhere."),
    (("modelopt_cuda_ext", "nvcc", "CUDA_HOME", "ninja", "Error building extension"),
     "modelopt could not build its CUDA extension. Install the CUDA toolkit matching your PyTorch (nvcc on PATH, "
     "CUDA_HOME set) and ninja, or set hardware.fp4_backend to 'torch'."),
    (("loss became nan", "loss became inf", "FloatingPointError"),
     "The loss stopped being a number. Lower the learning rate, check for empty or broken examples, or use bf16."),
    (("DataError",), "The dataset has problems listed above; fix them and start the run again."),
]


def explain(exc: BaseException, detail: str = "") -> str:
    """One line for the job's `error`: the exception, plus advice when we recognise the failure."""
    text = f"{type(exc).__name__}: {exc}".strip()
    first_line = text.splitlines()[0][:500] if text else type(exc).__name__
    haystack = f"{text}\n{detail}"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        haystack += "\nNo space left on device"
    for needles, advice in _RULES:
        if any(n in haystack for n in needles):
            return f"{first_line} -- {advice}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C or SIGINT)"
    return first_line


def explain_exit(returncode: int, log_tail: str) -> str:
    """For a child that died without reporting (killed by a signal, the OOM killer, ...)."""
    if returncode < 0:
        import signal

        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        if name == "SIGKILL":
            return ("the job's process was killed (SIGKILL): by the system's out-of-memory killer if you did not "
                    "cancel it; resume it to continue from its last checkpoint")
        return f"the job's process was stopped by {name}; resume it to continue from its last checkpoint"
    for needles, advice in _RULES:
        if any(n in log_tail for n in needles):
            return f"exited with status {returncode} -- {advice}"
    return f"exited with status {returncode}; see the log lines below"

"""The failure advice of engine/runtime/failure_hints.py on real failures: each exception is raised by the code that
raises it in a job (torch's extension builder, a write to a full device, the trainer's NaN check, the dataset loader)
or, where this CPU machine cannot produce it (CUDA OOM), is torch's own exception class with torch's message. The
advice is never written by the test: emptying or breaking a rule fails here."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.runtime.failure_hints import explain, explain_exit

FIXTURES = Path(__file__).parent / "fixtures"


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - we want whatever the real code raises
        return exc
    raise AssertionError("expected a failure")


def test_cuda_out_of_memory():
    import torch

    # The text of c10's CUDACachingAllocator for a failed allocation (torch 2.x), in torch's own exception class.
    exc = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
        "is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use.")
    message = explain(exc)
    assert message.startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert "-- The GPU ran out of memory. Lower per_device_train_batch_size" in message


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_disk_full_from_a_real_write():
    def write():
        with open("/dev/full", "w") as f:
            f.write("x")

    exc = _raised(write)
    assert isinstance(exc, OSError)
    assert "-- The disk is full. Free space in the workspace" in explain(exc)
    # errno alone (a message that does not say it) is recognised too
    assert "The disk is full" in explain(OSError(exc.errno, "write failed"))


def test_missing_cuda_toolkit_for_modelopt_extension(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)  # a machine without the CUDA toolkit
    exc = _raised(lambda: cpp_extension._join_cuda_home("bin", "nvcc"))
    assert "CUDA_HOME" in str(exc)
    assert "-- modelopt could not build its CUDA extension. Install the CUDA toolkit" in explain(exc)


def test_nan_loss_from_the_trainer_callback():
    from engine.training.hf_trainer import StoreMetricsCallback

    ctx = SimpleNamespace(metrics=lambda step, **values: None, progress=lambda fraction, message: None)
    callback = StoreMetricsCallback(ctx, "SFT")
    state = SimpleNamespace(is_world_process_zero=True, num_input_tokens_seen=0, max_steps=10, global_step=3)
    exc = _raised(lambda: callback.on_log(None, state, None, logs={"loss": math.nan}))
    assert isinstance(exc, FloatingPointError)
    assert "-- The loss stopped being a number. Lower the learning rate" in explain(exc)


def test_bad_dataset():
    from engine.data.chat_data import load_chat_dataset

    exc = _raised(lambda: load_chat_dataset(str(FIXTURES / "bad_data" / "malformed.jsonl")))
    assert type(exc).__name__ == "DataError"
    assert explain(exc).endswith("-- The dataset has problems listed above; fix them and start the run again.")


def test_child_killed_or_exited_with_a_recognised_log():
    assert "out-of-memory killer" in explain_exit(-9, "")
    tail = "  File \"x.py\", line 1\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB.\n"
    assert explain_exit(1, tail) == ("exited with status 1 -- The GPU ran out of memory. Lower "
                                     "per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
                                     "effective batch), turn on gradient_checkpointing, train with LoRA, or give the "
                                     "run more GPUs.")


def test_unrecognised_failures_get_no_advice():
    assert explain(ValueError("shape mismatch (3, 4) vs (4, 3)")) == "ValueError: shape mismatch (3, 4) vs (4, 3)"
    assert explain_exit(3, "Traceback ...\nKeyError: 'x'\n") == "exited with status 3; see the log lines below"

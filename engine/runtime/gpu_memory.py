"""hardware.gpu_memory_limit_gib: run as if the card had less memory (a smaller card, or a card shared with another
process).

The job process caps torch's caching allocator with `torch.cuda.set_per_process_memory_fraction(limit / total)`
before it loads a model. The allocator then never holds more than the limit: when an allocation would cross it,
torch frees its cached blocks and retries, and raises OutOfMemoryError if that is not enough, exactly as it would on
a card of that size. Nothing above torch's allocator is covered: the CUDA context (about 0.5 GiB), NCCL's buffers and
memory a library takes with cudaMalloc directly add to the cap, as they would on the smaller card. The cap is
per process, so every job process sets it (engine/stages/job.py, every rank of a multi-GPU launch included).
What sizes itself by the card's free memory reads the cap too: evaluation's 'auto' batch
(engine/evaluation/evaluator.py usable_free_bytes) and "will it fit?" (engine/training/estimate.py available_gib).

Why torch's own cap and not an estimate or a check after the fact: jobs record torch's peak reserved memory
(engine/runtime/job_timing.py), but the reserved cache carries over between chained jobs and grows to whatever the
card has (125.9 GiB reserved for a 20b evaluation on the H200, 2026-12-03), so a run on a 141 GB card says nothing
about an 80 GB one. Under the cap the allocator must make do, so a run that succeeds under a 79 GiB cap (what an
H100 80GB reports) shows that it fits that card.
"""

from __future__ import annotations

import math

GIB = 1024**3
FIELD = "hardware.gpu_memory_limit_gib"


class GpuMemoryLimitError(ValueError):
    """The limit cannot be applied to this card (above its memory, or not positive)."""


def memory_fraction(limit_gib: float, total_bytes: int) -> float:
    """The fraction of a card of `total_bytes` that `limit_gib` GiB is: what set_per_process_memory_fraction takes."""
    if limit_gib <= 0:
        raise GpuMemoryLimitError(f"{FIELD}: {limit_gib} GiB; give a positive size in GiB, or leave it empty to use "
                                  "the whole card")
    if total_bytes <= 0:
        raise GpuMemoryLimitError(f"{FIELD}: the card reports {total_bytes} bytes of memory; cannot cap it")
    if limit_gib * GIB > total_bytes:
        raise GpuMemoryLimitError(over_card_message(limit_gib, total_bytes / GIB))
    return limit_gib * GIB / total_bytes


def over_card_message(limit_gib: float, total_gib: float, card: str = "the card") -> str:
    at_most = math.floor(total_gib * 10) / 10  # rounded down: a limit of the rounded-up size would fail again
    return (f"{FIELD}: {limit_gib:g} GiB is more than {card} has ({total_gib:.2f} GiB); lower it to at most "
            f"{at_most:g}, or leave it empty to use the whole card")


def limit_problem(limit_gib: float, cards: list[dict]) -> str | None:
    """Why `limit_gib` cannot apply to `cards` (NVML's view: dicts with index, name, mem_total_gb in GiB, as
    engine/runtime/telemetry.gpus() gives them), or None when every card has at least that much."""
    for card in cards:
        total = card.get("mem_total_gb")
        if total is not None and limit_gib > total:
            return over_card_message(limit_gib, total, f"GPU {card['index']} ({card.get('name') or 'unnamed'})")
    return None


def apply_limit(limit_gib: float | None, device) -> str | None:
    """Cap torch's allocator on `device` at `limit_gib` (no-op without a limit); returns the line to log.
    On CPU the limit is ignored (it caps GPU memory only). Raises GpuMemoryLimitError when the card is smaller."""
    if limit_gib is None:
        return None
    if device.type != "cuda":
        return f"{FIELD} = {limit_gib:g} GiB ignored: this job runs on {device.type}, the limit caps GPU memory only"
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = memory_fraction(limit_gib, total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return (f"GPU memory capped at {limit_gib:g} GiB ({FIELD}): {fraction:.4f} of cuda:{index} "
            f"({torch.cuda.get_device_name(index)}, {total / GIB:.1f} GiB) for torch's allocator in this process")

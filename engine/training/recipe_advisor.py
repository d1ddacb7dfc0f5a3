"""The recipe advisor: warnings (never blocks) about QAT settings that usually cost accuracy, each with its reason,
and the rule that says when QAT has done its job. Pure functions over plain values, so the UI, the CLI and tests
share them.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.recipe.configs import EMBEDDED_MODEL, Recipe

MIN_CALIB_EXAMPLES = 64
QAT_STEPS_RANGE = (500, 2000)  # for real models; the embedded tiny model needs far fewer
MAX_QAT_LR_FRACTION = 0.5  # QAT lr above half the SFT lr is not "well below" it (NVIDIA's recipe: exactly half)


@dataclass(frozen=True)
class Advice:
    title: str
    reason: str
    level: str = "warning"  # warning | info


def recipe_advice(recipe: Recipe, *, has_sft: bool | None = None, sft_lr: float | None = None,
                  sft_data: str | None = None, train_rows: int | None = None) -> list[Advice]:
    """Warnings for a recipe about to run QAT.

    has_sft / sft_lr / sft_data describe the SFT stage the QAT continues from when it is an existing run's (the QAT
    tab extends runs); by default they come from the recipe itself. train_rows: training-set size, when known.
    """
    if not recipe.qat.enabled:
        return []
    has_sft = recipe.sft.enabled if has_sft is None else has_sft
    sft_lr = recipe.sft.learning_rate if sft_lr is None else sft_lr
    out: list[Advice] = []
    if not has_sft:
        out.append(Advice(
            "QAT without a prior SFT stage",
            "QAT is meant to recover the accuracy that quantizing a fine-tuned model loses; starting from the base "
            "model mixes learning the task with adapting to FP4 at a small learning rate and ends markedly worse. "
            "Run SFT first (in BF16), then QAT from its weights."))
    elif recipe.qat.learning_rate > MAX_QAT_LR_FRACTION * sft_lr:
        ratio = sft_lr / recipe.qat.learning_rate
        out.append(Advice(
            f"QAT learning rate {recipe.qat.learning_rate:g} is not well below the SFT one ({sft_lr:g}, {ratio:.2g}x)",
            "QAT starts from converged SFT weights and only has to nudge them onto the FP4 grid; a learning rate "
            "close to SFT's undoes the fine-tuning instead. NVIDIA's recipe uses 1e-5 for QAT, half its full-SFT 2e-5."))
    calib = min(recipe.ptq.calib_size, train_rows) if train_rows else recipe.ptq.calib_size
    if calib < MIN_CALIB_EXAMPLES:
        out.append(Advice(
            f"calibration set of {calib} examples (< {MIN_CALIB_EXAMPLES})",
            "PTQ calibrates each quantizer's range (amax) on these examples and QAT starts from them; too few give "
            "noisy ranges that clip or waste FP4 levels. Use 128 or more training examples."))
    if sft_data is not None and sft_data != recipe.data.source:
        out.append(Advice(
            f"calibration/QAT data ({recipe.data.source}) differs from the SFT training data ({sft_data})",
            "Calibration ranges and QAT updates should come from the distribution the model was fine-tuned on; "
            "other data sets ranges the fine-tuned behaviour never produces and drifts the weights away from it."))
    out += _steps_advice(recipe, train_rows)
    return out


def _steps_advice(recipe: Recipe, train_rows: int | None) -> list[Advice]:
    if recipe.model.source == EMBEDDED_MODEL:
        return []  # the 1M-parameter demo model converges in tens of steps; the range is for real models
    steps = planned_steps(recipe, train_rows)
    low, high = QAT_STEPS_RANGE
    if steps is None or low <= steps <= high:
        return []
    if steps < low:
        why = "too few steps rarely let the weights settle on the FP4 grid"
    else:
        why = "beyond that QAT stops improving and starts to overfit the training data"
    return [Advice(f"QAT runs {steps} steps (outside {low}-{high})",
                   f"NVIDIA's gpt-oss QAT recipe recovers accuracy within {low}-{high} steps; {why}.")]


def planned_steps(recipe: Recipe, train_rows: int | None) -> int | None:
    """QAT optimizer steps: max_steps, or epochs x batches when max_steps is -1 (None if the data size is unknown)."""
    cfg = recipe.qat
    if cfg.max_steps > 0:
        return cfg.max_steps
    if not train_rows:
        return None
    gpus = max(1, len(recipe.hardware.gpus or [0]))
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * gpus
    return max(1, round(cfg.num_train_epochs * train_rows / per_step))


@dataclass(frozen=True)
class Recovery:
    recovered: bool
    plateaued: bool
    message: str


def qat_recovery(sft_eval_loss: float | None, qat_eval_losses: list[tuple[int, float]], *,
                 tolerance: float = 0.02, window: int = 3, plateau: float = 0.01) -> Recovery:
    """Has QAT's eval loss come back to the SFT level, and stopped improving?

    recovered: the latest eval loss is within `tolerance` (relative) of the SFT eval loss, or below it.
    plateaued: the last `window` eval losses lie within `plateau` (relative) of their minimum.
    Both true means more QAT steps will not buy accuracy: stop (or let the schedule finish).
    """
    points = [(step, loss) for step, loss in qat_eval_losses if loss is not None]
    if sft_eval_loss is None:
        return Recovery(False, False, "no SFT eval loss to compare with yet")
    if not points:
        return Recovery(False, False, f"waiting for QAT's first eval loss (SFT level: {sft_eval_loss:.4f})")
    step, latest = points[-1]
    recovered = latest <= sft_eval_loss * (1 + tolerance)
    recent = [loss for _, loss in points[-window:]]
    plateaued = len(recent) >= window and (max(recent) - min(recent)) <= plateau * min(recent)
    gap = (latest / sft_eval_loss - 1) * 100
    where = f"eval loss {latest:.4f} at step {step} vs SFT {sft_eval_loss:.4f} ({gap:+.1f}%)"
    if recovered and plateaued:
        return Recovery(True, True, f"{where}: recovered to the SFT level and plateaued over the last {window} "
                        "evaluations; more QAT steps will not help")
    if recovered:
        return Recovery(True, False, f"{where}: recovered to the SFT level, still improving")
    if plateaued:
        return Recovery(False, True, f"{where}: plateaued above the SFT level; try more calibration data, "
                        "a slightly higher QAT lr, or NVFP4 (finer scales)")
    return Recovery(False, False, f"{where}: recovering")

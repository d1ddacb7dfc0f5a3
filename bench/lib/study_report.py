"""bench/demo_study.py's tables: one per setting, and a summary with one row per setting, format and task."""

from __future__ import annotations

import sys


def label(result: dict) -> str:
    """The setting in words (keys missing from older JSON lines: the recipe's values then, 300 SFT steps, seed 42,
    QAT lr 2e-4)."""
    text = (f"shape {result['shape']}, base {result['base']}, SFT lr {result['sft_lr']:g} x "
            f"{result.get('sft_steps', 300)} steps, seed {result.get('seed', 42)}, "
            f"QAT/control lr {result.get('qat_lr', 2e-4):g}, {result.get('device', 'cpu')}")
    if result.get("partial"):
        text += ", PARTIAL: stopped by the time budget"
    if result.get("smoke_eval"):
        text += f", SMOKE: {result['smoke_eval']} eval rows per task, not a study result"
    return text


def sort_key(result: dict) -> tuple:
    return (result["shape"], result["base"], result["sft_lr"], result.get("sft_steps", 300), result.get("qat_lr", 2e-4),
            result.get("seed", 42))


def tasks_of(models: dict) -> list[str]:
    first = next(iter(models.values()))
    return [t for t in first if isinstance(first[t], dict) and t != "survival"]


def model_names(result: dict) -> list[str]:
    """The models the result holds, in reading order: SFT, then per format PTQ, QAT, control."""
    order = ["sft", "control:unquantized"] + [f"{k}:{fmt}" for fmt in result["formats"] for k in ("ptq", "qat", "control")]
    return [n for n in order if n in result["models"]]


def story(models: dict, fmt: str, task: str) -> dict:
    """PTQ's drop from SFT (points), whether the 95 % intervals separate, the share QAT / control recover, and
    whether that meets issue 13's acceptance: drop >= 5 points with separate intervals, QAT recovers >= 80 %, the
    control (same extra steps in high precision, then PTQ) recovers < 80 %."""
    missing = {"pass": float("nan"), "ci95": float("nan")}  # a model a budget-stopped setting did not reach
    sft, ptq, qat, ctl = (models.get(k, {}).get(task, missing)
                          for k in ("sft", f"ptq:{fmt}", f"qat:{fmt}", f"control:{fmt}"))
    drop = 100 * (sft["pass"] - ptq["pass"])
    separate = sft["pass"] - sft["ci95"] > ptq["pass"] + ptq["ci95"]
    recovered = (lambda m: (m["pass"] - ptq["pass"]) / (sft["pass"] - ptq["pass"]) if drop > 0 else float("nan"))
    qat_share, control_share = recovered(qat), recovered(ctl)
    meets = drop >= 5 and separate and qat_share >= 0.8 and control_share < 0.8  # nan (not run): False
    return {"drop": drop, "separate": separate, "qat_recovers": qat_share, "control_recovers": control_share,
            "meets": meets}


def print_table(result: dict, out=sys.stdout) -> None:
    models = result["models"]
    tasks = tasks_of(models)
    print(f"\n#### {label(result)} ({result['seconds']:.0f} s)\n", file=out)
    print("| model | " + " | ".join(tasks) + " | answers != SFT's | erased share | surviving delta |", file=out)
    print("|---|" + "---|" * (len(tasks) + 3), file=out)
    for name in model_names(result):
        m = models[name]
        cells = [f"{100 * m[t]['pass']:.1f} ± {100 * m[t]['ci95']:.1f}" for t in tasks]
        kept = m.get("survival")
        extra = [str(m["answers_changed"])]
        extra += [f"{kept['erased_share']:.2f}", f"{kept['surviving_delta']:.2f}"] if kept else ["", ""]
        print(f"| {name} | " + " | ".join(cells + extra) + " |", file=out)
    for fmt in result["formats"]:
        for task in tasks:
            s = story(models, fmt, task)
            print(f"- {fmt} {task}: PTQ drop {s['drop']:+.1f} points (intervals "
                  f"{'separate' if s['separate'] else 'overlap'}); QAT recovers {100 * s['qat_recovers']:.0f} %, "
                  f"control {100 * s['control_recovers']:.0f} %{'  MEETS the acceptance' if s['meets'] else ''}",
                  file=out)
    out.flush()


def print_summary(results: list[dict], out=sys.stdout) -> None:
    """One row per setting, format and task, sorted by setting (not by completion order)."""
    print("\n### Summary (pass %; SFT+extra = the control before its PTQ, above SFT: SFT had not converged; "
          "recovery = share of PTQ's drop won back; meets = issue 13's acceptance)\n", file=out)
    print("| shape | base | SFT lr | SFT steps | seed | QAT lr | fmt | task | SFT | SFT+extra | PTQ | QAT | control "
          "| drop | QAT rec. | ctl rec. | meets |", file=out)
    print("|" + "---|" * 17, file=out)
    for r in sorted(results, key=sort_key):
        models = r["models"]
        for fmt in r["formats"]:
            for task in tasks_of(models):
                s = story(models, fmt, task)
                p = {k: 100 * models[k][task]["pass"] if k in models else float("nan")
                     for k in ("sft", "control:unquantized", f"ptq:{fmt}", f"qat:{fmt}", f"control:{fmt}")}
                cells = [r["shape"], r["base"], f"{r['sft_lr']:g}", str(r.get("sft_steps", 300)),
                         str(r.get("seed", 42)), f"{r.get('qat_lr', 2e-4):g}", fmt, task,
                         *(f"{v:.1f}" for v in p.values()),
                         f"{s['drop']:+.1f}{' sep' if s['separate'] else ''}",
                         f"{100 * s['qat_recovers']:.0f}", f"{100 * s['control_recovers']:.0f}",
                         "YES" if s["meets"] else "no"]
                print("| " + " | ".join(cells) + " |", file=out)
    if any(r.get("partial") for r in results):
        print("\n(nan: a model the time budget cut off; see the PARTIAL tables)", file=out)
    if any(r.get("smoke_eval") for r in results):
        print("\n(rows include SMOKE runs with a capped evaluation: not study results)", file=out)
    out.flush()

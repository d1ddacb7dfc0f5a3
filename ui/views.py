"""HTML snippets several tabs share: status badges, the pipeline cards, failed-job panels, advice, messages."""

from __future__ import annotations

import html

from ui.palette import STATUS_COLORS
from ui.run_data import fmt_duration, split_advice


def esc(text) -> str:
    return html.escape(str(text if text is not None else ""))


def badge(status: str) -> str:
    color = STATUS_COLORS.get(status, STATUS_COLORS["none"])
    text_color = "#212529" if status in ("queued", "skipped", "none", "cancelling") else "#fff"
    return f"<span class='badge' style='background:{color};color:{text_color}'>{esc(status)}</span>"


def pipeline_html(cards: list[dict]) -> str:
    """Dataset -> SFT -> ... -> Serve as coloured cards joined by arrows."""
    if not cards:
        return "<div class='pipeline empty'>No run selected: pick a recipe and click <b>Run the whole recipe</b>.</div>"
    items = []
    for card in cards:
        status = card["status"]
        color = STATUS_COLORS.get(status, STATUS_COLORS["none"])
        progress = ""
        if card.get("progress") is not None:
            progress = (f"<div class='progress'><div style='width:{100 * card['progress']:.0f}%'></div></div>")
        shown = "—" if status == "none" else status
        items.append(
            f"<div class='card status-{esc(status)}' style='border-top:4px solid {color}'>"
            f"<div class='title'>{esc(card['title'])}</div>"
            f"<div class='state' style='color:{color}'>{esc(shown)}</div>"
            f"<div class='time'>{fmt_duration(card['seconds']) if card['seconds'] else '&nbsp;'}</div>"
            f"<div class='metric'>{esc(card['headline'])}</div>{progress}</div>"
        )
    return "<div class='pipeline'>" + "<div class='arrow'>→</div>".join(items) + "</div>"


def problems_html(jobs: list[dict]) -> str:
    """Failed / interrupted / cancelled jobs: the error, the advice, and the log lines. Never just 'failed'."""
    if not jobs:
        return ""
    blocks = []
    for job in jobs:
        error, tip = split_advice(job.get("error"))
        detail = job.get("log_tail") or job.get("error_detail") or "(the job wrote no log lines)"
        log = f" · log: <code>{esc(job['log_path'])}</code>" if job.get("log_path") else ""
        advice = f"<div class='advice'><b>What to do:</b> {esc(tip)}</div>" if tip else ""
        if job["status"] != "failed" and not tip:
            advice = ("<div class='advice'><b>What to do:</b> click <b>Resume</b> to continue from its last "
                      "checkpoint.</div>")
        blocks.append(
            f"<div class='problem'><div>{badge(job['status'])} <b>{esc(job['key'])}</b>{log}</div>"
            f"<div class='error'>{esc(error)}</div>{advice}"
            f"<details {'open' if job['status'] == 'failed' else ''}><summary>log lines</summary>"
            f"{logbox(detail)}</details></div>"
        )
    return "<div class='problems'>" + "".join(blocks) + "</div>"


def advice_html(items: list, title: str = "Recipe advisor") -> str:
    if not items:
        return f"<div class='advisor ok'><b>{esc(title)}</b>: no concerns.</div>"
    rows = "".join(f"<li><b>{esc(a.title)}</b><br><span>{esc(a.reason)}</span></li>" for a in items)
    return f"<div class='advisor'><b>{esc(title)}</b> (warnings, not blocks)<ul>{rows}</ul></div>"


def pill(text: str, color: str) -> str:
    """A small coloured label (plain text: headless browsers and servers often lack emoji fonts)."""
    return f"<span class='badge' style='background:{color};color:#fff'>{esc(text)}</span>"


ICON_GLYPHS = {"error": "!", "warning": "!", "info": "i"}


def icon(level: str) -> str:
    """A round error / warning / info mark drawn by CSS around an ASCII glyph: emoji such as U+26D4 render as an
    empty box where no emoji font is installed (headless chromium, many servers)."""
    return f"<span class='icon icon-{esc(level)}' role='img' aria-label='{esc(level)}'>{ICON_GLYPHS[level]}</span>"


def message(text: str, kind: str = "info") -> str:
    """A one-off notice under a button: kind = info | ok | error."""
    if not text:
        return ""
    lines = "<br>".join(esc(line) for line in str(text).splitlines())
    return f"<div class='msg msg-{kind}'>{lines}</div>"


def logbox(text: str, tall: bool = False) -> str:
    """Log lines in a box that opens scrolled to its end, where the latest line (or the error) is."""
    return f"<div class='logbox{' tall' if tall else ''}'><pre>{esc(text)}</pre></div>"


def job_line(job: dict | None, inline: bool = False) -> str:
    if job is None:
        return "<div class='jobline'>not started in this run</div>"
    pct = f" {100 * (job.get('progress') or 0):.0f}%" if job["status"] in ("running", "cancelling") else ""
    msg = f" — {esc(job.get('message'))}" if job.get("message") else ""
    line = f"{badge(job['status'])} <b>{esc(job['config'].get('key'))}</b>{pct}{msg}"
    return line if inline else f"<div class='jobline'>{line}</div>"


def launch_html(launches: list[dict]) -> str:
    """For jobs started through `accelerate launch`: the command of every machine rank (run the others there)."""
    blocks = []
    for art in launches:
        commands = art["meta"].get("commands") or []
        body = "\n".join(f"# machine rank {rank}\n{cmd}" for rank, cmd in enumerate(commands))
        blocks.append(f"<details class='launch'><summary>{esc(art.get('key') or '')}: accelerate launch, "
                      f"{len(commands)} machine(s); config {esc(art['path'])}</summary><pre>{esc(body)}</pre></details>")
    return "".join(blocks)


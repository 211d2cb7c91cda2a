"""Rendering an evaluation report: `report.json`, `report.md`, a self-contained `report.html`, a table.

The HTML page needs no other file: image grids and matplotlib plots are embedded as base64 PNG data URIs.
Plots are drawn on `matplotlib.figure.Figure` objects directly (no pyplot state, no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

from dagcli.generate import slug
from dagcli.images import make_grid

TILE_MIN, TILE_MAX = 96, 192  # pixel size of an image in the HTML grids (tiny images are enlarged)


# --- small helpers ------------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 4) -> str:
    """A number for a table; '–' when undefined."""
    return "–" if x is None else f"{x:.{digits}g}"


def fmt_stat(stats: dict | None) -> str:
    """'mean ± std'."""
    return "–" if not stats else f"{fmt(stats['mean'])} ± {fmt(stats['std'], 3)}"


def png_data_uri(image) -> str:
    """A PIL image as a `data:image/png;base64,...` URI."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_data_uri(fig) -> str:
    """A matplotlib figure as a PNG data URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail_grid(images: Sequence) -> object:
    """One row of images at a readable size: tiny images enlarged (nearest), large ones shrunk."""
    from PIL import Image

    w = images[0].width
    if w < TILE_MIN:
        return make_grid(images, cols=len(images), upscale=max(1, TILE_MIN // w))
    if w > TILE_MAX:
        h = round(images[0].height * TILE_MAX / w)
        images = [img.resize((TILE_MAX, h), Image.BICUBIC) for img in images]
    return make_grid(images, cols=len(images))


def read_metrics(run_dir: str | Path | None) -> list[dict]:
    """The lines of a run's `metrics.jsonl` (empty when there is none; corrupt lines are skipped)."""
    if not run_dir:
        return []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# --- plots --------------------------------------------------------------------------------------------


def all_scores(model: dict, reward: str) -> list[float]:
    """Every image's score for one reward and one model of the report."""
    return [s for p in model["per_prompt"] for s in p["rewards"][reward]["scores"]]


def reward_histogram(report: dict, reward: str) -> str:
    """Overlaid histograms of one reward's per-image scores, one colour per model, as a PNG data URI."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3))
    ax = fig.add_subplot()
    series = [(m["label"], all_scores(m, reward)) for m in report["models"]]
    values = [v for _, s in series for v in s]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    bins = 20 if hi > lo else 1
    for label, scores in series:
        ax.hist(scores, bins=bins, range=(lo, hi if hi > lo else lo + 1), alpha=0.5, label=label)
    ax.set_xlabel(reward)
    ax.set_ylabel("images")
    ax.legend(fontsize="small")
    return figure_data_uri(fig)


def curve_key(rows: list[dict], names: Sequence[str]) -> str | None:
    """The first of `names` that some metrics row holds a number for."""
    for name in names:
        if any(isinstance(r.get(name), int | float) for r in rows):
            return name
    return None


def training_curves(rows: list[dict], title: str) -> str | None:
    """reward_mean and loss against trajectories_seen from `metrics.jsonl` rows, as a PNG data URI."""
    from matplotlib.figure import Figure

    x_key = curve_key(rows, ("trajectories_seen", "epoch"))
    panels = [k for k in (curve_key(rows, ("reward_mean",)), curve_key(rows, ("loss", "db_loss"))) if k]
    if x_key is None or not panels:
        return None
    fig = Figure(figsize=(4.5 * len(panels), 3))
    for n, key in enumerate(panels, start=1):
        pts = [
            (r[x_key], r[key])
            for r in rows
            if isinstance(r.get(x_key), int | float) and isinstance(r.get(key), int | float)
        ]
        ax = fig.add_subplot(1, len(panels), n)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
        ax.set_xlabel(x_key)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize="medium")
    return figure_data_uri(fig)


# --- markdown -----------------------------------------------------------------------------------------

METRIC_COLUMNS = ("diversity", "fidelity", "drift")


def summary_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the overall table (shared by markdown, HTML and the terminal)."""
    lpips = any(m["overall"].get("lpips_diversity") is not None for m in report["models"])
    header = ["model", *report["rewards"], *METRIC_COLUMNS, *(["lpips diversity"] if lpips else [])]
    rows = []
    for m in report["models"]:
        o = m["overall"]
        row = [m["label"], *[fmt_stat(o["rewards"].get(r)) for r in report["rewards"]]]
        row += [fmt(o.get(k)) for k in METRIC_COLUMNS] + ([fmt(o.get("lpips_diversity"))] if lpips else [])
        rows.append(row)
    return header, rows


def md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def grid_file(output: Path, model: dict, prompt: str) -> str | None:
    """The grid PNG `dag sample`'s writer made for this prompt (relative to output), if it exists."""
    files = model["per_prompt"]
    index = next((i for i, p in enumerate(files) if p["prompt"] == prompt), None)
    if index is None or not files[index]["files"]:
        return None
    folder = Path(files[index]["files"][0]).parent
    candidate = folder / f"grid-{index:03d}-{slug(prompt)}.png"
    return str(candidate) if (output / candidate).is_file() else None


def render_markdown(report: dict, output: Path | None = None) -> str:
    """The report as Markdown: settings, overall table, warnings, one table per prompt."""
    s = report["settings"]
    out = ["# Evaluation report", ""]
    out += [f"- **{k}**: `{v}`" for k, v in s.items() if v not in (None, "", [], {})]
    out += ["", "## Overall", "", md_table(*summary_rows(report)), ""]
    out += ["## Hacking monitor", ""]
    if report["warnings"]:
        out += [f"- ⚠️ {w['message']}" for w in report["warnings"]]
    else:
        out += [
            f"No checkpoint raised a reward while losing more than {s['hack_threshold']:.0%} of its "
            "diversity or fidelity."
        ]
    out.append("")
    for prompt in report["prompts"]:
        out += [f"## {prompt or '(no prompt)'}", ""]
        header = ["model", *report["rewards"], *METRIC_COLUMNS, "seeds"]
        rows, links = [], []
        for m in report["models"]:
            p = next((p for p in m["per_prompt"] if p["prompt"] == prompt), None)
            if p is None:
                continue
            rows.append(
                [
                    m["label"],
                    *[fmt_stat(p["rewards"][r]) for r in report["rewards"]],
                    *[fmt(p.get(k)) for k in METRIC_COLUMNS],
                    ", ".join(str(x) for x in p["seeds"]),
                ]
            )
            grid = grid_file(output, m, prompt) if output else None
            if grid:
                links.append(f"![{m['label']}]({grid})")
        out += [md_table(header, rows), "", *([" ".join(links), ""] if links else [])]
    return "\n".join(out)


# --- HTML ---------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.warn { background: #fff3cd; border: 1px solid #e0b000; padding: 0.5em 1em; margin: 0.5em 0; }
.ok { color: #2a7a2a; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
figure { margin: 0; }
figcaption { font-size: 0.85em; margin-top: 0.3em; }
img { image-rendering: pixelated; }
.plot img { image-rendering: auto; }
"""


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def prompt_section(report: dict, prompt: str, images: dict[str, dict[str, list]]) -> str:
    """One prompt: the grids of every model side by side, each captioned with its numbers."""
    figures = []
    for m in report["models"]:
        p = next((p for p in m["per_prompt"] if p["prompt"] == prompt), None)
        pics = images.get(m["label"], {}).get(prompt)
        if p is None or not pics:
            continue
        caption = "<br>".join(
            [f"<b>{html.escape(m['label'])}</b>"]
            + [f"{html.escape(r)}: {fmt_stat(p['rewards'][r])}" for r in report["rewards"]]
            + [f"{k}: {fmt(p.get(k))}" for k in METRIC_COLUMNS if p.get(k) is not None]
        )
        figures.append(
            f'<figure><img src="{png_data_uri(thumbnail_grid(pics))}" alt="{html.escape(m["label"])}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return f"<h3>{html.escape(prompt or '(no prompt)')}</h3><div class='row'>{''.join(figures)}</div>"


def render_html(report: dict, images: dict[str, dict[str, list]]) -> str:
    """The self-contained HTML page; `images` maps model label -> prompt -> PIL images (seed order)."""
    s = report["settings"]
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>dag eval report</title>"
        f"<style>{CSS}</style></head><body><h1>Evaluation report</h1>"
    ]
    parts.append(
        "<ul>"
        + "".join(
            f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>"
            for k, v in s.items()
            if v not in (None, "", [], {})
        )
        + "</ul>"
    )
    parts.append("<h2>Overall</h2>" + html_table(*summary_rows(report)))
    parts.append("<h2>Hacking monitor</h2>")
    if report["warnings"]:
        parts += [f"<div class='warn'>⚠ {html.escape(w['message'])}</div>" for w in report["warnings"]]
    else:
        parts.append(
            f"<p class='ok'>No checkpoint raised a reward while losing more than "
            f"{s['hack_threshold']:.0%} of its diversity or fidelity.</p>"
        )
    parts.append("<h2>Reward distributions</h2><div class='row plot'>")
    parts += [
        f"<figure><img src='{reward_histogram(report, r)}' alt='{html.escape(r)} histogram'></figure>"
        for r in report["rewards"]
    ]
    parts.append("</div>")
    curves = [
        (m["label"], training_curves(read_metrics((m.get("source") or {}).get("run_dir")), m["label"]))
        for m in report["models"]
    ]
    curves = [(label, uri) for label, uri in curves if uri]
    if curves:
        parts.append("<h2>Training curves</h2><div class='row plot'>")
        parts += [
            f"<figure><img src='{uri}' alt='{html.escape(label)} training curves'></figure>"
            for label, uri in curves
        ]
        parts.append("</div>")
    parts.append("<h2>Per prompt</h2>")
    parts += [prompt_section(report, p, images) for p in report["prompts"]]
    parts.append("</body></html>")
    return "\n".join(parts)


# --- terminal and files -------------------------------------------------------------------------------


def terminal_table(report: dict):
    """The overall numbers as a `progress.TextTable` (model names and numbers are never cut)."""
    from dagcli.progress import Column, TextTable

    header, rows = summary_rows(report)
    columns = (Column(header[0]), *(Column(h, numeric=True) for h in header[1:]))
    return TextTable("dag eval", columns, tuple(tuple(r) for r in rows))


def images_by_prompt(sets) -> dict[str, dict[str, list]]:
    """label -> prompt -> PIL images, from evaluation image sets."""
    out: dict[str, dict[str, list]] = {}
    for s in sets:
        for prompt, image in zip(s.prompts, s.images, strict=True):
            out.setdefault(s.label, {}).setdefault(prompt, []).append(image)
    return out


def write_report(report: dict, sets, output: Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html into `output`; return their paths."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "report.json", "md": output / "report.md", "html": output / "report.html"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(report, output) + "\n", encoding="utf-8")
    paths["html"].write_text(render_html(report, images_by_prompt(sets)), encoding="utf-8")
    return paths

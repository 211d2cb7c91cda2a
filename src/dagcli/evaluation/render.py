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

from dagcli.evaluation.schema import ModelReport, PromptReport, Report, RewardStats, as_report
from dagcli.generate import slug
from dagcli.images import make_grid

TILE_MIN, TILE_MAX = 96, 192  # pixel size of an image in the HTML grids (tiny images are enlarged)
GRID_COLS = 4  # images per row of a model's grid in the HTML comparison


# --- small helpers ------------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 4) -> str:
    """A number for a table; '–' when undefined."""
    return "–" if x is None else f"{x:.{digits}g}"


def fmt_stat(stats: RewardStats | dict | None) -> str:
    """'mean ± std' (of a `RewardStats` or its report.json form)."""
    if not stats:
        return "–"
    stats = RewardStats.from_dict(stats) if isinstance(stats, dict) else stats
    return f"{fmt(stats.mean)} ± {fmt(stats.std, 3)}"


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


def thumbnail_grid(images: Sequence, label: str | None = None) -> object:
    """Up to GRID_COLS images a row at a readable size: tiny images enlarged (nearest), large ones shrunk;
    `label` (the prompt) above them.

    Narrow grids let every model's grid of a prompt sit side by side on one screen.
    """
    from PIL import Image

    w, cols = images[0].width, min(len(images), GRID_COLS)
    if w < TILE_MIN:
        return make_grid(images, cols=cols, upscale=max(1, TILE_MIN // w), label=label)
    if w > TILE_MAX:
        h = round(images[0].height * TILE_MAX / w)
        images = [img.resize((TILE_MAX, h), Image.BICUBIC) for img in images]
    return make_grid(images, cols=cols, label=label)


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


def shown_path(value: str, output: Path | None) -> str:
    """A path as the pages show it: relative to the report folder `output` (else to the current folder) when
    it is at most two folders up from there, a named model's CLIP by its label; other values unchanged."""
    import os

    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    label = embed_label(Path(value))
    if label:
        return label
    relative = os.path.relpath(value, output.resolve() if output else Path.cwd())
    return value if relative.startswith(os.path.join("..", "..", "..")) else relative


def embed_label(path: Path) -> str:
    """How the pages name the CLIP folder a named model registers (`NamedModel.embed_label`), '' for others."""
    from dagcli.extensions import named_models

    target = path.resolve()
    return next((m.embed_label for m in named_models().values()
                 if m.embed_model is not None and m.embed_model.resolve() == target), "")


def shown_settings(report: Report, output: Path | None) -> list[tuple[str, str]]:
    """(name, value) of every setting that is set, paths as `shown_path` writes them."""
    out = []
    for key, value in report.settings.items():
        if value in (None, "", [], {}):
            continue
        shown = [shown_path(v, output) for v in value] if isinstance(value, list) else shown_path(value, output)
        out.append((key, ", ".join(map(str, shown)) if isinstance(shown, list) else str(shown)))
    return out


SETTINGS_NOTE = "Settings (paths relative to this report's folder):"


# --- plots --------------------------------------------------------------------------------------------


def all_scores(model: ModelReport, reward: str) -> list[float]:
    """Every image's score for one reward and one model of the report."""
    return [s for p in model.per_prompt for s in p.rewards[reward].scores or ()]


def reward_histogram(report: Report, reward: str) -> str:
    """Overlaid histograms of one reward's per-image scores, one colour per model, as a PNG data URI."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3))
    ax = fig.add_subplot()
    series = [(m.label, all_scores(m, reward)) for m in report.models]
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


def training_curves(rows: list[dict], run: str) -> str | None:
    """reward_mean and loss against trajectories_seen from `metrics.jsonl` rows, as a PNG data URI titled
    with the run and what is plotted."""
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
    fig.suptitle(f"run {run}: {' and '.join(panels)} per epoch against {x_key} (metrics.jsonl)", fontsize="medium")
    return figure_data_uri(fig)


def run_dirs(report: Report) -> list[Path]:
    """The run folders of the report's checkpoints, each once, in model order."""
    found = [m.source.get("run_dir") for m in report.models]
    return list(dict.fromkeys(Path(d) for d in found if d))


# --- tables and legend (shared by markdown, HTML and the terminal) -------------------------------------

SHARE_KEYS = ("fidelity", "pixel_colour", "pixel_background", "pixel_shape")  # fractions, shown as percent
HEADERS = {
    "diversity": "diversity",
    "lpips_diversity": "lpips diversity",
    "fidelity": "fidelity",
    "pixel_colour": "pixel colour",
    "pixel_background": "pixel background",
    "pixel_shape": "pixel shape",
    "drift": "drift",
}
FLAG = "⚠"


def metric_keys(report: Report) -> list[str]:
    """The metric columns of this report: diversity, LPIPS diversity (when measured), fidelity, the pixel
    judges (built-in models only), drift."""
    keys = ["diversity"]
    if any(m.overall.metric("lpips_diversity") is not None for m in report.models):
        keys.append("lpips_diversity")
    keys.append("fidelity")
    keys += [f"pixel_{a}" for a in report.pixel_judges]
    return [*keys, "drift"]


def fmt_metric(key: str, value: float | None) -> str:
    """A metric for a table: shares as percentages, other values with 4 significant digits."""
    if value is None or key not in SHARE_KEYS:
        return fmt(value)
    return f"{100 * value:.3g} %"


def flagged(report: Report) -> set[tuple[str, str | None, str]]:
    """(model, prompt or None for overall, metric) of every metric the hacking monitor warned about."""
    return {(w.model, w.prompt, w.metric) for w in report.warnings}


def summary_rows(report: Report | dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the overall table (shared by markdown, HTML and the terminal)."""
    report = as_report(report)
    keys = metric_keys(report)
    header = ["model", *report.rewards, *(HEADERS[k] for k in keys)]
    rows = []
    for m in report.models:
        o = m.overall
        row = [m.label, *[fmt_stat(o.rewards.get(r)) for r in report.rewards]]
        rows.append(row + [fmt_metric(k, o.metric(k)) for k in keys])
    return header, rows


def summary_flags(report: Report) -> set[tuple[int, int]]:
    """(row, column) of the overall table's cells the hacking monitor warned about."""
    marks, keys = flagged(report), metric_keys(report)
    first = 1 + len(report.rewards)
    return {
        (r, first + c)
        for r, m in enumerate(report.models)
        for c, k in enumerate(keys)
        if (m.label, None, k) in marks
    }


def prompt_columns(report: Report, prompt: str) -> list[tuple[ModelReport, PromptReport]]:
    """(model, its block for this prompt) for every model that has images of the prompt, base first."""
    return [(m, m.prompt(prompt)) for m in report.models if m.prompt(prompt) is not None]


def prompt_rows(report: Report, prompt: str) -> tuple[list[list[str]], set[tuple[int, int]]]:
    """One prompt's comparison, one column per model: rows of (name, value per model), and flagged cells."""
    columns, marks = prompt_columns(report, prompt), flagged(report)
    rows = [["seeds", *[", ".join(str(x) for x in b.seeds) for _, b in columns]]]
    rows += [[r, *[fmt_stat(b.rewards.get(r)) for _, b in columns]] for r in report.rewards]
    flags = set()
    for k in metric_keys(report):
        flags |= {(len(rows), c + 1) for c, (m, _) in enumerate(columns) if (m.label, prompt, k) in marks}
        rows.append([HEADERS[k], *[fmt_metric(k, b.metric(k)) for _, b in columns]])
    return rows, flags


def legend(report: Report, output: Path | None = None) -> list[tuple[str, str]]:
    """(name, meaning) of every number on the page, with this report's settings filled in."""
    s, keys = report.settings, metric_keys(report)
    embed = f" ({shown_path(s['embed_model'], output)})" if s.get("embed_model") else " (none given: not measured)"
    items = [
        (
            "reward",
            "mean ± standard deviation over the images (all of them overall, the prompt's per prompt)",
        ),
        (
            "diversity",
            f"mean pairwise cosine distance 1 − cos(eᵢ, eⱼ) of the CLIP image embeddings{embed} of one "
            "prompt's images; overall: the mean over prompts. 0 = every image embeds alike (collapse)",
        ),
    ]
    if "lpips_diversity" in keys:
        items.append(("lpips diversity", "mean pairwise LPIPS (AlexNet) distance of one prompt's images"))
    items.append(
        (
            "fidelity",
            f"share of images whose most similar text among the {len(report.prompts)} evaluated prompts "
            "(CLIP cosine) is their own prompt. Relative: it catches an image that looks like another "
            "prompt, not a lost attribute (a triangle turned blob passes while no other prompt fits better)",
        )
    )
    items += [(HEADERS[k], PIXEL_LEGEND[k]) for k in keys if k in PIXEL_LEGEND]
    items += [
        (
            "drift",
            "Fréchet distance |μ₁ − μ₂|² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) between Gaussians fitted to the base's and "
            "this model's embeddings of a prompt; overall: the mean over prompts. Larger = further from the "
            "base; with few images mostly the shift of the mean embedding (not an FID)",
        ),
        (
            "ridge",
            f"{s.get('ridge', 0):g}, added to the covariances' diagonals in drift: with fewer images than "
            "embedding dimensions they are singular, and the ridge keeps their matrix square root defined",
        ),
        (
            FLAG,
            f"hacking monitor: a reward's mean rose while this value fell by {s['hack_threshold']:.0%} or more "
            "relative to the base (over all images overall, over the prompt's images per prompt)",
        ),
    ]
    return items


PIXEL_LEGEND = {
    "pixel_colour": "share of images whose shape colour is the prompt's: the median colour of the pixels "
    "that differ from the border, named by the nearest palette colour (pixel judges: built-in models only)",
    "pixel_background": "share of images whose border colour (median, nearest background name) is the "
    "prompt's background; only prompts that name one count",
    "pixel_shape": "share of images whose shape is the prompt's: the circle, square or triangle of the same area "
    "and centre whose rendering differs least from the pixels that differ from the border (not monitored)",
}


def monitor_quiet(report: Report) -> str:
    """The line shown when the hacking monitor has no warning."""
    metrics = "diversity or fidelity" + (" or a pixel judge's share" if report.pixel_judges else "")
    return (
        "No checkpoint raised a reward, over all prompts or on one prompt, while its "
        f"{metrics} fell by {report.settings['hack_threshold']:.0%} or more."
    )


# --- markdown -----------------------------------------------------------------------------------------


def md_table(header: list[str], rows: list[list[str]], flags: set[tuple[int, int]] = frozenset()) -> str:
    """A Markdown table; flagged (row, column) cells get a warning sign."""
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    for r, row in enumerate(rows):
        cells = [esc(c) + (f" {FLAG}" if (r, k) in flags else "") for k, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_file(output: Path, model: ModelReport, prompt: str) -> str | None:
    """The grid PNG `dag sample`'s writer made for this prompt (relative to output), if it exists."""
    blocks = model.per_prompt
    index = next((i for i, p in enumerate(blocks) if p.prompt == prompt), None)
    if index is None or not blocks[index].files:
        return None
    folder = Path(blocks[index].files[0]).parent
    candidate = folder / f"grid-{index:03d}-{slug(prompt)}.png"
    return str(candidate) if (output / candidate).is_file() else None


def md_prompt_section(report: Report, prompt: str, output: Path | None) -> list[str]:
    """One prompt: a table with one column per model, its image grid on top (when the grid files exist)."""
    columns = prompt_columns(report, prompt)
    rows, flags = prompt_rows(report, prompt)
    grids = [grid_file(output, m, prompt) if output else None for m, _ in columns]
    if any(grids):
        links = [f"![{m.label}]({g})" if g else "–" for (m, _), g in zip(columns, grids, strict=True)]
        rows = [["images", *links], *rows]
        flags = {(r + 1, c) for r, c in flags}
    header = ["", *[m.label for m, _ in columns]]
    return [f"## {prompt or '(no prompt)'}", "", md_table(header, rows, flags), ""]


def render_markdown(report: Report | dict, output: Path | None = None) -> str:
    """The report as Markdown: settings, overall table, legend, warnings, one comparison table per prompt."""
    report = as_report(report)
    out = ["# Evaluation report", "", SETTINGS_NOTE, ""]
    out += [f"- **{k}**: `{v}`" for k, v in shown_settings(report, output)]
    out += ["", "## Overall", "", md_table(*summary_rows(report), summary_flags(report)), ""]
    out += ["**What the numbers mean**", ""]
    out += [f"- **{name}**: {meaning}." for name, meaning in legend(report, output)]
    out += ["", "## Hacking monitor", ""]
    if report.warnings:
        out += [f"- {FLAG} {w.message}" for w in report.warnings]
    else:
        out.append(monitor_quiet(report))
    out.append("")
    for prompt in report.prompts:
        out += md_prompt_section(report, prompt, output)
    return "\n".join(out)


# --- HTML ---------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
td.flag { background: #fff3cd; }
.warn { background: #fff3cd; border: 1px solid #e0b000; padding: 0.5em 1em; margin: 0.5em 0; }
.ok { color: #2a7a2a; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.scroll { overflow-x: auto; }
.compare th, .compare td { text-align: center; }
.compare th:first-child, .compare td:first-child { text-align: left; }
.legend { flex: 1 1 20em; max-width: 46em; font-size: 0.85em; margin: 1em 0; }
.legend dt { font-weight: bold; margin-top: 0.4em; }
.legend dd { margin-left: 1em; }
figure { margin: 0; }
img { image-rendering: pixelated; }
.plot img { image-rendering: auto; }
"""


def html_table(
    header: list[str],
    rows: list[list[str]],
    flags: set[tuple[int, int]] = frozenset(),
    css: str = "",
    lead: str = "",
) -> str:
    """A table of escaped text cells; flagged (row, column) cells are highlighted; `lead` is a first row
    of ready HTML cells (the image grids)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='flag'>{html.escape(c)} {FLAG}</td>"
            if (r, k) in flags
            else f"<td>{html.escape(c)}</td>"
            for k, c in enumerate(row)
        )
        + "</tr>"
        for r, row in enumerate(rows)
    )
    lead = f"<tr>{lead}</tr>" if lead else ""
    return f"<table class='{css}'><thead><tr>{head}</tr></thead><tbody>{lead}{body}</tbody></table>"


def html_legend(report: Report, output: Path | None = None) -> str:
    """The legend as a definition list."""
    items = "".join(f"<dt>{html.escape(n)}</dt><dd>{html.escape(m)}.</dd>" for n, m in legend(report, output))
    return f"<dl class='legend'>{items}</dl>"


def prompt_section(report: Report, prompt: str, images: dict[str, dict[str, list]]) -> str:
    """One prompt: a table with one column per model, its image grid on top and its numbers below."""
    columns = prompt_columns(report, prompt)
    rows, flags = prompt_rows(report, prompt)
    cells = []
    for m, _ in columns:
        pics = images.get(m.label, {}).get(prompt)
        alt = html.escape(f"{m.label}: {prompt}")
        cells.append(
            f'<td><img src="{png_data_uri(thumbnail_grid(pics, prompt))}" alt="{alt}"></td>' if pics else "<td>–</td>"
        )
    lead = f"<td>images</td>{''.join(cells)}" if any("<img" in c for c in cells) else ""
    table = html_table(["", *[m.label for m, _ in columns]], rows, flags, css="compare", lead=lead)
    return f"<h3>{html.escape(prompt or '(no prompt)')}</h3><div class='scroll'>{table}</div>"


def render_html(report: Report | dict, images: dict[str, dict[str, list]], output: Path | None = None) -> str:
    """The self-contained HTML page; `images` maps model label -> prompt -> PIL images (seed order); paths
    are shown relative to `output`, the report's folder."""
    report = as_report(report)
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>dag eval report</title>"
        f"<style>{CSS}</style></head><body><h1>Evaluation report</h1>"
    ]
    parts.append(
        f"<p>{html.escape(SETTINGS_NOTE)}</p><ul>"
        + "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in shown_settings(report, output))
        + "</ul>"
    )
    overall = html_table(*summary_rows(report), summary_flags(report))
    parts.append(
        f"<h2>Overall</h2><div class='row'><div class='scroll'>{overall}</div>{html_legend(report, output)}</div>"
    )
    parts.append("<h2>Hacking monitor</h2>")
    if report.warnings:
        parts += [f"<div class='warn'>{FLAG} {html.escape(w.message)}</div>" for w in report.warnings]
    else:
        parts.append(f"<p class='ok'>{html.escape(monitor_quiet(report))}</p>")
    parts.append("<h2>Reward distributions</h2><div class='row plot'>")
    parts += [
        f"<figure><img src='{reward_histogram(report, r)}' alt='{html.escape(r)} histogram'></figure>"
        for r in report.rewards
    ]
    parts.append("</div>")
    curves = [(run.name, training_curves(read_metrics(run), run.name)) for run in run_dirs(report)]
    curves = [(name, uri) for name, uri in curves if uri]
    if curves:
        parts.append("<h2>Training curves</h2><div class='row plot'>")
        parts += [
            f"<figure><img src='{uri}' alt='run {html.escape(name)} training curves'></figure>"
            for name, uri in curves
        ]
        parts.append("</div>")
    parts.append(
        "<h2>Per prompt</h2><p>One column per model; image <i>k</i> of every grid (row by row) has the same "
        "seed, so differences come from the weights. The numbers are those of the legend, for this "
        "prompt's images.</p>"
    )
    parts += [prompt_section(report, p, images) for p in report.prompts]
    parts.append("</body></html>")
    return "\n".join(parts)


# --- terminal and files -------------------------------------------------------------------------------


def terminal_table(report: Report | dict):
    """The overall numbers as a `progress.TextTable` (model names and numbers are never cut)."""
    from dagcli.progress import Column, TextTable

    header, rows = summary_rows(report)
    columns = (Column(header[0]), *(Column(h, numeric=True) for h in header[1:]))
    return TextTable("dag eval", columns, tuple(tuple(r) for r in rows), noun="model")


def images_by_prompt(sets) -> dict[str, dict[str, list]]:
    """label -> prompt -> PIL images, from evaluation image sets."""
    out: dict[str, dict[str, list]] = {}
    for s in sets:
        for prompt, image in zip(s.prompts, s.images, strict=True):
            out.setdefault(s.label, {}).setdefault(prompt, []).append(image)
    return out


def write_report(report: Report | dict, sets, output: Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html into `output`; return their paths."""
    report = as_report(report)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "report.json", "md": output / "report.md", "html": output / "report.html"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(report, output) + "\n", encoding="utf-8")
    paths["html"].write_text(render_html(report, images_by_prompt(sets), output), encoding="utf-8")
    return paths

"""The report as one self-contained HTML page: inline CSS, images as base64 data URIs, no script, no network.

`render_page(report, images)` takes the report's JSON (see `build.py`) and the PNG files to embed; every section
has an id (SECTIONS) and a title, so a reader and a test can find it.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from scvi_scale.report.metrics import EMBEDDING_TITLES

SECTIONS = {
    "history": "Training history",
    "run": "Throughput and memory",
    "umap": "UMAP of the latent",
    "scib": "Integration metrics (scIB)",
    "outputs": "Outputs written into the store",
}

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2330; margin: 0;
       background: #f5f6f8; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; background: #ffffff; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #d8dce3; }
p.lead { color: #4a5262; margin: 4px 0 16px; }
p.note { color: #4a5262; font-size: 13px; }
table { border-collapse: collapse; font-size: 14px; margin: 8px 0 12px; }
th, td { border: 1px solid #d8dce3; padding: 4px 10px; text-align: left; }
th { background: #eef0f4; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.card { border: 1px solid #d8dce3; border-radius: 6px; padding: 8px 14px; min-width: 150px; }
.card .value { font-size: 20px; font-weight: 600; }
.card .label { font-size: 12px; color: #4a5262; }
"""


def _text(value) -> str:
    return html.escape(str(value))


def human_bytes(n_bytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    size, unit = float(n_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"


def format_value(key: str, value) -> str:
    """A number as a reader wants it: bytes (a key ending in 'bytes') in binary units, large counts with
    separators, other floats to 4 significant digits; anything else as text."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else ("yes" if value else "no")
    if isinstance(value, (int, float)) and key.endswith("bytes"):
        return f"{human_bytes(value)} ({int(value):,} B)"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " × ".join(str(item) for item in value) if all(isinstance(i, int) for i in value) else str(value)
    return str(value)


def _table(header: list[str], rows: list[list], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_text(cell)}</th>" for cell in header)
    body = []
    for row in rows:
        cells = [f"<td{' class=number' if i >= numeric_from else ''}>{_text(cell)}</td>" for i, cell in enumerate(row)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _image(path: Path, alt: str) -> str:
    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{_text(alt)}">'


def _cards(cards: list[tuple[str, str]]) -> str:
    items = "".join(
        f'<div class="card"><div class="value">{_text(v)}</div><div class="label">{_text(k)}</div></div>'
        for k, v in cards
    )
    return f'<div class="cards">{items}</div>'


def _section(key: str, body: str) -> str:
    return f'<section id="{key}"><h2>{_text(SECTIONS[key])}</h2>{body}</section>'


def _history_section(report: dict, images: dict[str, Path]) -> str:
    summary = report["history_summary"]
    rows = [[key, format_value(key, value)] for key, value in summary["final"].items()]
    return (
        f'<p class="note">{summary["epochs"]} epochs; left, each metric per epoch; right, against the wall time '
        f"since the start of training (the running sum of the epoch times, validation included).</p>"
        + _image(images["history"], "training history: loss curves against epochs and wall time")
        + "<h3>Last recorded value of each metric</h3>"
        + _table(["metric", "value"], rows)
    )


def _run_section(report: dict) -> str:
    run = report["run"]
    if not run:
        return '<p class="note">No run measurements were given.</p>'
    return _table(["measure", "value"], [[key, format_value(key, value)] for key, value in run.items()])


def _umap_section(report: dict, images: dict[str, Path]) -> str:
    cells = report["cells"]
    return (
        f'<p class="note">UMAP (umap-learn, {report["umap"]["n_neighbors"]} nearest neighbours in the latent space, '
        f"{_text(report['scib']['neighbor_search'])}) of {cells['subsample']:,} of the {cells['n_cells']:,} cells, "
        f"drawn uniformly at random with seed {cells['seed']} (at most {cells['max_cells']:,}); the scIB metrics "
        "below use the same cells.</p>"
        + _image(images["umap"], "UMAP of the latent coloured by batch, label and library size")
    )


def _scib_section(report: dict, images: dict[str, Path]) -> str:
    scib = report["scib"]
    embeddings = list(scib["scores"])
    if not any(scib["scores"].values()):
        return f'<p class="note">No scIB metric was computed: {_text(scib["why_none"])}</p>'
    computed = {name for values in scib["scores"].values() for name in values}
    rows = [
        [name, category] + [format_value("", scib["scores"][e].get(name)) for e in embeddings]
        for category, names in scib["categories"].items()
        for name in names
        if name in computed
    ]
    aggregate_names = list(dict.fromkeys(name for values in scib["aggregate"].values() for name in values))
    rows += [
        [name, "aggregate"] + [format_value("", scib["aggregate"][e].get(name)) for e in embeddings]
        for name in aggregate_names
    ]
    left_out = "".join(f"<li><b>{_text(name)}</b>: {_text(why)}</li>" for name, why in scib["left_out"].items())
    left_out = f'<p class="note">Not computed:</p><ul class="note">{left_out}</ul>' if left_out else ""
    return (
        f'<p class="note">scib-metrics {_text(scib["scib_metrics_version"])} on the {report["cells"]["subsample"]:,} '
        f"cells of the UMAP, {scib['n_neighbors']} nearest neighbours per embedding "
        f"({_text(scib['neighbor_search'])}). Every score is in [0, 1], higher is better. "
        f"{_text(scib['baseline'])}</p>"
        + _table(["metric", "category"] + [EMBEDDING_TITLES[e] for e in embeddings], rows, numeric_from=2)
        + _image(images["scib"], "scIB scores of the scVI latent and of the PCA baseline")
        + f'<p class="note">{_text(scib["aggregate_rule"])}</p>'
        + left_out
    )


def _outputs_section(report: dict) -> str:
    outputs = report["outputs"]
    if not outputs:
        return '<p class="note">Nothing has been written into the store yet.</p>'
    rows = [
        [
            entry.get("entry"),
            entry.get("kind"),
            format_value("", entry.get("shape")),
            format_value("bytes", entry.get("bytes")),
            format_value("", entry.get("complete")),
        ]
        for entry in outputs
    ]
    return _table(["entry", "kind", "shape", "size", "complete"], rows)


def render_page(report: dict, images: dict[str, Path]) -> str:
    """The whole page as a string. images: "history", "umap" and, when any score was computed, "scib" -> PNG."""
    cells = report["cells"]
    keys = report["keys"]
    scib = report["scib"]
    cards = [("cells", f"{cells['n_cells']:,}"), ("epochs", str(report["history_summary"]["epochs"]))]
    for name in ("Total", "Batch correction", "Bio conservation"):
        if name in scib["aggregate"].get("scvi", {}):
            cards.append(
                (
                    f"scIB {name.lower()}: scVI / PCA",
                    f"{scib['aggregate']['scvi'][name]:.3f} / {scib['aggregate']['pca'][name]:.3f}",
                )
            )
    sections = [
        _section("history", _history_section(report, images)),
        _section("run", _run_section(report)),
        _section("umap", _umap_section(report, images)),
        _section("scib", _scib_section(report, images)),
        _section("outputs", _outputs_section(report)),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>scvi-scale report</title><style>{STYLE}</style></head><body><main>"
        "<h1>scvi-scale report</h1>"
        f'<p class="lead">{cells["n_cells"]:,} cells; batch key {_text(keys["batch_key"])}, labels key '
        f"{_text(keys['labels_key'])}; generated {_text(report['generated_at'])}.</p>"
        + _cards(cards)
        + "".join(sections)
        + "</main></body></html>\n"
    )

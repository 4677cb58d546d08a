"""A report a person can open: one self-contained HTML file per run and per sweep.

Everything is inside the file: the tables, the plots as PNG data URIs, the config and the
environment; no script, style sheet or font is loaded from anywhere, so it opens offline, from an
e-mail attachment or a CI artifact, as it was written. ``report.html`` in a run directory,
``summary.html`` beside a sweep's ``summary.md``.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Iterable, Optional

from rm_runner.rundir import CONFIG, ENVIRONMENT, METRICS, atomic_write_text, read_json_or_none, read_status

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}.bad{color:#b00}"""


def markdown_tables(text: str) -> str:
    """rm_runner's Markdown (pipe tables and plain lines) as HTML."""
    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
                       + "</table>")
            rows.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):  # the |---| line
                rows.append(cells)
            continue
        flush()
        if line.startswith("#"):
            out.append(f"<h3>{html.escape(line.lstrip('#').strip())}</h3>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}"><figcaption>' \
           f'{html.escape(path.name)}</figcaption></figure>'


def page(title: str, sections: Iterable[tuple[str, str]]) -> str:
    body = "\n".join(f"<h2>{html.escape(heading)}</h2>\n{content}" for heading, content in sections if content)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def _pre(text: Optional[str]) -> str:
    """Long text folded away until clicked (a config, an environment)."""
    return f"<details><summary>show</summary><pre>{html.escape(text)}</pre></details>" if text else ""


def _file(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _plots(folder: Path) -> str:
    return "\n".join(image(p) for p in sorted(folder.glob("*.png")))


def write_sweep_report(sweep_dir: Path, tables: str, jobs: list[Path]) -> Path:
    """``summary.html``: the summary's tables, its plots, the sweep's config, the first job's environment."""
    environment = next((read_json_or_none(j / ENVIRONMENT) for j in jobs if (j / ENVIRONMENT).exists()), None)
    sections = [("Summary", markdown_tables(tables)), ("Plots", _plots(sweep_dir)),
                ("Sweep config (multirun.yaml)", _pre(_file(sweep_dir / "multirun.yaml"))),
                ("Environment (first job)", _pre(json.dumps(environment, indent=2)) if environment else "")]
    target = sweep_dir / "summary.html"
    atomic_write_text(target, page(f"rm_runner sweep: {sweep_dir.name}", sections))
    return target


def write_run_report(run_dir: Path, tables: str = "") -> Path:
    """``report.html``: the run's status, its figures (``tables``: the step's own Markdown, or the
    metrics flattened), its plots, its config and environment."""
    status = read_status(run_dir) or {}
    metrics = read_json_or_none(run_dir / METRICS) or {}
    state = str(status.get("status", "unknown"))
    reason = status.get("reason")
    marked = ' class="bad"' if state not in ("ok", "running") else ""
    said = f": {html.escape(str(reason))}" if reason else ""
    head = f"<p{marked}>status: {html.escape(state)}{said}</p>"
    figures = markdown_tables(tables) if tables else _flat_table(metrics)
    sections = [("Run", head), ("Figures", figures), ("Plots", _plots(run_dir)),
                ("Config (config.yaml)", _pre(_file(run_dir / CONFIG))),
                ("Environment", _pre(_file(run_dir / ENVIRONMENT)))]
    target = run_dir / "report.html"
    atomic_write_text(target, page(f"rm_runner run: {run_dir.name}", sections))
    return target


def _flat_table(metrics: dict[str, Any]) -> str:
    """metrics.json as a two-column table of its scalar leaves (``benchmark.summary.ttft_s.p50.mean``)."""
    rows: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif not isinstance(value, list):
            rows.append((prefix, value))

    walk("", {k: v for k, v in metrics.items() if k != "engine"})
    if not rows:
        return ""
    return "<table><tr><th>figure</th><th>value</th></tr>" + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows) + "</table>"

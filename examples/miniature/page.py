"""report.html: report.md as one self-contained page, with weightgeo's layer x module heatmaps of SFT, OPD and
RLVR (seed 0) and the figures inlined as SVG; geometry.html: weightgeo's own page of those comparisons."""

from __future__ import annotations

import html
import re
from pathlib import Path

import weightgeo
from weightgeo.render.html import STYLE, figures_html

from .plan import Plan

_VERDICT = {"reproduced": "#1a7f37", "contradicted": "#c62828", "inconclusive": "#666", "untestable": "#666"}
_EXTRA_CSS = ".wg img{max-width:100%}.wg .fig svg{max-width:100%;height:auto}.wg td{font-size:.95em}"


def _inline(text: str) -> str:
    t = html.escape(text, quote=False)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)

    def bold(m: re.Match) -> str:
        word = m.group(1)
        colour = _VERDICT.get(word)
        return f'<b style="color:{colour}">{word}</b>' if colour else f"<b>{word}</b>"

    t = re.sub(r"\*\*([^*]+)\*\*", bold, t)
    return re.sub(r"(?<![\w*])\*([^*]+)\*(?![\w*])", r"<em>\1</em>", t)


def _figure(name: str, out: Path) -> str:
    svg = out / (Path(name).stem + ".svg")
    if svg.is_file():
        body = svg.read_text()
        body = body[body.index("<svg") :]
        return f'<div class="fig">{body}</div>'
    return f'<img src="{html.escape(name)}" alt="{html.escape(name)}">'


def md_to_html(md: str, out: Path, inserts: dict[str, str]) -> str:
    """The subset of Markdown report.md uses (headings, tables, bullets, emphasis, code, images), with
    ``inserts[heading]`` placed under that heading."""
    lines, body, i = md.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = re.split(r"(?<!\\)\|", lines[i].strip().strip("|"))
                rows.append([c.strip().replace("\\|", "|") for c in cells])
                i += 1
            head, rest = rows[0], [r for r in rows[2:]]
            body.append(
                "<table><thead><tr>"
                + "".join(f"<th>{_inline(c)}</th>" for c in head)
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest)
                + "</tbody></table>"
            )
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul class='lead'>" + "".join(items) + "</ul>")
            continue
        m = re.match(r"(#+) (.*)", line)
        if m:
            level = len(m.group(1))
            body.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            body.append(inserts.get(m.group(2), ""))
        elif line.startswith("!["):
            name = re.match(r"!\[[^\]]*\]\(([^)]+)\)", line)
            body.append(_figure(name.group(1), out) if name else "")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "".join(body)


def _pair_reports(out: Path, plan: Plan) -> dict[str, weightgeo.Report]:
    """Seed 0's comparisons as weightgeo wrote them beside each run (measure_pair), in the paper's order."""
    want = [
        ("SFT", "sft_s0", plan.sft_steps),
        ("OPD", "opd_s0", plan.opd_steps),
        (f"RLVR@{plan.rlvr_matched}", "rlvr_s0", plan.rlvr_matched),
        ("RLVR", "rlvr_s0", plan.rlvr_steps),
    ]
    runs = {}
    for label, run, step in want:
        p = out / "runs" / run / f"compare_{step}.json"
        if p.is_file() and not (label == "RLVR" and plan.rlvr_steps == plan.rlvr_matched):
            runs[label] = weightgeo.Report.from_json(p)
    return runs


def report_html(md: str, out: Path, plan: Plan) -> str:
    """The page; also writes geometry.html when the comparisons are on disk."""
    runs = _pair_reports(out, plan)
    inserts = {}
    if runs:
        weightgeo.write_html(runs, out / "geometry.html", title="OPD vs SFT vs RLVR: the pair comparisons (seed 0)")
        inserts["Where in the network each method changed weights"] = (
            "<p class='sub'>Seed 0, each method against its start (SFT from the base, OPD and RLVR from the "
            "anchor), over the 24 block matrices. One colour scale per metric for all runs. "
            "<a href='geometry.html'>geometry.html</a> has the per-tensor tables.</p>"
            + figures_html(runs).replace("<h2>Figures</h2>", "").replace("<h3>Where in the network</h3>", "", 1)
        )
    title = md.splitlines()[0].lstrip("# ")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}{_EXTRA_CSS}</style></head><body><div class='wg'>"
        + md_to_html(md, out, inserts)
        + "</div></body></html>\n"
    )

"""Write an analysis folder: analysis.json, the PNGs, and one self-contained HTML report.

The HTML embeds every PNG as base64 and holds the tables (per-layer metrics beside their
baselines, top tokens per expert, knock-out losses), so the one file can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from moekit.analysis import figures
from moekit.analysis.analyze import Analysis


def passage_pieces(analysis: Analysis, sequence: int, layer_pos: int, decode_ids) -> list[tuple[str, int]]:
    """(text, first expert) of each token of `sequence` in MoE layer `layer_pos`, in order.

    `decode_ids(list of ids) -> str`. A token's text is what it adds to the decoded prefix, so a
    character split over several byte-level tokens shows at the token that completes it.
    """
    trace = analysis.trace
    sel = (trace.sequence_N == sequence).nonzero().flatten()
    sel = sel[trace.position_N[sel].argsort()]
    ids = trace.token_ids_N[sel].tolist()
    experts = trace.layers[layer_pos].expert_ids_NK[sel, 0].tolist()
    pieces, prev = [], ""
    for i, e in enumerate(experts):
        full = decode_ids(ids[: i + 1]).rstrip("\ufffd")
        piece = full[len(prev):] if full.startswith(prev) else ""
        prev = full if full.startswith(prev) else prev
        pieces.append((piece, int(e)))
    return pieces


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def summary_rows(data: dict) -> list[list[str]]:
    """One row per layer: each metric as `measured (baseline, baseline)`."""
    rows = []
    for x in data["layers"]:
        loc, cache = x["locality"], figures.cache_row(x)
        dom = x.get("domain")
        rows.append([
            str(x["layer"]), str(x["num_experts"]), f"{x['k']:.2f}",
            f"{x['load']['max_vio']:.3f} ({x['load']['max_vio_uniform']:.3f})",
            _fmt(x["entropy"]["router_entropy_normalized"]), f"{x['dropped_fraction']:.3f}",
            "-" if dom is None else f"{dom['mean_max_share']:.3f} ({dom['mean_max_share_shuffled']:.3f}, "
                                    f"{dom['uniform']:.3f})",
            f"{x['vocabulary']['score']:.3f} ({x['vocabulary']['score_shuffled']:.3f}, "
            f"{x['vocabulary']['uniform']:.3f})",
            f"{x['coactivation']['mean_max']:.3f} ({x['coactivation']['uniform']:.3f})",
            f"{loc['same_first']:.3f} ({loc['same_first_random_pairs']:.3f}, {loc['same_first_uniform']:.3f})",
            f"{loc['share_any']:.3f} ({loc['share_any_random_pairs']:.3f}, {loc['share_any_uniform']:.3f})",
            f"{cache['lru_hit_rate']:.3f} ({cache['lru_hit_rate_shuffled']:.3f}, {cache['uniform']:.3f})",
        ])
    return rows


SUMMARY_HEADER = ["layer", "E", "k", "MaxVio (random routing)", "entropy / log E", "dropped",
                  "domain max share (shuffled labels, k/E)", "vocabulary (shuffled ids, k/E)",
                  "max P(b|a) (uniform)", "next token same first expert (random pairs, 1/E)",
                  "next token shares an expert (random pairs, uniform)",
                  "LRU hit rate, cache of k experts (shuffled order, uniform routing)"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></p>'


def _html_passage(pieces: list[tuple[str, int]], num_experts: int) -> str:
    colors = figures.expert_colors(num_experts)
    spans = "".join(f'<span style="background:{colors[e]}88" title="expert {e}">{html.escape(t)}</span>'
                    for t, e in pieces)
    return f'<pre class="passage">{spans}</pre>'


def write_report(analysis: Analysis, out: str | Path, *, decode_ids=None, title: str = "moekit analyze",
                 sample_sequence: int | None = None) -> dict[str, Path]:
    """analysis.json, the PNGs and report.html in `out`; returns {name: path} of what was written.

    decode_ids: list of token ids -> text, for the coloured passage (sequence `sample_sequence`,
    default the trace's first).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"analysis.json": analysis.save_json(out / "analysis.json")}
    data = analysis.to_dict()
    for name, make in (("domain_expert.png", figures.domain_heatmaps),
                       ("coactivation.png", figures.coactivation_heatmaps),
                       ("baselines.png", figures.baselines_chart),
                       ("saturation.png", figures.saturation_curves),
                       ("knockout.png", figures.knockout_bars)):
        path = make(data, out / name)
        if path is not None:
            written[name] = path
    passages_html = []
    if decode_ids is not None and analysis.trace.num_tokens:
        seq = int(analysis.trace.sequence_N[0]) if sample_sequence is None else sample_sequence
        positions = sorted({0, len(analysis.trace.layers) - 1})
        for pos in positions:
            lt = analysis.trace.layers[pos]
            pieces = passage_pieces(analysis, seq, pos, decode_ids)
            name = f"tokens_layer{lt.layer}.png"
            written[name] = figures.coloured_text(
                pieces, lt.num_experts, out / name,
                title=f"sequence {seq}, layer {lt.layer}: each token on its first expert's colour")
            passages_html.append(f"<h3>layer {lt.layer}</h3>" + _html_passage(pieces, lt.num_experts))
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>{analysis.info.get('tokens', 0):,} tokens in {analysis.info.get('sequences', 0):,} sequences; "
             f"domains: {html.escape(', '.join(analysis.info.get('label_names') or ['(none)']))}</p>",
             "<h2>Metrics beside their null baselines</h2>", _table(SUMMARY_HEADER, summary_rows(data))]
    for name, heading in (("baselines.png", "Measured vs baseline"),
                          ("domain_expert.png", "Domain x expert (share of the domain's tokens / k/E)"),
                          ("coactivation.png", "Co-activation P(b | a)"),
                          ("saturation.png", "Router saturation over training"),
                          ("knockout.png", "Knock-out: loss change with one expert disabled")):
        if name in written:
            parts += [f"<h2>{heading}</h2>", _img(written[name])]
    ko = data.get("knockout")
    if ko:
        rows = [[str(x["layer"]), str(r["expert"]), str(r["tokens"]), f"{r['loss']:.4f}", f"{r['delta']:+.4f}"]
                for x, layer_rows in zip(data["layers"], ko["experts"]) for r in layer_rows]
        rows += [[str(x["layer"]), "shared", "all", f"{s['loss']:.4f}", f"{s['delta']:+.4f}"]
                 for x, s in zip(data["layers"], ko["shared"]) if s is not None]
        parts += [f"<p>full model loss {ko['base_loss']:.4f}; method {html.escape(str(ko['method']))}</p>",
                  "<details><summary>knock-out table</summary>"
                  + _table(["layer", "expert", "tokens", "loss", "delta"], rows) + "</details>"]
    if passages_html:
        parts += ["<h2>A passage coloured by first expert</h2>", *passages_html]
        parts += [_img(written[n]) for n in written if n.startswith("tokens_layer")]
    top_rows = []
    for x in data["layers"]:
        for e, entries in enumerate(x["vocabulary"]["top_tokens"]):
            shown = ", ".join(f"{entry[3] if len(entry) > 3 else entry[0]!r} {entry[1]:.2f}" for entry in entries)
            top_rows.append([str(x["layer"]), str(e), shown])
    parts += ["<h2>Top tokens per expert (share of the token's occurrences at that expert)</h2>",
              "<details><summary>table</summary>" + _table(["layer", "expert", "tokens"], top_rows) + "</details>"]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
             ".passage{white-space:pre-wrap;font-size:13px}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    report = out / "report.html"
    report.write_text(page, encoding="utf-8")
    written["report.html"] = report
    return written

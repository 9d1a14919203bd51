"""Reports for load-generator results: ``results.json``, a markdown table and PNG plots.

Everything here works on the JSON document (``SweepResult.to_dict()``), so a saved
``results.json`` can be re-rendered or compared with a peer's run later::

    python -m load_tests.report ours/results.json peer/results.json --out compare/

Plots use matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend
change) and are skipped when matplotlib is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
LATENCY_PNG = "latency_vs_throughput.png"
TTFT_PNG = "ttft_hist.png"


def write_results(out: Path, doc: dict[str, Any], markdown: str) -> None:
    """``results.json`` and ``results.md`` under ``out`` (created), and the markdown on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(doc, indent=2) + "\n")
    (out / RESULTS_MD).write_text(markdown)
    print(markdown)


def _as_dict(result: Any, raw: bool = False) -> dict[str, Any]:
    """Accept a SweepResult (anything with ``to_dict``) or an already-loaded JSON document."""
    return result.to_dict(raw=raw) if hasattr(result, "to_dict") else result


def _run_name(doc: dict[str, Any]) -> str:
    cfg = doc.get("config", {})
    return cfg.get("label") or doc.get("environment", {}).get("target") or "run"


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _stat(level: dict[str, Any], key: str, q: str) -> Any:
    block = level.get(key)
    return block.get(q) if isinstance(block, dict) else None


def _errors_cell(errors: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in errors.items()) if errors else "–"


def markdown_table(docs: Sequence[dict[str, Any]]) -> str:
    """One row per level (per run when comparing); latency columns in milliseconds."""
    multi = len(docs) > 1
    streaming = any(d.get("config", {}).get("stream") for d in docs)
    cols = ["Level", "Requests", "OK", "Errors", "Dropped", "Duration s", "Req/s", "Out tok/s"]
    cols += ["Lat p50", "Lat p90", "Lat p99", "Lat mean", "Lat max"]
    if streaming:
        cols += ["TTFT p50", "TTFT p90", "TTFT p99", "ITL p50", "ITL p90", "ITL p99"]
    if multi:
        cols = ["Run", *cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for doc in docs:
        for lv in doc.get("levels", []):
            row = [
                lv.get("level", ""),
                _fmt(lv.get("requests")),
                _fmt(lv.get("ok")),
                _errors_cell(lv.get("errors") or {}),
                _fmt(lv.get("dropped_by_client")),
                _fmt(lv.get("duration_s"), 2),
                _fmt(lv.get("throughput_rps"), 2),
                _fmt(lv.get("output_tokens_per_s"), 1),
            ]
            row += [_fmt(_stat(lv, "latency_ms", q)) for q in ("p50", "p90", "p99", "mean", "max")]
            if streaming:
                row += [_fmt(_stat(lv, "ttft_ms", q)) for q in ("p50", "p90", "p99")]
                row += [_fmt(_stat(lv, "itl_ms", q)) for q in ("p50", "p90", "p99")]
            if multi:
                row = [_run_name(doc), *row]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def markdown_report(results: Any | Sequence[Any]) -> str:
    """A short header (what, where, when) and the level table."""
    docs = [_as_dict(r) for r in results] if isinstance(results, (list, tuple)) else [_as_dict(results)]
    out = ["# Load test results", ""]
    for doc in docs:
        cfg, env = doc.get("config", {}), doc.get("environment", {})
        name = f"**{cfg['label']}**: " if cfg.get("label") else ""
        out.append(
            f"- {name}`{cfg.get('scenario')}` ({cfg.get('scenario_description', '')}) against "
            f"`{env.get('target')}` on {env.get('date')} from {env.get('hostname')} "
            f"({env.get('platform')}); {cfg.get('mode')} loop, ≤{cfg.get('requests_per_level')} requests "
            f"and ≤{cfg.get('duration_per_level_s')} s per level, timeout {cfg.get('timeout_s')} s"
        )
    out += [
        "",
        markdown_table(docs),
        "",
        "Latency, TTFT and inter-token latency (ITL) in ms over successful requests; Req/s counts "
        "successful requests. Errors are keyed by HTTP status or client-side exception.",
        "",
    ]
    return "\n".join(out)


def _figure() -> Any | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=(7.5, 5), dpi=110, layout="constrained")


def plot_latency_vs_throughput(results: Any | Sequence[Any], path: str | Path) -> bool:
    """p50 and p99 latency against achieved throughput, one point per level, line per run.

    Returns False (and writes nothing) when matplotlib is missing or there is nothing to plot.
    """
    docs = [_as_dict(r) for r in results] if isinstance(results, (list, tuple)) else [_as_dict(results)]
    fig = _figure()
    if fig is None:
        return False
    ax = fig.add_subplot()
    plotted = False
    for i, doc in enumerate(docs):
        levels = [lv for lv in doc.get("levels", []) if _stat(lv, "latency_ms", "p50") is not None]
        if not levels:
            continue
        x = [lv["throughput_rps"] for lv in levels]
        color = f"C{i % 10}"
        name = _run_name(doc) if len(docs) > 1 else ""
        for q, style in (("p50", "-o"), ("p99", "--^")):
            ax.plot(x, [lv["latency_ms"][q] for lv in levels], style, color=color, label=f"{name} {q}".strip())
        for lv, xv in zip(levels, x, strict=True):
            ax.annotate(
                lv.get("level", ""),
                (xv, lv["latency_ms"]["p50"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, -10),
            )
        plotted = True
    if not plotted:
        return False
    ax.set_xlabel("throughput (successful requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency vs throughput")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return True


def plot_ttft_hist(results: Any | Sequence[Any], path: str | Path) -> bool:
    """Histogram of time to first token per level (streaming scenarios only).

    Returns False (and writes nothing) when matplotlib is missing or no level has TTFT samples.
    """
    docs = [_as_dict(r) for r in results] if isinstance(results, (list, tuple)) else [_as_dict(results)]
    series: list[tuple[str, list[float]]] = []
    for doc in docs:
        prefix = f"{_run_name(doc)} " if len(docs) > 1 else ""
        for lv in doc.get("levels", []):
            samples = lv.get("ttft_samples_ms") or []
            if samples:
                series.append((f"{prefix}{lv.get('level', '')}", samples))
    if not series:
        return False
    fig = _figure()
    if fig is None:
        return False
    ax = fig.add_subplot()
    lo = min(min(s) for _, s in series)
    hi = max(max(s) for _, s in series)
    bins = 40 if hi > lo else 1
    for i, (name, samples) in enumerate(series):
        ax.hist(
            samples,
            bins=bins,
            range=(lo, hi if hi > lo else lo + 1),
            histtype="step",
            linewidth=1.5,
            color=f"C{i % 10}",
            label=f"{name} (n={len(samples)})",
        )
    ax.set_xlabel("time to first token (ms)")
    ax.set_ylabel("requests")
    ax.set_title("TTFT distribution")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return True


def write_json(result: Any, path: str | Path, raw: bool = False) -> Path:
    """Write the results document (per-request records only when ``raw``)."""
    p = Path(path)
    p.write_text(json.dumps(_as_dict(result, raw=raw), indent=2) + "\n", encoding="utf-8")
    return p


def write_report(result: Any, out_dir: str | Path, raw: bool = False) -> dict[str, Path]:
    """Write results.json, results.md and (matplotlib permitting) the PNGs; return what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = _as_dict(result, raw=raw)
    written = {"json": write_json(doc, out / RESULTS_JSON)}
    md = out / RESULTS_MD
    md.write_text(markdown_report(doc), encoding="utf-8")
    written["markdown"] = md
    if plot_latency_vs_throughput(doc, out / LATENCY_PNG):
        written["latency_plot"] = out / LATENCY_PNG
    if plot_ttft_hist(doc, out / TTFT_PNG):
        written["ttft_plot"] = out / TTFT_PNG
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Re-render or compare saved results: one table and shared plots for all given files."""
    p = argparse.ArgumentParser(prog="python -m load_tests.report", description=main.__doc__)
    p.add_argument("results", nargs="+", type=Path, help="results.json files")
    p.add_argument("--out", type=Path, required=True, help="directory for results.md and PNGs")
    args = p.parse_args(argv)
    docs = [json.loads(f.read_text(encoding="utf-8")) for f in args.results]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / RESULTS_MD).write_text(markdown_report(docs), encoding="utf-8")
    plot_latency_vs_throughput(docs, args.out / LATENCY_PNG)
    plot_ttft_hist(docs, args.out / TTFT_PNG)
    print(markdown_report(docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The result file (JSON) and the report (one self-contained HTML page).

The JSON (schema ``meridian.loadtest/1``) holds the host, the command, and
per scenario: its parameters, targets, steps, every round's result on every
target (figures, per-operation figures, time series, server process
samples, scenario extras), the summary figures with ratios, checks and
notes. Non-finite numbers become ``null``: the file is strict JSON.

The HTML page needs nothing else (no script, no stylesheet, no image file):
a summary table, then per scenario its figures, a comparison chart of the
targets, and per step the latency percentiles, throughput and errors over
time as inline SVG; plus what a scenario adds (a rollout's completion curve
and bytes per region, replication lag per region, a soak's memory and file
descriptors over time and its verdict).
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from loadtest.common import write_json
from loadtest.harness import fmt_value, median_round
from loadtest.svg import DASHES, PALETTE, Series, bar_chart, line_chart

CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;
line-height:1.4;padding:0 12px}
h1{font-size:24px}h2{font-size:20px;border-bottom:2px solid #ddd;padding-bottom:4px;
margin-top:40px}h3{font-size:16px;margin-top:28px}h4{font-size:14px;margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}
tr.sub td:first-child{padding-left:22px;color:#555}
.better{color:#1a7f37;font-weight:600}.worse{color:#b42318;font-weight:600}
.pass{color:#1a7f37;font-weight:700}.fail{color:#b42318;font-weight:700}
.muted{color:#777;font-size:12px}svg.chart{display:block;margin:6px 0 14px;max-width:100%;
height:auto;border:1px solid #eee}code{background:#f4f4f4;padding:0 3px}
.kv td{text-align:left}
"""


def write_result(doc: dict[str, Any], path: Path) -> None:
    write_json(doc, path)


def load_result(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _num(v: Any) -> str:
    return escape(fmt_value(v))


def _table(head: list[str], rows: list[list[Any]], cls: str = "") -> str:
    """An HTML table; cells are formatted with ``_num`` (str cells: escaped)."""
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_num(c)}</td>" for c in r) + "</tr>" for r in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><tr>{th}</tr>{body}</table>"


def _color(names: list[str], name: str) -> str:
    return PALETTE[names.index(name) % len(PALETTE)] if name in names else PALETTE[0]


def figures_table(rows: list[dict[str, Any]], names: list[str], baseline: str | None) -> str:
    others = [n for n in names if n != baseline] if baseline else []
    head = "".join(f"<th>{escape(n)}</th>" for n in names)
    head += "".join(f"<th>{escape(n)} vs {escape(baseline or '')}</th>" for n in others)
    out = [f'<table class="figures"><tr><th>figure</th>{head}</tr>']
    for r in rows:
        sub = r["label"].startswith(" ")
        unit = f" ({escape(r['unit'])})" if r.get("unit") else ""
        cells = "".join(f"<td>{_num(r['values'].get(n))}</td>" for n in names)
        for n in others:
            q = r.get("ratios", {}).get(n)
            if q is None:
                cells += "<td>-</td>"
            else:
                cls = "better" if q > 1.05 else "worse" if q < 0.95 else ""
                cells += f'<td class="{cls}">{q:.2f}x</td>'
        out.append(
            f'<tr class="{"sub" if sub else ""}"><td>{escape(r["label"].strip())}{unit}</td>'
            f"{cells}</tr>"
        )
    out.append("</table>")
    if others:
        out.append(
            f'<p class="muted">ratio: how much better than {escape(baseline or "")}: '
            f"X/{escape(baseline or '')} for rates, {escape(baseline or '')}/X for times, "
            "latencies and CPU; &gt; 1 means better.</p>"
        )
    return "\n".join(out)


def _step_charts(sc: dict[str, Any], step: dict[str, Any], names: list[str]) -> str:
    """Latency percentiles, throughput and errors over time, all targets."""
    lat: list[Series] = []
    thr: list[Series] = []
    err: list[Series] = []
    byte_rate = step["bytes_heavy"] or step["primary"] == "mib_s"
    for n in names:
        res = median_round(sc["results"].get(n, {}).get(step["id"], []), step["primary"])
        ts = res and res.get("timeseries")
        if not ts:
            continue
        c = _color(names, n)
        for i, q in enumerate(("p50", "p90", "p99")):
            lat.append(Series(f"{n} {q}", ts["t"], ts[f"{q}_ms"], c, DASHES[i]))
        key = "mib_s" if byte_rate else "rps"
        thr.append(Series(n, ts["t"], ts[key], c))
        err.append(Series(n, ts["t"], ts["errors"], c))
    if not lat:
        return '<p class="muted">no time series (measured by a C load generator: summary only)</p>'
    unit = "MiB/s" if byte_rate else "requests/s"
    return "\n".join(
        [
            "<h4>Latency percentiles over time</h4>",
            line_chart(
                lat, title=f"{step['label']}: latency p50 / p90 / p99", y_label="ms per request"
            ),
            "<h4>Throughput over time</h4>",
            line_chart(thr, title=f"{step['label']}: throughput", y_label=unit),
            "<h4>Errors over time</h4>",
            line_chart(err, title=f"{step['label']}: errors per bucket", y_label="errors"),
        ]
    )


def _comparison(sc: dict[str, Any], names: list[str]) -> str:
    """Bar charts of each step's primary figure, per target (one chart per unit)."""
    by_unit: dict[str, list[dict[str, Any]]] = {}
    for s in sc["steps"]:
        by_unit.setdefault(s["unit"], []).append(s)
    parts = []
    rows = {r["step"]: r for r in sc["figures"] if not r["label"].startswith(" ")}
    for unit, steps in by_unit.items():
        cats = [s["label"] for s in steps]
        series = [
            (n, [rows.get(s["id"], {}).get("values", {}).get(n) for s in steps]) for n in names
        ]
        better = "higher is better" if steps[0]["higher_is_better"] else "lower is better"
        parts.append(
            bar_chart(
                cats,
                series,
                title=f"{sc['title']}: {unit} ({better}; median of {sc['rounds']} round(s))",
                y_label=unit,
                width=max(760, 120 * len(cats)),
            )
        )
    return "\n".join(parts)


def _rollout_extra(sc: dict[str, Any], names: list[str]) -> str:
    parts = []
    curves = []
    regions: dict[str, dict[str, float]] = {}
    table = []
    for n in names:
        res = median_round(sc["results"].get(n, {}).get("rollout", []), "all_done_s")
        if not res:
            continue
        ex = res["extra"]
        secs = ex.get("node_seconds", [])
        curves.append(Series(n, secs, list(range(1, len(secs) + 1)), _color(names, n)))
        for region, b in ex.get("bytes_by_region", {}).items():
            regions.setdefault(region, {})[n] = b / (1 << 20)
        for region, v in ex.get("requests_by_region", {}).items():
            mib = ex.get("bytes_by_region", {}).get(region, 0) / (1 << 20)
            table.append(
                [
                    n,
                    region,
                    mib,
                    v.get("router_routed"),
                    v.get("router_redirected"),
                    v.get("node_requests"),
                ]
            )
    parts.append("<h4>Nodes done over time</h4>")
    parts.append(
        line_chart(
            curves,
            title="rollout: nodes whose pull has finished",
            x_label="seconds since the rollout began",
            y_label="nodes done",
        )
    )
    if regions:
        cats = sorted(regions)
        parts.append("<h4>Bytes served per region</h4>")
        parts.append(
            bar_chart(
                cats,
                [(n, [regions[c].get(n) for c in cats]) for n in names],
                title="rollout: MiB served per region (client side)",
                y_label="MiB",
            )
        )
    if table:
        head = ["target", "region", "MiB served", "router: routed", "router: redirected"]
        parts.append(_table([*head, "node requests"], table))
    return "\n".join(parts)


def _multiregion_extra(sc: dict[str, Any], names: list[str]) -> str:
    parts = []
    for n in names:
        for res in sc["results"].get(n, {}).get("multiregion", [])[-1:]:
            ex = res["extra"]
            sites = ex.get("sites", {})
            rep = ex.get("replication", {})
            charts = (
                (
                    "Pull latency per site",
                    sites,
                    [(q, f"{q}_ms") for q in ("p50", "p99")],
                    f"{n}: image pull (or push, at the pushing site) latency per site",
                    "ms",
                ),
                (
                    "Replication lag per region",
                    rep,
                    [
                        ("p50 (on disk)", "lag_p50_s"),
                        ("p99 (on disk)", "lag_p99_s"),
                        ("node's mean", "node_lag_mean_s"),
                    ],
                    f"{n}: replication lag, push acknowledged -> image whole in region",
                    "seconds",
                ),
            )
            for heading, table, keys, title, unit in charts:
                cats = sorted(table)
                series = [(label, [table[c].get(k) for c in cats]) for label, k in keys]
                parts.append(f"<h4>{heading}</h4>")
                parts.append(bar_chart(cats, series, title=title, y_label=unit))
            lags: dict[str, list[tuple[int, float]]] = {}
            for lag in ex.get("lags", []):
                k = int(str(lag["push"]).lstrip("v") or 0)
                lags.setdefault(lag["to"], []).append((k, lag["lag_s"]))
            series = [
                Series(region, [k for k, _ in sorted(v)], [x for _, x in sorted(v)], PALETTE[i])
                for i, (region, v) in enumerate(sorted(lags.items()))
            ]
            parts.append(
                line_chart(
                    series,
                    title=f"{n}: replication lag of each push",
                    x_label="push number",
                    y_label="seconds",
                )
            )
            head = ["site", "role", "images", "errors", "p50 ms", "p99 ms"]
            head += ["MiB served by region", "RTT to regions (ms)"]
            rows = [
                [
                    site,
                    s["role"],
                    s["requests"],
                    s["errors"],
                    s["p50_ms"],
                    s["p99_ms"],
                    _regions_text(s.get("bytes_by_region", {})),
                    _rtt_text(s.get("rtt_ms", {})),
                ]
                for site, s in sorted(sites.items())
            ]
            parts.append(_table(head, rows))
            head = ["region", "pushes seen", "not replicated", "lag p50 s", "lag p99 s"]
            head += ["lag max s", "node: images", "node: mean lag s"]
            keys = ["observed", "not_replicated", "lag_p50_s", "lag_p99_s", "lag_max_s"]
            keys += ["node_lag_count", "node_lag_mean_s"]
            parts.append(_table(head, [[r, *(v[k] for k in keys)] for r, v in sorted(rep.items())]))
    return "\n".join(parts)


def _regions_text(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v / (1 << 20):.1f}" for k, v in sorted(d.items())) or "-"


def _rtt_text(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(d.items()) if v is not None) or "-"


def _process_charts(sc: dict[str, Any], names: list[str]) -> str:
    """Memory and file descriptors of every server process over the run."""
    rss: list[Series] = []
    fds: list[Series] = []
    i = 0
    for n in names:
        for step in sc["steps"]:
            for res in sc["results"].get(n, {}).get(step["id"], [])[-1:]:
                for proc, s in res["process"]["series"].items():
                    c = PALETTE[i % len(PALETTE)]
                    i += 1
                    label = proc if proc == n else f"{n}: {proc}"
                    rss.append(Series(label, s["t"], s["rss_mb"], c))
                    fds.append(Series(label, s["t"], s["fds"], c))
    return "\n".join(
        [
            "<h4>Resident memory (VmRSS) over time</h4>",
            line_chart(rss, title="server processes: VmRSS", y_label="MiB"),
            "<h4>Open file descriptors over time</h4>",
            line_chart(fds, title="server processes: open fds", y_label="fds"),
        ]
    )


def _checks(checks: dict[str, Any]) -> str:
    if not checks:
        return ""
    verdict = "PASSED" if checks.get("passed") else "FAILED"
    parts = [f'<p>Soak verdict: <span class="{verdict.lower()[:4]}">{verdict}</span></p>']
    rows: list[list[Any]] = []
    for t, per in checks.get("targets", {}).items():
        for proc, v in per.get("processes", {}).items():
            r, f = v["rss_mib"], v["fds"]
            rows.append(
                [
                    t,
                    proc,
                    r.get("early"),
                    r.get("late"),
                    r.get("limit"),
                    r.get("flat"),
                    f.get("early"),
                    f.get("late"),
                    f.get("flat"),
                ]
            )
        rows.append(
            [
                t,
                "requests / errors / worker failures",
                per.get("requests"),
                per.get("errors"),
                per.get("worker_failures"),
                "",
                "",
                "",
                "",
            ]
        )
    head = ["target", "process", "RSS early MiB", "RSS late MiB", "RSS limit", "RSS flat"]
    parts.append(_table([*head, "fds early", "fds late", "fds flat"], rows))
    return "\n".join(parts)


def _kv(d: dict[str, Any]) -> str:
    rows = [[k, json.dumps(v, default=str)] for k, v in d.items()]
    return _table(["parameter", "value"], rows, "kv")


def scenario_html(sc: dict[str, Any]) -> str:
    names = [t["name"] for t in sc["targets"]]
    parts = [
        f'<section class="scenario" id="scenario-{escape(sc["scenario"])}">',
        f"<h2>{escape(sc['title'])} <span class='muted'>({escape(sc['scenario'])})</span></h2>",
        f"<p>{escape(sc['description'])}</p>",
        "<h3>Targets</h3>",
        _table(
            ["name", "URL", "kind", "version", "server processes (PID)"],
            [
                [
                    t["name"],
                    t["url"],
                    t["kind"],
                    t.get("version") or "",
                    ", ".join(f"{k} ({v})" for k, v in t["pids"].items()) or "-",
                ]
                for t in sc["targets"]
            ],
        ),
        "<h3>Parameters</h3>",
        _kv(sc["params"]),
        f"<h3>Figures <span class='muted'>(median of {sc['rounds']} interleaved "
        "round(s))</span></h3>",
        figures_table(sc["figures"], names, sc.get("baseline")),
        "<h3>Comparison</h3>",
        _comparison(sc, names),
    ]
    if sc["scenario"] == "soak":
        parts += ["<h3>Soak checks</h3>", _checks(sc.get("checks", {}))]
        parts += ["<h3>Server processes</h3>", _process_charts(sc, names)]
    if sc["scenario"] == "rollout":
        parts += ["<h3>Rollout</h3>", _rollout_extra(sc, names)]
    if sc["scenario"] == "multiregion":
        parts += ["<h3>Sites and regions</h3>", _multiregion_extra(sc, names)]
    for step in sc["steps"]:
        parts.append(
            f'<h3 class="step" id="step-{escape(step["id"])}">Step: {escape(step["label"])}</h3>'
        )
        parts.append(_step_charts(sc, step, names))
        errs: dict[str, int] = {}
        msgs: list[str] = []
        for n in names:
            for res in sc["results"].get(n, {}).get(step["id"], []):
                for k, v in res.get("errors", {}).items():
                    errs[f"{n}: {k}"] = errs.get(f"{n}: {k}", 0) + v
                msgs += [f"{n}: {m}" for m in res.get("worker_failures", [])]
        if errs or msgs:
            rows = [[k, v] for k, v in errs.items()] + [[m[:300], "-"] for m in msgs]
            parts += ["<h4>Errors</h4>", _table(["what", "count"], rows)]
    if sc.get("notes"):
        parts.append("<h3>Notes</h3><ul>")
        parts += [f"<li>{escape(n)}</li>" for n in sc["notes"]]
        parts.append("</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def render_html(doc: dict[str, Any]) -> str:
    scenarios = doc.get("scenarios", [])
    title = "Meridian load test: " + ", ".join(s["scenario"] for s in scenarios)
    if doc.get("kind") == "compare":
        title = "Meridian vs CNCF Distribution: loadtest compare"
    host = doc.get("host", {})
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p class='muted'>{escape(doc.get('created_at', ''))} on "
        f"{escape(str(host.get('hostname')))}: "
        f"{escape(str(host.get('cpus')))} CPU(s), {escape(str(host.get('platform')))}, Python "
        f"{escape(str(host.get('python')))}; load average at start "
        f"{escape(str(host.get('loadavg_start')))}. Command: "
        f"<code>{escape(' '.join(doc.get('command', {}).get('argv', [])))}</code></p>",
        "<p class='muted'>Clients (worker processes), servers and the harness share this "
        "machine's CPUs: absolute figures are bounded by that contention; compare the "
        "targets side by side (interleaved rounds) and read the ratios.</p>",
    ]
    summary = doc.get("summary")
    if summary:
        head += [
            '<section id="summary"><h2>Summary</h2>',
            figures_table(summary["rows"], summary["targets"], summary.get("baseline")),
        ]
        if summary.get("notes"):
            head += ["<ul>"] + [f"<li>{escape(n)}</li>" for n in summary["notes"]] + ["</ul>"]
        head.append("</section>")
    else:
        head.append('<section id="summary"><h2>Summary</h2>')
        for sc in scenarios:
            names = [t["name"] for t in sc["targets"]]
            head.append(f"<h3>{escape(sc['title'])}</h3>")
            head.append(figures_table(sc["figures"], names, sc.get("baseline")))
        head.append("</section>")
    body = [scenario_html(sc) for sc in scenarios]
    return "\n".join(head + body + ["</body></html>"])


def write_html(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(render_html(doc))
    tmp.replace(path)

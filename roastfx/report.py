"""Plan reports: a terminal table, a versioned JSON document and a self-contained HTML page.

Every time in a report is *predicted* by passes/cost_model.py from the plan's
hardware profile; nothing here measures anything.
"""
from __future__ import annotations

import html
import io
import json
import math

from roastfx.passes.cost_model import (
    analytic_load, exact_load_feasible, expected_collisions, geometry, itemsize, positions, slot_load_by_tiles,
    costs, symbolic_costs, tile_offsets,
)
from roastfx.codegen.reference import GROUPED
from roastfx.plan import Plan
from roastfx.profiles import PROFILES, HardwareProfile, get_profile

REPORT_FORMAT = "roastfx-plan-report"
REPORT_VERSION = 1
REPORT_TOKENS = 512


def _profile(plan: Plan, profile) -> HardwareProfile:
    if profile is not None:
        return get_profile(profile)
    return PROFILES.get(plan.target) or get_profile("auto")


def analyze(plan: Plan, profile=None, tokens: int = REPORT_TOKENS, exact_load: bool | None = None) -> dict:
    """Per-site and total figures of a plan on a profile at ``tokens`` tokens (JSON-ready)."""
    prof = _profile(plan, profile)
    mem_item = itemsize(plan.memory_dtype)
    mappings = [s.mapping for s in plan.sites]
    collisions = expected_collisions(mappings)
    sites = []
    for site, coll in zip(plan.sites, collisions):
        m = site.mapping
        # every op that reads the weight (a tied embedding's lookup and its lm_head GEMM), costs summed
        groups = site.shape[0] if site.op == GROUPED else 1
        per_op = [geometry(m, op, site.dtype, prof, memory_size=plan.memory_size, memory_itemsize=mem_item,
                           groups=groups) for op in site.ops]
        parts = [costs(g, prof, tokens) for g in per_op]
        c = {k: sum(p[k] for p in parts) for k in ("flops", "dram_bytes", "l2_bytes", "t_forward", "t_train")}
        exprs = [symbolic_costs(g, prof) for g in per_op]
        expr = {k: sum((e[k] for e in exprs[1:]), exprs[0][k]) for k in ("t_forward", "t_train")}
        sites.append({
            "name": site.name, "shape": list(site.shape), "op": "+".join(site.ops), "tile": [m.tile_rows, m.tile_cols],
            "alignment": m.alignment, "positions": positions(m), "window": [m.window_start, m.window_size],
            "memory_share": site.numel / plan.dense_numel, "expected_collisions": coll,
            "flops": float(c["flops"]), "dram_bytes": float(c["dram_bytes"]), "l2_bytes": float(c["l2_bytes"]),
            "predicted_forward_s": float(c["t_forward"]), "predicted_train_s": float(c["t_train"]),
            "forward_s_of_T": str(expr["t_forward"]), "train_s_of_T": str(expr["t_train"]),
        })
    dense_bytes = sum(s.numel * itemsize(s.dtype) for s in plan.sites)
    compressed_bytes = plan.memory_size * mem_item
    load = analytic_load(mappings, plan.memory_size)
    load["source"] = "analytic"
    if exact_load if exact_load is not None else exact_load_feasible(mappings, plan.memory_size):
        counts = slot_load_by_tiles(mappings, plan.memory_size)
        hist = counts.bincount()
        load.update(source="exact", max=int(counts.max()), std=float(counts.double().std()),
                    empty_slots=int(hist[0]), histogram=[int(h) for h in hist])
    totals = {
        "sites": len(sites), "dense_numel": plan.dense_numel, "memory_size": plan.memory_size,
        "dense_bytes": dense_bytes, "compressed_bytes": compressed_bytes, "ratio": dense_bytes / compressed_bytes,
        "flops": sum(s["flops"] for s in sites), "dram_bytes": sum(s["dram_bytes"] for s in sites),
        "l2_bytes": sum(s["l2_bytes"] for s in sites),
        "predicted_forward_s": sum(s["predicted_forward_s"] for s in sites),
        "predicted_train_s": sum(s["predicted_train_s"] for s in sites), "slot_load": load,
    }
    return {"profile": prof.name, "tokens": tokens, "predicted": True, "sites": sites, "totals": totals}


# -- JSON -------------------------------------------------------------------------------------------------
def plan_to_json(plan: Plan, profile=None, tokens: int = REPORT_TOKENS) -> str:
    """The plan (its own schema, unchanged) and the report fields, as one versioned document."""
    doc = {"format": REPORT_FORMAT, "report_version": REPORT_VERSION, "plan": plan.to_dict(),
           "report": analyze(plan, profile, tokens)}
    return json.dumps(doc, indent=1, sort_keys=True)


def plan_from_json(text: str) -> Plan:
    """The plan of a report document (or of a bare plan JSON)."""
    doc = json.loads(text)
    if doc.get("format") == REPORT_FORMAT:
        if doc.get("report_version") != REPORT_VERSION:
            raise ValueError(f"report_version {doc.get('report_version')!r} is not supported; "
                             f"this roastfx reads {REPORT_VERSION}")
        doc = doc["plan"]
    return Plan.from_dict(doc)


# -- terminal ---------------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def fmt_seconds(s: float) -> str:
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_count(n: float) -> str:
    for unit, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= f:
            return f"{n / f:.3g}{unit}"
    return f"{n:.0f}"


_COLUMNS = ("site", "shape", "op", "tile", "align", "share", "collisions", "fwd time", "FLOPs", "bytes")


def _rows(report: dict) -> list[tuple[str, ...]]:
    return [(
        s["name"], "x".join(map(str, s["shape"])), s["op"], f"{s['tile'][0]}x{s['tile'][1]}", str(s["alignment"]),
        f"{100 * s['memory_share']:.1f}%", f"{s['expected_collisions']:.2f}", fmt_seconds(s["predicted_forward_s"]),
        fmt_count(s["flops"]), fmt_bytes(s["dram_bytes"] + s["l2_bytes"]),
    ) for s in report["sites"]]


def _footer(plan: Plan, report: dict) -> list[str]:
    t, load = report["totals"], report["totals"]["slot_load"]
    return [
        f"dense {fmt_bytes(t['dense_bytes'])} -> compressed {fmt_bytes(t['compressed_bytes'])} "
        f"({t['ratio']:.1f}x smaller); {t['sites']} sites, memory of {t['memory_size']:,} {plan.memory_dtype} slots",
        f"predicted on {report['profile']} at T={report['tokens']} tokens: forward {fmt_seconds(t['predicted_forward_s'])}, "
        f"forward+backward {fmt_seconds(t['predicted_train_s'])} (a model, not a measurement)",
        f"slot load ({load['source']}): mean {load['mean']:.2f}, std {load['std']:.2f}"
        + (f", max {load['max']}, empty slots {load['empty_slots']:,}" if "max" in load else ""),
    ] + [f"note: {n}" for n in plan.notes]


def plan_report(plan: Plan, profile=None, tokens: int = REPORT_TOKENS, width: int = 160) -> str:
    """The plan as a terminal table (rich if installed, plain text otherwise)."""
    report = analyze(plan, profile, tokens)
    rows, footer = _rows(report), _footer(plan, report)
    title = f"roastfx plan: scheme={plan.scheme} target={report['profile']} seed={plan.seed}"
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        return _plain_table(title, rows, footer)
    # every cell and line is a Text, never a markup string: site names and notes are the user's text
    # ("[bold]enc.weight" stays as written, "dec[/]" does not raise, ":smile:" is no emoji)
    table = Table(title=Text(title), title_justify="left")
    for i, col in enumerate(_COLUMNS):
        table.add_column(Text(col), justify="left" if i in (0, 2) else "right", overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    console.print(table)
    for line in footer:
        console.print(Text(line), highlight=False)
    return buf.getvalue().rstrip("\n")


def _plain_table(title: str, rows, footer) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]
    fmt = "  ".join(f"{{:{'<' if i in (0, 2) else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([title, fmt.format(*_COLUMNS)] + [fmt.format(*r) for r in rows] + footer)


# -- HTML -------------------------------------------------------------------------------------------------
MAP_BINS = 120


def _memory_map_svg(plan: Plan) -> str:
    """One row per site: its window, shaded by where its tiles land (exact offsets where affordable)."""
    row_h, label_w, map_w = 16, 260, 600
    exact = exact_load_feasible([s.mapping for s in plan.sites], plan.memory_size)
    parts = []
    for r, site in enumerate(plan.sites):
        m, y = site.mapping, 24 + r * row_h
        if exact:
            off = tile_offsets(m).reshape(-1).double()
            density = (off * MAP_BINS / plan.memory_size).long().clamp(max=MAP_BINS - 1).bincount(minlength=MAP_BINS)
            density = (density.double() / max(1, int(density.max()))).tolist()
        else:
            lo, hi = m.window_start / plan.memory_size, (m.window_start + m.window_size) / plan.memory_size
            density = [1.0 if lo <= (b + 0.5) / MAP_BINS < hi else 0.0 for b in range(MAP_BINS)]
        parts.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end">{html.escape(site.name[-40:])}</text>')
        for b, d in enumerate(density):
            if d > 0:
                x = label_w + b * map_w / MAP_BINS
                parts.append(f'<rect x="{x:.1f}" y="{y}" width="{map_w / MAP_BINS:.2f}" height="{row_h - 2}" '
                             f'fill="#c0392b" fill-opacity="{0.15 + 0.85 * d:.2f}"/>')
    height = 34 + len(plan.sites) * row_h
    axis = (f'<text x="{label_w}" y="14">slot 0</text>'
            f'<text x="{label_w + map_w}" y="14" text-anchor="end">slot {plan.memory_size:,}</text>')
    return _svg(label_w + map_w + 10, height, axis + "".join(parts))


def _bar_svg(labels: list[str], values: list[float], fmt) -> str:
    row_h, label_w, bar_w = 16, 260, 480
    top = max(values) if values and max(values) > 0 else 1.0
    parts = []
    for r, (label, v) in enumerate(zip(labels, values)):
        y, w = 6 + r * row_h, bar_w * v / top
        parts.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end">{html.escape(label[-40:])}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{row_h - 3}" fill="#2e86c1"/>'
                     f'<text x="{label_w + w + 4}" y="{y + 12}">{html.escape(fmt(v))}</text>')
    return _svg(label_w + bar_w + 110, 12 + len(labels) * row_h, "".join(parts))


def _histogram_svg(load: dict) -> str:
    if "histogram" in load:
        counts = load["histogram"]
    else:
        lam = max(load["interior_mean"], 1e-9)  # Poisson approximation of the interior slots
        top = int(lam + 6 * math.sqrt(lam) + 2)
        counts = [math.exp(k * math.log(lam) - lam - math.lgamma(k + 1)) for k in range(top)]
    width, height, base = 640, 220, 190
    top = max(counts) or 1
    bw = (width - 60) / max(1, len(counts))
    parts = [f'<line x1="40" y1="{base}" x2="{width - 10}" y2="{base}" stroke="#333"/>']
    for k, c in enumerate(counts):
        h = (base - 20) * c / top
        parts.append(f'<rect x="{40 + k * bw:.1f}" y="{base - h:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                     f'height="{h:.1f}" fill="#27ae60"><title>load {k}: {c:.4g}</title></rect>')
    step = max(1, len(counts) // 10)
    for k in range(0, len(counts), step):
        parts.append(f'<text x="{40 + (k + 0.5) * bw:.1f}" y="{base + 16}" text-anchor="middle">{k}</text>')
    return _svg(width, height + 10, "".join(parts))


def _svg(w: float, h: float, body: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
            f'font-family="monospace" font-size="11">{body}</svg>')


def plan_html(plan: Plan, profile=None, tokens: int = REPORT_TOKENS) -> str:
    """A single self-contained HTML page: table, memory map, predicted time per site, slot-load histogram."""
    report = analyze(plan, profile, tokens)
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in _COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in _rows(report))
    footer = "".join(f"<li>{esc(line)}</li>" for line in _footer(plan, report))
    names = [s["name"] for s in report["sites"]]
    load = report["totals"]["slot_load"]
    load_title = ("exact, every slot" if load["source"] == "exact"
                  else "analytic Poisson approximation of interior slots (the plan is too large to count)")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>roastfx plan report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} td:first-child{{text-align:left}}
h2{{margin-top:1.5em}}</style></head><body>
<h1>roastfx plan: scheme {esc(plan.scheme)}, target {esc(report['profile'])}, seed {plan.seed}</h1>
<p>All times are predicted by the roastfx cost model at T={tokens} tokens; none is measured.</p>
<ul>{footer}</ul>
<h2>Sites</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Memory map</h2><p>Where each site's tiles land in the memory of {plan.memory_size:,} slots
(darker: more tile starts).</p>{_memory_map_svg(plan)}
<h2>Predicted forward time per site</h2>{_bar_svg(names, [s['predicted_forward_s'] for s in report['sites']],
                                                  fmt_seconds)}
<h2>Collision load</h2><p>Number of memory slots holding k weight elements ({esc(load_title)}).</p>
{_histogram_svg(load)}
</body></html>
"""

"""`report.html` of a backtest run: one self-contained file (inline SVG drawn here, inline CSS, no script, nothing
fetched), readable offline and attachable anywhere.

Sections: summary, equity, drawdown, monthly returns, PnL split (gross → fees, slippage, funding → net), exposure and
leverage, calibration of the predicted P(TP) against the realized exits, rejected signals by reason, the trades.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from html import escape
from pathlib import Path

import numpy as np

from training.backtest import metrics as run_metrics
from training.backtest.accounting import LIQUIDATION, SL, TP, Ledger
from training.metrics import reliability

W, H = 920, 230  # chart size (px)
PAD_L, PAD_R, PAD_T, PAD_B = 84, 16, 24, 26
MAX_POINTS = 1600  # per line: longer series are thinned to the extremes of each bucket
MEAN_BUCKETS = 240  # exposure and leverage of longer series: the average of each of these slices
GREEN, RED, BLUE, GREY, ORANGE = "#1a7f37", "#cf222e", "#0969da", "#8c959f", "#bc4c00"
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

CSS = """
body{font:14px/1.45 -apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:#1f2328;margin:0;background:#f6f8fa}
main{max-width:960px;margin:0 auto;padding:24px}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:14px 18px;margin:16px 0}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0 0 10px}
.sub{color:#57606a}.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(140px,1fr));gap:8px}
.card{border:1px solid #d0d7de;border-radius:6px;padding:6px 10px}.card b{display:block;font-size:18px}
.card span{color:#57606a;font-size:12px}
table{border-collapse:collapse;width:100%;font-size:12.5px}th,td{padding:3px 6px;border-bottom:1px solid #eaeef2}
th{text-align:left;background:#f6f8fa;position:sticky;top:0}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.pos{color:#1a7f37}.neg{color:#cf222e}.empty{color:#57606a;font-style:italic}
.scroll{max-height:520px;overflow:auto}svg text{font-size:11px;fill:#57606a}
details pre{background:#f6f8fa;padding:8px;overflow:auto}
"""


# -- formatting --------------------------------------------------------------------------------------------------------
def _ts(ms: int, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime(fmt)


def _num(x, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:,.{digits}f}"


def _pct(x, digits: int = 2) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:,.{digits}f} %"


def _signed(x, text: str | None = None) -> str:
    cls = "pos" if x > 0 else "neg" if x < 0 else ""
    return f'<td class="n {cls}">{escape(text if text is not None else _num(x))}</td>'


# -- SVG ---------------------------------------------------------------------------------------------------------------
def _thin(x: np.ndarray, y: np.ndarray, n: int = MAX_POINTS, mean: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """At most ~2n points: each bucket's lowest and highest (a drawdown spike survives the thinning), or with `mean`
    its average at its first time (a position switching on and off every few bars reads as its average level)."""
    n = MEAN_BUCKETS if mean else n
    if len(x) <= 2 * n:
        return x, y
    chunks = np.array_split(np.arange(len(x)), n)
    if mean:
        with np.errstate(invalid="ignore"):
            return (np.asarray([x[c[0]] for c in chunks]),
                    np.asarray([np.nanmean(y[c]) if np.isfinite(y[c]).any() else np.nan for c in chunks]))
    keep = {0, len(x) - 1}
    for chunk in chunks:
        seg = y[chunk]
        if np.isfinite(seg).any():
            keep.update((int(chunk[np.nanargmin(seg)]), int(chunk[np.nanargmax(seg)])))
    idx = np.asarray(sorted(keep))
    return x[idx], y[idx]


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _decimals(step: float) -> int:
    """Enough decimals for axis labels `step` apart to differ."""
    return int(min(max(0, -np.floor(np.log10(step)) + 1), 6)) if step > 0 else 2


def _line_chart(lines: list[tuple[str, str, np.ndarray, np.ndarray]], unit: str = "", area: bool = False,
                zero: bool = False, mean: bool = False) -> str:
    """Lines of (label, colour, times ms, values) on one time axis; `unit` "%" shows fractions as percent, "×" a
    multiple; `area` fills the first line down to 0."""
    lines = [(lab, col, *_thin(np.asarray(x, np.float64), np.asarray(y, np.float64), mean=mean))
             for lab, col, x, y in lines
             if len(x)]
    if not lines:
        return '<p class="empty">Nothing to draw.</p>'
    xs = np.concatenate([x for *_, x, _ in lines])
    ys = np.concatenate([y[np.isfinite(y)] for *_, y in lines])
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = (float(ys.min()), float(ys.max())) if len(ys) else (0.0, 1.0)
    if zero or area:
        y0, y1 = min(y0, 0.0), max(y1, 0.0)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 1, y1 + 1
    margin = (y1 - y0) * 0.05
    y0, y1 = (y0 if (zero or area) and y0 == 0 else y0 - margin), (y1 if area and y1 == 0 else y1 + margin)
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x):
        return PAD_L + (np.asarray(x) - x0) / (x1 - x0) * (W - PAD_L - PAD_R)

    def py(y):
        return PAD_T + (y1 - np.asarray(y)) / (y1 - y0) * (H - PAD_T - PAD_B)

    scale = 100.0 if unit == "%" else 1.0
    digits = _decimals((y1 - y0) * scale / 4)

    def y_fmt(v: float) -> str:
        return f"{v * scale:,.{digits}f}{' %' if unit == '%' else unit}"

    x_fmt = "%Y-%m-%d" if x1 - x0 > 3 * 86_400_000 else "%m-%d %H:%M"
    out = [f'<svg viewBox="0 0 {W} {H}" width="100%" role="img" xmlns="http://www.w3.org/2000/svg">']
    for v in _ticks(y0, y1):
        out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#eaeef2"/>'
                   f'<text x="{PAD_L - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{escape(y_fmt(v))}</text>')
    for v in _ticks(x0, x1, 3):
        anchor = "start" if v == x0 else "end" if v == x1 else "middle"
        out.append(f'<text x="{px(v):.1f}" y="{H - 8}" text-anchor="{anchor}">{_ts(int(v), x_fmt)}</text>')
    if y0 < 0 < y1:
        out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{py(0):.1f}" y2="{py(0):.1f}" stroke="{GREY}"/>')
    for i, (label, colour, x, y) in enumerate(lines):
        ok = np.isfinite(y)
        sx, sy = px(x[ok]), py(y[ok])
        # steps: a value holds until the next event (a straight segment would invent prices between sparse points)
        sx, sy = np.repeat(sx, 2)[1:], np.repeat(sy, 2)[:-1]
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(sx, sy, strict=True))
        if area and i == 0 and ok.any():
            base = py(0.0)
            out.append(f'<polygon points="{sx[0]:.1f},{base:.1f} {pts} {sx[-1]:.1f},{base:.1f}" '
                       f'fill="{colour}" fill-opacity="0.25" stroke="none"/>')
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        out.append(f'<text x="{PAD_L + 120 * i}" y="12" style="fill:{colour}">■ {escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _hbars(items: list[tuple[str, float]], fmt=_num, colour_by_sign: bool = True) -> str:
    """Horizontal bars from a zero line, one per (label, value), the value written beyond the bar's end."""
    if not items:
        return '<p class="empty">Nothing to draw.</p>'
    row, label_w, room = 24, 170, 110  # room: for the value written beyond a bar
    height = row * len(items) + 8
    lo, hi = min(0.0, *(v for _, v in items)), max(0.0, *(v for _, v in items))
    span = (hi - lo) or 1.0
    left = label_w + (room if lo < 0 else 0)
    plot = W - left - (room if hi > 0 or lo == 0 else 10)

    def px(v):
        return left + (v - lo) / span * plot

    out = [f'<svg viewBox="0 0 {W} {height}" width="100%" role="img" xmlns="http://www.w3.org/2000/svg">',
           f'<line x1="{px(0):.1f}" x2="{px(0):.1f}" y1="0" y2="{height}" stroke="{GREY}"/>']
    for i, (label, v) in enumerate(items):
        y = 4 + i * row
        a, b = sorted((px(0), px(v)))
        colour = (GREEN if v >= 0 else RED) if colour_by_sign else BLUE
        value = (f'<text x="{b + 6:.1f}" y="{y + 15}">' if v >= 0
                 else f'<text x="{a - 6:.1f}" y="{y + 15}" text-anchor="end">') + f"{escape(fmt(v))}</text>"
        out.append(f'<text x="8" y="{y + 15}">{escape(label)}</text>'
                   f'<rect x="{a:.1f}" y="{y + 3}" width="{max(b - a, 1):.1f}" height="{row - 8}" fill="{colour}"/>'
                   + value)
    out.append("</svg>")
    return "".join(out)


def _reliability_chart(rows: list[dict]) -> str:
    """Mean predicted against observed per probability bin, dot area ∝ trades; the diagonal is perfect calibration."""
    size, pad = 300, 44
    inner = size - 2 * pad

    def p(v):
        return pad + v * inner

    out = [f'<svg viewBox="0 0 {size} {size}" width="{size}" role="img" xmlns="http://www.w3.org/2000/svg">',
           f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="none" stroke="#d0d7de"/>',
           f'<line x1="{p(0)}" y1="{size - p(0)}" x2="{p(1)}" y2="{size - p(1)}" stroke="{GREY}" '
           'stroke-dasharray="4 3"/>',
           f'<text x="{size / 2}" y="{size - 8}" text-anchor="middle">predicted</text>',
           f'<text x="12" y="{size / 2}" transform="rotate(-90 12 {size / 2})" text-anchor="middle">realized</text>']
    for v in (0.0, 0.5, 1.0):
        out.append(f'<text x="{p(v)}" y="{size - pad + 14}" text-anchor="middle">{v:.1f}</text>'
                   f'<text x="{pad - 4}" y="{size - p(v) + 4}" text-anchor="end">{v:.1f}</text>')
    most = max(r["rows"] for r in rows)
    for r in rows:
        radius = 3 + 9 * (r["rows"] / most) ** 0.5
        out.append(f'<circle cx="{p(r["predicted"]):.1f}" cy="{size - p(r["observed"]):.1f}" r="{radius:.1f}" '
                   f'fill="{BLUE}" fill-opacity="0.6"><title>{r["bin"]}: {r["rows"]} trades</title></circle>')
    out.append("</svg>")
    return "".join(out)


# -- sections ----------------------------------------------------------------------------------------------------------
def _summary(m: dict) -> str:
    cards = [("Total return", _pct(m["total_return"])), ("CAGR", _pct(m["cagr"])), ("Sharpe", _num(m["sharpe"])),
             ("Sortino", _num(m["sortino"])), ("Max drawdown", _pct(m["max_drawdown"])),
             ("Drawdown duration", f'{_num(m["max_drawdown_duration_hours"], 1)} h'), ("Trades", str(m["trades"])),
             ("Win rate", _pct(m["win_rate"], 1)), ("Profit factor", _num(m["profit_factor"])),
             ("Expectancy", f'{_num(m["expectancy"])} USDT'), ("Average hold", f'{_num(m["avg_hold_hours"], 1)} h'),
             ("Net PnL", f'{_num(m["net_pnl"])} USDT'), ("Fees", f'{_num(m["fees"])} USDT'),
             ("Slippage", f'{_num(m["slippage"])} USDT'), ("Funding", f'{_num(m["funding"])} USDT'),
             ("Turnover", f'{_num(m["turnover"], 0)} USDT'), ("Time in market", _pct(m["time_in_market"], 1)),
             ("Max leverage", f'{_num(m["max_leverage"])}×')]
    if m["open_trades"]:  # still open at the end: in the trade table, not in the trade statistics
        cards.append(("Open at the end", f'{m["open_trades"]} ({_num(m["open_trades_pnl"])} USDT)'))
    return '<div class="cards">' + "".join(f"<div class=card><b>{escape(v)}</b><span>{escape(k)}</span></div>"
                                           for k, v in cards) + "</div>"


def _monthly(ledger: Ledger) -> str:
    r = run_metrics.period_returns(ledger, "M")
    if r.empty:
        return '<p class="empty">No data.</p>'
    years = sorted({p.year for p in r.index})
    by = {(p.year, p.month): v for p, v in r.items()}
    head = "<tr><th>year</th>" + "".join(f'<th class="n">{m}</th>' for m in MONTHS) + '<th class="n">year</th></tr>'
    body = []
    for y in years:
        cells = []
        for mo in range(1, 13):
            v = by.get((y, mo))
            if v is None:
                cells.append("<td></td>")
                continue
            alpha = min(abs(v) / 0.10, 1.0) * 0.55 + 0.08  # ±10 % a month is full colour
            rgb = "26,127,55" if v >= 0 else "207,34,46"
            cells.append(f'<td class="n" style="background:rgba({rgb},{alpha:.2f})">{_pct(v, 1)}</td>')
        year = float(np.prod([1 + v for (yy, _), v in by.items() if yy == y]) - 1)
        body.append(f"<tr><td>{y}</td>{''.join(cells)}{_signed(year, _pct(year, 1))}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _calibration(ledger: Ledger) -> str:
    parts = []
    closed = ledger.closed_trades
    for field_, what, decided in (
            ("p_win", "the signal's P(win) = P(TP) / (P(TP) + P(SL)); realized: TP 1, SL or liquidation 0 "
                      "(positions closed otherwise are left out)", (TP, SL, LIQUIDATION)),
            ("p_tp", "the prediction's P(TP); realized: TP 1, any other exit 0", None)):
        pairs = [(getattr(t, field_), t.exit_kind == TP) for t in closed if getattr(t, field_) is not None
                 and (decided is None or t.exit_kind in decided)]
        if not pairs:
            continue
        p = np.asarray([a for a, _ in pairs], np.float64)
        y = np.asarray([b for _, b in pairs], np.float64)
        rows = reliability(y, p)
        table = ('<table><tr><th>bin</th><th class="n">trades</th><th class="n">predicted</th>'
                 '<th class="n">realized</th></tr>' + "".join(
                     f'<tr><td>{r["bin"]}</td><td class="n">{r["rows"]}</td><td class="n">{r["predicted"]:.3f}</td>'
                     f'<td class="n">{r["observed"]:.3f}</td></tr>' for r in rows) + "</table>")
        parts.append(f'<h3>{escape(field_)}</h3><p class="sub">{escape(what)}: {len(pairs)} trades, mean predicted '
                     f'{p.mean():.3f}, realized {y.mean():.3f}.</p><div style="display:flex;gap:24px;'
                     f'align-items:flex-start">{_reliability_chart(rows)}<div style="flex:1">{table}</div></div>')
    return "".join(parts) or '<p class="empty">No predictions linked to the trades (give the run\'s signals).</p>'


def _rejections(ledger: Ledger) -> str:
    out = []
    if "verdicts" in ledger.signals:
        s = ledger.signals
        out.append(f'<p class="sub">{s["total"]} signals ({s["long"]} long, {s["short"]} short, {s["flat"]} flat). '
                   f'{s["verdicts"]} verdicts: {s["approved_entries"]} entries approved, {s["rejected"]} rejected; a '
                   "rejection counts under every rule it broke.</p>")
        items = sorted(ledger.rejections.items(), key=lambda kv: (-kv[1], kv[0]))
        out.append(_hbars([(k, float(v)) for k, v in items], lambda v: f"{v:,.0f}", colour_by_sign=False)
                   if items else '<p class="empty">No signal was rejected.</p>')
    else:
        out.append('<p class="empty">No risk verdicts given for this run.</p>')
    if ledger.flat_reasons:
        out.append("<h3>Flat signals by reason</h3>" + _hbars(
            [(k, float(v)) for k, v in sorted(ledger.flat_reasons.items(), key=lambda kv: (-kv[1], kv[0]))],
            lambda v: f"{v:,.0f}", colour_by_sign=False))
    return "".join(out)


TRADE_COLUMNS = ("#", "symbol", "side", "entry (UTC)", "entry", "exit (UTC)", "exit", "kind", "qty", "bars", "gross",
                 "fees", "slippage", "funding", "net", "P(win)")


def _trades(ledger: Ledger) -> str:
    if not ledger.trades:
        return '<p class="empty">No trades in this run.</p>'
    head = "<tr>" + "".join(f'<th class="{"n" if i > 7 or c in ("entry", "exit") else ""}">{escape(c)}</th>'
                            for i, c in enumerate(TRADE_COLUMNS)) + "</tr>"
    rows = []
    for i, t in enumerate(ledger.trades, 1):
        rows.append(
            f'<tr class="trade"><td>{i}</td><td>{escape(t.symbol)}</td><td>{t.side}</td><td>{_ts(t.entry_time)}</td>'
            f'<td class="n">{t.entry_price:,.6g}</td>'
            f'<td>{_ts(t.exit_time) if t.exit_time is not None else "open"}</td>'
            f'<td class="n">{"–" if t.exit_price is None else f"{t.exit_price:,.6g}"}</td><td>{t.exit_kind}</td>'
            f'<td class="n">{t.quantity:g}</td><td class="n">{t.bars_held}</td>{_signed(t.gross_pnl)}'
            f'<td class="n">{_num(t.fees)}</td><td class="n">{_num(t.slippage)}</td>{_signed(t.funding)}'
            f'{_signed(t.net_pnl)}<td class="n">{_num(t.p_win, 3)}</td></tr>')
    return f'<div class="scroll"><table>{head}{"".join(rows)}</table></div>'


def render(ledger: Ledger, metrics: dict, title: str = "Backtest", parameters: dict | None = None) -> str:
    """The report as one HTML string."""
    eq = ledger.equity
    t = eq["time"].to_numpy()
    dd = run_metrics.drawdown(ledger)
    sections = [
        ("Equity", '<p class="sub">Mark-to-market equity (wallet + unrealized at bar closes) and the wallet '
                   "balance, USDT (times in UTC).</p>" + _line_chart([("equity", BLUE, t, eq["equity"].to_numpy()),
                                                       ("wallet", GREY, t, eq["wallet"].to_numpy())])),
        ("Drawdown", _line_chart([("drawdown", RED, dd["time"].to_numpy(), -dd["drawdown"].to_numpy())],
                                 unit="%", area=True)),
        ("Monthly returns", _monthly(ledger)),
        ("PnL split", f'<p class="sub">Closed trades: gross at the reference prices (bar open for market fills, the '
                      f'trigger for stops and targets), then the costs. Net {_num(metrics["net_pnl"])} USDT.</p>'
                      + _hbars([("gross", metrics["gross_pnl"]), ("fees", -metrics["fees"]),
                                ("slippage", -metrics["slippage"]), ("funding", metrics["funding"]),
                                ("net", metrics["net_pnl"])], lambda v: f"{v:,.2f} USDT")),
        ("Exposure and leverage", '<p class="sub">Open notional at the marks (USDT) and notional / equity'
                                  + (", averaged over equal slices of the run" if len(eq) > 2 * MEAN_BUCKETS else "")
                                  + ".</p>"
                                  + _line_chart([("exposure", ORANGE, t, eq["exposure"].to_numpy())], area=True,
                                                mean=True)
                                  + _line_chart([("leverage", BLUE, t, eq["leverage"].to_numpy())],
                                                unit="×", zero=True, mean=True)),
        ("Calibration", _calibration(ledger)),
        ("Rejected signals", _rejections(ledger)),
        ("Trades", _trades(ledger)),
    ]
    params = ("<details><summary>parameters</summary><pre>" + escape(json.dumps(parameters, indent=2, sort_keys=True))
              + "</pre></details>") if parameters else ""
    body = "".join(f"<section><h2>{escape(name)}</h2>{html}</section>" for name, html in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
            '<body><main>'
            f'<h1>{escape(title)}</h1><p class="sub">{escape(", ".join(metrics.get("symbols", [])))} · '
            f'{escape(metrics["data_start"])} → {escape(metrics["data_end"])} · initial balance '
            f'{_num(metrics["initial_balance"])} USDT</p>{params}<section>{_summary(metrics)}</section>{body}'
            "</main></body></html>\n")


def write(out_dir: Path, ledger: Ledger, metrics: dict, title: str = "Backtest",
          parameters: dict | None = None) -> Path:
    """Write `metrics.json` and `report.html` into `out_dir`; returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(run_metrics.to_json(metrics))
    path = out_dir / "report.html"
    path.write_text(render(ledger, metrics, title, parameters))
    return path

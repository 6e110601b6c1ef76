"""The `perpflow` command."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from streams.errors import PerpflowError
from streams.settings import Settings

UsageError = typer.BadParameter.__mro__[1]  # typer vendors click; its UsageError is not exported by name

app = typer.Typer(
    name="perpflow",
    help="Kafka stream processing that trades Binance USDT-M perpetual futures with supervised learning.\n\n"
    "Quick start: `perpflow up --source replay --data data/binance-um-futures --speed max --until-drained`, "
    "then `perpflow sql \"SELECT symbol, count() FROM md_klines FINAL GROUP BY symbol\"`.\n\n"
    "Configuration comes from PERPFLOW_* environment variables (see README).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
# wide tables (training reports) are not cut to 80 columns when the output goes to a file or a pipe
report = out if out.is_terminal else Console(width=160)


class Source(StrEnum):
    replay = "replay"
    binance = "binance"
    none = "none"


class Format(StrEnum):
    table = "table"
    tsv = "tsv"
    csv = "csv"


def _settings() -> Settings:
    try:
        s = Settings()
    except Exception as exc:  # pydantic ValidationError: name the variable
        raise PerpflowError(f"invalid PERPFLOW_* setting: {str(exc).splitlines()[1:3]}") from None
    logging.basicConfig(level=s.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return s


def _own_store(settings: Settings, command: str):
    """The store opened by this process, for commands that do not go through up's API (chDB allows one process
    per store)."""
    from connectors.clickhouse_store import Store, StoreBusy

    if settings.embedded_store and not (settings.home_dir / "clickhouse").exists():
        raise PerpflowError(f"no store at {settings.home_dir / 'clickhouse'} yet: archive market data first with "
                            "`perpflow up --source replay ... --until-drained` (or `make run`)")
    try:
        return Store(settings)
    except StoreBusy as exc:
        raise PerpflowError(f"`{command}` opens the embedded store {settings.home_dir / 'clickhouse'} itself, "
                            f"and {exc.holder} holds it (`perpflow up`); chDB allows one process per store and this "
                            "command does not go through up's API. Stop `perpflow up` (Ctrl-C), then run it "
                            "again.") from None


def _symbols(symbols: str | None, settings: Settings) -> list[str]:
    return [s.strip().upper() for s in symbols.split(",") if s.strip()] if symbols else settings.symbols


def parse_time(value: str | None, option: str) -> int | None:
    """YYYY-MM-DD or an ISO-8601 time (UTC unless it says otherwise) → epoch ms."""
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        hint = "use YYYY-MM-DD or YYYY-MM-DDTHH:MM"
        raise typer.BadParameter(f"{value!r} is not a date; {hint}", param_hint=option) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp() * 1000)


def parse_speed(value: str) -> float | None:
    if value == "max":
        return None
    try:
        speed = float(value.rstrip("x"))
    except ValueError:
        speed = 0.0
    if speed <= 0:
        raise typer.BadParameter(f"{value!r}: use 'max' or a positive factor such as 60", param_hint="--speed")
    return speed


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT unwind like Ctrl-C: components stop, the broker is stopped. SIGINT is set
    explicitly because a process started in the background of a non-interactive shell inherits it ignored."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@app.command()
def up(
    source: Source = typer.Option(Source.replay, help="Where market data comes from: a replay of files, Binance's "
                                  "streams (testnet unless PERPFLOW_BINANCE_TESTNET=false), or none."),
    data: Path = typer.Option(Path("data/binance-um-futures"), help="Directory of historical files for the replay "
                              "(freqtrade futures layout, or Binance monthly kline CSV/ZIP dumps)."),
    symbols: str = typer.Option(None, help="Comma-separated symbols (default: PERPFLOW_SYMBOLS)."),
    start: str = typer.Option(None, help="First bar to replay (UTC date or time, inclusive)."),
    end: str = typer.Option(None, help="Where the replay stops (UTC, exclusive)."),
    speed: str = typer.Option("max", help="'max' (as fast as the broker takes it) or N for N× real time."),
    until_drained: bool = typer.Option(False, "--until-drained", help="Exit once the replay finished and "
                                       "every topic is archived, printing a summary."),
    live: bool = typer.Option(False, "--live", help="With --source binance: trade the account (user data stream "
                              "and execution connector). Without it, trading stays paper."),
    paper: bool = typer.Option(True, "--paper/--no-paper", help="Run the paper exchange: it answers `orders` with "
                               "`user.events` from the market data (never with --live)."),
    mainnet: bool = typer.Option(False, "--mainnet", help="Required with --live on Binance mainnet "
                                 "(PERPFLOW_BINANCE_TESTNET=false, or a REST/WS URL on a binance.com host): real "
                                 "money."),
) -> None:
    """Start the stack (embedded broker and store unless configured), create topics and tables, run the
    market source (replay or Binance) and the ClickHouse sink, serve /metrics."""
    from streams.up import UpOptions, run_up

    start_ms, end_ms, speed_f = parse_time(start, "--start"), parse_time(end, "--end"), parse_speed(speed)
    if live and source is not Source.binance:
        raise typer.BadParameter("needs --source binance", param_hint="--live")
    if start_ms is not None and end_ms is not None and end_ms <= start_ms:
        raise typer.BadParameter("--end must be after --start", param_hint="--end")
    if until_drained and source is not Source.replay:
        raise typer.BadParameter("needs --source replay (a live source never drains)", param_hint="--until-drained")
    if source is Source.replay and not data.is_dir():
        raise typer.BadParameter(f"{data} is not a directory", param_hint="--data")
    settings = _settings()
    wanted = _symbols(symbols, settings)
    if source is not Source.none:
        _require_rules(settings, wanted)
    if live:
        _check_live(settings, mainnet)
    _stop_on_signals()
    opts = UpOptions(source.value, str(data), wanted, start_ms, end_ms, speed_f, until_drained, live, paper)
    summary = run_up(settings, opts)
    if until_drained:
        _print_summary(summary)


def _check_live(settings: Settings, mainnet: bool) -> None:
    if not (settings.binance_api_key.get_secret_value() and settings.binance_api_secret.get_secret_value()):
        raise PerpflowError("--live needs PERPFLOW_BINANCE_API_KEY and PERPFLOW_BINANCE_API_SECRET in the "
                            "environment (testnet keys unless PERPFLOW_BINANCE_TESTNET=false)")
    # on the URLs the connectors will use, not only the flag: a mainnet URL set by hand trades real money too
    production = settings.binance_mainnet_urls()
    if production and not mainnet:
        variable, url = production[0]
        cause = "PERPFLOW_BINANCE_TESTNET=false makes" if variable == "PERPFLOW_BINANCE_TESTNET" else f"{variable} is"
        raise PerpflowError(f"{cause} {url}, Binance mainnet: live trading there moves real money; add --mainnet to "
                            "confirm, or point it at the testnet")
    if production:
        logging.getLogger("perpflow").warning("LIVE TRADING ON BINANCE MAINNET (%s) WITH REAL MONEY",
                                              ", ".join(url for _, url in production))


def _print_summary(s) -> None:
    table = Table(title=f"perpflow up — drained in {s.seconds:.1f} s")
    table.add_column("topic")
    table.add_column("published by replay", justify="right")
    table.add_column("messages in topic", justify="right")
    table.add_column("rows archived (FINAL)", justify="right")
    for topic, n in s.topic_messages.items():
        if n or s.rows_archived.get(topic):
            table.add_row(topic, f"{s.published.get(topic, 0):,}", f"{n:,}", f"{s.rows_archived.get(topic, 0):,}")
    out.print(table)
    archived = sum(s.rows_archived.values())
    if s.archive_seconds > 0:
        out.print(f"archived {archived:,} rows, {archived / s.archive_seconds:,.0f} rows/s from the first insert")
    skipped = sum(s.skipped_rows.values())
    out.print(f"input rows skipped: {skipped:,}" + (f" {s.skipped_rows}" if skipped else "")
              + f"; dead letters: {s.dead_letters:,}"
              + (f"; worker restarts: {s.worker_restarts}" if s.worker_restarts else ""))
    for p in s.problems:
        out.print(f"  [yellow]input problem:[/] {p}")


@app.command()
def topics(
    watch: bool = typer.Option(False, "--watch", help="Refresh until Ctrl-C."),
    interval: float = typer.Option(2.0, help="Seconds between refreshes with --watch."),
) -> None:
    """Topics (partitions, end offsets, msgs/s over the last minute) and consumer groups with lag."""
    from rich.live import Live

    from streams.stack import StackInfo
    from streams.topic_health import Snapshot, TopicHealth

    settings = _settings()
    info = StackInfo.load(settings)
    bootstrap = settings.kafka_bootstrap or (info.bootstrap if info else "")
    if not bootstrap:
        raise PerpflowError("no broker: `perpflow up` is not running for "
                            f"{settings.home_dir} and PERPFLOW_KAFKA_BOOTSTRAP is empty")
    local = TopicHealth(bootstrap)

    def snapshot() -> Snapshot:
        if info and info.bootstrap == bootstrap:  # the running stack keeps a minute of history
            try:
                with urllib.request.urlopen(info.api_url + "/topics", timeout=10) as r:
                    return Snapshot.from_json(json.loads(r.read()))
            except OSError:
                pass
        return local.sample()

    if not watch:
        out.print(_health_tables(snapshot()))
        return
    with Live(_health_tables(snapshot()), console=out, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(_health_tables(snapshot()))
        except KeyboardInterrupt:
            pass


def _health_tables(snap):
    from rich.console import Group

    t = Table(title=f"topics (rates over {snap.window_s:.0f} s)")
    for col, just in [("topic", "left"), ("partitions", "right"), ("end offset", "right"), ("msgs/s", "right")]:
        t.add_column(col, justify=just)
    for row in snap.topics:
        rate = "–" if row.msgs_per_s is None else f"{row.msgs_per_s:,.1f}"
        t.add_row(row.topic, str(row.partitions), f"{row.end_offset:,}", rate)
    g = Table(title="consumer groups")
    for col in ("group", "topic", "partition", "committed", "end offset", "lag"):
        g.add_column(col, justify="left" if col in ("group", "topic") else "right")
    for row in snap.groups:
        g.add_row(row.group, row.topic, str(row.partition), f"{row.committed:,}", f"{row.end_offset:,}",
                  f"{row.lag:,}")
    return Group(t, g)


@app.command()
def sql(
    query: str = typer.Argument(..., help="A read-only ClickHouse query, e.g. \"SELECT count() FROM md_klines\"."),
    format: Format = typer.Option(Format.table, "--format", "-f", help="Output format."),
) -> None:
    """Run a read-only query against the configured ClickHouse (through `perpflow up` when it holds the
    embedded store)."""
    from streams.store_client import query_text

    sys.stdout.write(query_text(_settings(), query, format.value))


features_app = typer.Typer(help="Features of closed 5m bars: the registry in streams/features/registry.py.",
                            no_args_is_help=True)
app.add_typer(features_app, name="features")


@features_app.command("build")
def features_build(
    symbols: str = typer.Option(None, help="Comma-separated symbols (default: PERPFLOW_SYMBOLS)."),
    start: str = typer.Option(..., help="First bar to write (UTC date or time, inclusive)."),
    end: str = typer.Option(..., help="Where the bars to write stop (UTC, exclusive)."),
) -> None:
    """Compute features from the archived md_klines, md_markprice, md_funding (and md_openinterest) with the
    streaming engine's code and write them to the `features` table. History before --start (2000 bars) warms the
    state; only bars in [start, end) are written. Needs the store to itself: not while `perpflow up` holds the
    embedded store."""
    from streams.features.offline import MARGIN_BARS, build_features

    start_ms, end_ms = parse_time(start, "--start"), parse_time(end, "--end")
    if end_ms <= start_ms:  # type: ignore[operator]
        raise typer.BadParameter("--end must be after --start", param_hint="--end")
    settings = _settings()
    wanted = _symbols(symbols, settings)
    store = _own_store(settings, "perpflow features build")
    started = time.monotonic()
    try:
        rows = build_features(store, wanted, start_ms, end_ms)  # type: ignore[arg-type]
    finally:
        store.close()
    table = Table(title=f"features built in {time.monotonic() - started:.1f} s "
                        f"(warm-up from {MARGIN_BARS} bars before --start)")
    for col in ("symbol", "rows written", "ready", "first ready bar", "gap rows"):
        table.add_column(col, justify="left" if col == "symbol" else "right")
    for symbol, rs in rows.items():
        first = next((r["open_time"] for r in rs if r["ready"]), None)
        table.add_row(symbol, f"{len(rs):,}", f"{sum(r['ready'] for r in rs):,}",
                      "–" if first is None else datetime.fromtimestamp(first / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
                      f"{sum(r['gap_bars'] > 0 for r in rs):,}")
    out.print(table)
    empty = [s for s, rs in rows.items() if not rs]
    if empty:
        out.print(f"[yellow]no md_klines rows in the window for {', '.join(empty)}[/]: archive them first "
                  "(`perpflow up --source replay --symbols ... --until-drained`)")


DURATION_UNITS_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000}


def parse_duration(value: str, option: str) -> int:
    """'7d', '12h', '30m' → milliseconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([dhm])\s*", value or "")
    if not match or int(match.group(1)) == 0:
        raise PerpflowError(f"{option} {value!r}: a positive whole number of days, hours or minutes, e.g. 7d, 12h, 30m")
    return int(match.group(1)) * DURATION_UNITS_MS[match.group(2)]


def _window_options(start: str, end: str) -> tuple[int, int]:
    start_ms, end_ms = parse_time(start, "--start"), parse_time(end, "--end")
    if end_ms <= start_ms:  # type: ignore[operator]
        raise typer.BadParameter("--end must be after --start", param_hint="--end")
    return start_ms, end_ms  # type: ignore[return-value]


@app.command()
def label(
    start: str = typer.Option(..., help="First bar to label (UTC date or time, inclusive)."),
    end: str = typer.Option(..., help="Where the bars to label stop (UTC, exclusive)."),
    symbols: str = typer.Option(None, help="Comma-separated symbols (default: PERPFLOW_SYMBOLS)."),
    k_tp: float = typer.Option(2.0, help="Take profit at entry ± k_tp·ATR."),
    k_sl: float = typer.Option(1.0, help="Stop loss at entry ∓ k_sl·ATR."),
    horizon: int = typer.Option(48, help="Bars until the timeout exit (48 = 4 h)."),
    fee: float = typer.Option(0.0004, help="Taker fee per fill, as a fraction (0.0004 = 0.04 %)."),
    slippage: float = typer.Option(0.0015, help="Slippage per fill, as a fraction (0.0015 = 15 bps)."),
) -> None:
    """Triple-barrier labels, both sides, for the archived 5m bars in [start, end), with fees, slippage and the
    funding settlements crossed; written to the `labels` table under the spec's id. Needs `perpflow features
    build` for the window (the ATR) and the store to itself."""
    from training.label_build import build_labels
    from training.labels import LabelSpec

    start_ms, end_ms = _window_options(start, end)
    try:
        spec = LabelSpec(k_tp=k_tp, k_sl=k_sl, horizon=horizon, fee=fee, slippage=slippage)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    settings = _settings()
    store = _own_store(settings, "perpflow label")
    started = time.monotonic()
    try:
        summaries = build_labels(store, _symbols(symbols, settings), start_ms, end_ms, spec,
                                 say=lambda line: print(line, file=sys.stderr))
    finally:
        store.close()
    table = Table(title=f"labels of spec {spec.id} in {time.monotonic() - started:.1f} s", caption=spec.to_json())
    for col in ("symbol", "side", "bars", "labeled", "TP", "SL", "TIMEOUT", "mean net", "mean funding"):
        table.add_column(col, justify="left" if col in ("symbol", "side") else "right")
    for s in summaries:
        pct = {k: f"{100 * v / s.labeled:.1f} %" if s.labeled else "–" for k, v in s.outcomes.items()}
        table.add_row(s.symbol, s.side, f"{s.bars:,}", f"{s.labeled:,}", pct["TP"], pct["SL"], pct["TIMEOUT"],
                      f"{s.mean_net:+.4%}", f"{s.mean_funding:+.5%}")
    report.print(table)
    missing = sorted({s.symbol for s in summaries if not s.labeled})
    if missing:
        out.print(f"[yellow]nothing labeled for {', '.join(missing)}[/]: archive its bars and run `perpflow "
                  "features build` for the window first")


class Side(StrEnum):
    long = "long"
    short = "short"
    both = "both"


@app.command()
def train(
    start: str = typer.Option(..., help="First bar of the training window (UTC, inclusive)."),
    end: str = typer.Option(..., help="End of the training window (UTC, exclusive)."),
    symbols: str = typer.Option(None, help="Comma-separated symbols pooled into one model per side "
                                "(default: PERPFLOW_SYMBOLS)."),
    side: Side = typer.Option(Side.both, help="Which side's models to train."),
    spec: str = typer.Option(None, help="Label spec id (printed by `perpflow label`; default: the default spec)."),
    folds: int = typer.Option(5, min=2, max=20, help="Walk-forward folds."),
    embargo_bars: int = typer.Option(288, min=0, help="Bars dropped before each test block on top of the purge "
                                     "(the purge is the label horizon + 1 bar)."),
    max_rounds: int = typer.Option(400, min=10, help="Boosting rounds at most (early stopping picks fewer)."),
    threads: int = typer.Option(2, min=1, max=64, help="LightGBM threads."),
) -> None:
    """Train LightGBM models per side on ready features ⨝ labels: calibrated P(TP/SL/TIMEOUT), hold time, an MAE
    quantile and the timeout return; walk-forward validation with purge and embargo; registers each side's models
    (status `trained`) with an artifact under $PERPFLOW_HOME/models."""
    from training.labels import LabelSpec
    from training.pipeline import train_models
    from training.train import TrainConfig

    start_ms, end_ms = _window_options(start, end)
    settings = _settings()
    wanted = _symbols(symbols, settings)
    sides = ["long", "short"] if side is Side.both else [side.value]
    cfg = TrainConfig(folds=folds, embargo_bars=embargo_bars, max_rounds=max_rounds, threads=threads)
    store = _own_store(settings, "perpflow train")
    try:
        trained = train_models(store, settings.home_dir / "models", sides, wanted, start_ms, end_ms,
                               spec or LabelSpec().id, cfg, say=lambda line: print(line, file=sys.stderr))
    finally:
        store.close()
    for row, models in trained:
        report.print(_fold_table(row["id"], models.fold_metrics, models.metrics))


@app.command()
def retrain(
    symbols: str = typer.Option(None, help="Comma-separated symbols pooled into one model per side "
                                "(default: PERPFLOW_SYMBOLS)."),
    train_days: int = typer.Option(60, min=7, help="Days of training data before the newest unseen window."),
    holdout_days: int = typer.Option(7, min=1, help="The newest days: never trained on, the candidates and the "
                                     "incumbents scored on them."),
    folds: int = typer.Option(5, min=2, max=20, help="Walk-forward folds."),
    embargo_bars: int = typer.Option(288, min=0, help="Bars dropped before each test block on top of the purge."),
    max_rounds: int = typer.Option(400, min=10, help="Boosting rounds at most (early stopping picks fewer)."),
    threads: int = typer.Option(2, min=1, max=64, help="LightGBM threads."),
    every: str = typer.Option(None, help="Run again after this long (e.g. 1d, 12h), for ever: the deployment's "
                              "schedule as a service. Default: once."),
) -> None:
    """Labels → walk-forward training → scoring on the newest unseen window → promotion only through the gates, for
    both sides; each side's outcome (promoted, or kept with the gate that refused) is printed and, with a broker,
    published on `control` (entity retrain:<side>, kind retrain_outcome), where the dashboards and the archive see
    it."""
    import getpass

    from streams.control import control_token, promotion_publisher, publish
    from training.labels import LabelSpec
    from training.retrain import retrain as run_retrain
    from training.train import TrainConfig

    try:
        period_ms = parse_duration(every, "--every") if every else None
    except PerpflowError as exc:
        raise typer.BadParameter(str(exc), param_hint="--every") from None
    settings = _settings()
    wanted = _symbols(symbols, settings)
    cfg = TrainConfig(folds=folds, embargo_bars=embargo_bars, max_rounds=max_rounds, threads=threads)
    token = control_token(settings) if settings.kafka_bootstrap else ""
    while True:
        store = _own_store(settings, "perpflow retrain")
        try:
            w, outcomes = run_retrain(store, settings.home_dir / "models", wanted, train_days, holdout_days,
                                      LabelSpec(), cfg, f"retrain ({getpass.getuser()})",
                                      promotion_publisher(settings.kafka_bootstrap, token),
                                      say=lambda line: print(line, file=sys.stderr))
        except PerpflowError as exc:
            if period_ms is None:
                raise
            out.print(f"[red]retrain failed[/]: {exc}; trying again in {every}")
            outcomes = []
        finally:
            store.close()
        for o in outcomes:
            report.print(f"{o.side}: {o.candidate} " + ("[green]promoted[/]" if o.promoted else
                                                        f"[yellow]not promoted[/], the incumbent kept: {o.refused_by}"))
            if settings.kafka_bootstrap:
                publish(settings.kafka_bootstrap, f"retrain:{o.side}", "retrain_outcome",
                        {**o.to_json(), "window": w.to_json()}, "retrain", int(time.time() * 1000), token=token)
        if period_ms is None:
            return
        time.sleep(period_ms / 1000)


def _fold_table(title: str, folds: list[dict], total: dict) -> Table:
    table = Table(title=f"{title}: P(TP) out of sample (walk-forward)")
    for col in ("fold", "test from", "rows", "TP rate", "AUC", "log loss", "base", "Brier", "base", "ECE"):
        table.add_column(col, justify="left" if col in ("fold", "test from") else "right")

    def cells(m: dict) -> list[str]:
        return [f"{m['rows']:,}", f"{m['rate']:.3f}", f"{m['auc']:.3f}", f"{m['log_loss']:.4f}",
                f"{m['log_loss_base']:.4f}", f"{m['brier']:.4f}", f"{m['brier_base']:.4f}", f"{m['ece']:.4f}"]

    for m in folds:
        table.add_row(f"{m['fold']}", datetime.fromtimestamp(m["test_start"] / 1000, UTC).strftime("%Y-%m-%d"),
                      *cells(m))
    table.add_row("all", "", *cells(total))
    return table


models_app = typer.Typer(help="The model registry: the `models` table and the artifacts under $PERPFLOW_HOME/models.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


def _registry_store(settings: Settings, command: str):
    if settings.embedded_store and not (settings.home_dir / "clickhouse").exists():
        raise PerpflowError(f"no store at {settings.home_dir / 'clickhouse'}: no models yet; `perpflow train` "
                            "makes them")
    return _own_store(settings, command)


@models_app.command("list")
def models_list() -> None:
    """Every registered model: id, side, status, window, out-of-sample AUC and log loss of P(TP)."""
    from training import registry

    settings = _settings()
    store = _registry_store(settings, "perpflow models list")
    try:
        found = registry.rows(store)
    finally:
        store.close()
    if not found:
        out.print("no models registered yet: `perpflow train --start ... --end ...` makes them")
        return
    table = Table(title="models")
    for col in ("id", "side", "status", "created", "window", "symbols", "AUC", "log loss", "base"):
        table.add_column(col, justify="right" if col in ("AUC", "log loss", "base") else "left")
    for r in found:
        m, _ = registry.metrics_of(r)
        table.add_row(r["id"], r["side"], r["status"], _day(r["created_at"], "%Y-%m-%d %H:%M"),
                      f"{_day(r['train_start'])}..{_day(r['train_end'])}", ",".join(r["symbols"]),
                      f"{m['auc']:.3f}", f"{m['log_loss']:.4f}", f"{m['log_loss_base']:.4f}")
    report.print(table)


def _day(ms: int | None, fmt: str = "%Y-%m-%d") -> str:
    return "–" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime(fmt)


@models_app.command("show")
def models_show(model: str = typer.Argument(..., help="Model id (see `perpflow models list`).")) -> None:
    """One model: registry row, walk-forward metrics per fold, reliability table and top features."""
    import json as json_

    from training import artifact, registry

    settings = _settings()
    store = _registry_store(settings, "perpflow models show")
    try:
        row = registry.get(store, model)
    finally:
        store.close()
    doc = artifact.manifest(artifact.locate(row["artifact_path"], row["sha256"], settings.home_dir / "models"),
                            row["sha256"])
    for key in ("id", "side", "status", "schema_version", "label_spec_id", "label_spec", "symbols", "artifact_path",
                "sha256", "actor", "reason"):
        report.print(f"{key:>15}: {row[key]}")
    report.print(f"{'window':>15}: {_day(row['train_start'])} .. {_day(row['train_end'])} (exclusive); created "
              f"{_day(row['created_at'], '%Y-%m-%d %H:%M')}, promoted {_day(row['promoted_at'], '%Y-%m-%d %H:%M')}")
    m, folds = registry.metrics_of(row)
    report.print(_fold_table(row["id"], folds, m))
    rel = Table(title="reliability of calibrated P(TP), out of fold")
    for col in ("bin", "rows", "predicted", "observed"):
        rel.add_column(col, justify="right")
    for r in doc["reliability"]:
        rel.add_row(r["bin"], f"{r['rows']:,}", f"{r['predicted']:.3f}", f"{r['observed']:.3f}")
    report.print(rel)
    top = sorted(doc["importance"].items(), key=lambda kv: -kv[1])[:10]
    report.print("top features (share of gain): " + json_.dumps({k: round(v, 3) for k, v in top}))


@models_app.command("evaluate")
def models_evaluate(
    model: str = typer.Argument(..., help="Model id (see `perpflow models list`)."),
    start: str = typer.Option(..., help="First bar of the window (UTC, inclusive)."),
    end: str = typer.Option(..., help="End of the window (UTC, exclusive)."),
) -> None:
    """Score a model on a window (features and labels built for it): P(TP) AUC, log loss and Brier against the
    base rate, ECE; hold-time error and MAE-quantile coverage. Says when the window overlaps the training one."""
    from training import registry
    from training.evaluate import evaluate

    start_ms, end_ms = _window_options(start, end)
    settings = _settings()
    store = _registry_store(settings, "perpflow models evaluate")
    try:
        m = evaluate(store, registry.get(store, model), start_ms, end_ms)
    finally:
        store.close()
    if m["overlaps_training"]:
        report.print("[yellow]the window overlaps the model's training window: these are not out-of-sample "
                     "figures[/]")
    report.print(f"{model} on {start}..{end}: {m['rows']:,} rows, TP rate {m['rate']:.3f}; P(TP) AUC {m['auc']:.3f}, "
                 f"log loss {m['log_loss']:.4f} (base rate {m['log_loss_base']:.4f}, uncalibrated "
                 f"{m['log_loss_uncalibrated']:.4f}), Brier {m['brier']:.4f} "
                 f"(base {m['brier_base']:.4f}), ECE {m['ece']:.4f}; hold-time RMSE {m['hold_rmse']:.2f} bars (the "
                 f"window's mean: {m['hold_rmse_window_mean']:.2f}); MAE below its q{m['mae_quantile']:g} prediction: "
                 f"{m['mae_coverage']:.3f}, pinball loss {m['mae_pinball']:.6f} (the window's quantile: "
                 f"{m['mae_pinball_window_quantile']:.6f})")


@models_app.command("promote")
def models_promote(
    model: str = typer.Argument(..., help="Model id (see `perpflow models list`)."),
    force: bool = typer.Option(False, "--force", help="Promote even if the schema or not-worse gate fails "
                               "(needs --reason)."),
    reason: str = typer.Option("", help="Why (recorded; required with --force)."),
) -> None:
    """Promote a model for its side after the gates (feature schema version, not worse than the incumbent on a
    common out-of-fold window); archives the side's previous model and publishes the change on `control`."""
    import getpass

    from streams.control import control_token, promotion_publisher
    from training import registry

    if force and not reason.strip():
        raise typer.BadParameter("--force needs --reason TEXT saying why the gates are overridden",
                                 param_hint="--reason")
    settings = _settings()
    store = _registry_store(settings, "perpflow models promote")
    try:
        bootstrap = settings.kafka_bootstrap
        result = registry.promote(store, model, getpass.getuser(), reason.strip(), force,
                                  promotion_publisher(bootstrap, control_token(settings) if bootstrap else ""))
    finally:
        store.close()
    for g in result.gates:
        report.print(f"  {'pass' if g.ok else '[yellow]FAIL (forced)[/]'} {g.name}: {g.detail}")
    prev = f"; archived {result.incumbent['id']}" if result.incumbent else ""
    report.print(f"promoted {model} for the {result.model['side']} side{prev}")
    if result.control is None:
        report.print("no broker configured (PERPFLOW_KAFKA_BOOTSTRAP): nothing published on `control`; a stack "
                  "started later reads the promoted model from the registry")
    else:
        report.print(f"published on `control`: {result.control['entity']} → {model}")


@app.command()
def backfill(
    symbols: str = typer.Option(None, help="Comma-separated symbols (default: PERPFLOW_SYMBOLS)."),
    start: str = typer.Option(..., help="First bar to load (UTC date or time, inclusive)."),
    end: str = typer.Option(..., help="Where loading stops (UTC, exclusive; capped at now)."),
) -> None:
    """Load Binance history (klines of PERPFLOW_BINANCE_INTERVALS, mark-price klines, funding, open interest)
    from REST into the md.* topics with the market connector's code — and so into ClickHouse through the sink
    of the running `perpflow up` (or of PERPFLOW_KAFKA_BOOTSTRAP's cluster)."""
    import asyncio

    from connectors.binance.runner import backfill as run_backfill
    from streams.stack import StackInfo

    start_ms, end_ms = _window_options(start, end)
    settings = _settings()
    wanted = _symbols(symbols, settings)
    info = StackInfo.load(settings)
    bootstrap = settings.kafka_bootstrap or (info.bootstrap if info else "")
    if not bootstrap:
        raise PerpflowError("no broker: start `perpflow up --source none` first (its sink archives what the "
                            "backfill publishes), or set PERPFLOW_KAFKA_BOOTSTRAP")
    published = asyncio.run(run_backfill(settings, bootstrap, wanted, start_ms, end_ms))
    table = Table(title="backfill published")
    table.add_column("topic")
    table.add_column("messages", justify="right")
    for topic, n in sorted(published.items()):
        table.add_row(topic, f"{n:,}")
    out.print(table)


rules_app = typer.Typer(help="Exchange rules (exchangeInfo filters, leverage brackets): bundled for BTCUSDT, ETHUSDT "
                        "and 1000PEPEUSDT, any other symbol imported from Binance's own answers.",
                        no_args_is_help=True)
app.add_typer(rules_app, name="rules")


@rules_app.command("import")
def rules_import(files: list[Path] = typer.Argument(..., help="Files saved from GET /fapi/v1/exchangeInfo and GET "
                                                     "/fapi/v1/leverageBracket, exactly as Binance returns them.")
                 ) -> None:
    """Import exchange rules into $PERPFLOW_HOME/rules/: they win over the bundled snapshots, symbol by symbol, for
    the policy, the risk guard and the paper exchange (a running worker takes them at its next start)."""
    from connectors.binance.rules import EXCHANGE_INFO, LEVERAGE_BRACKETS, import_rule_files, missing_rules

    settings = _settings()
    done = import_rule_files(settings.home_dir, files)
    for kind, what in ((EXCHANGE_INFO, "exchangeInfo rules"), (LEVERAGE_BRACKETS, "leverage brackets")):
        if kind in done:
            out.print(f"{what}: {len(done[kind]):,} symbols imported ({', '.join(done[kind][:8])}"
                      f"{', ...' if len(done[kind]) > 8 else ''})")
    imported = sorted(set().union(*done.values()))
    incomplete = missing_rules(settings.home_dir, imported)
    if incomplete:
        out.print(f"still not tradable (exchangeInfo rules or leverage brackets missing): {', '.join(incomplete[:8])}"
                  f"{', ...' if len(incomplete) > 8 else ''}")


@rules_app.command("list")
def rules_list(symbols: str = typer.Option(None, help="Comma-separated symbols (default: every symbol known).")
               ) -> None:
    """Each symbol's rules as the policy sees them: status, tick, step, minimum quantity and notional, brackets."""
    from connectors.binance.rules import exchange_rules, leverage_brackets, plain

    settings = _settings()
    rules, brackets = exchange_rules(settings.home_dir), leverage_brackets(settings.home_dir)
    wanted = _symbols(symbols, settings) if symbols else sorted(rules.keys() | brackets.keys())
    table = Table(title=f"exchange rules ({settings.home_dir / 'rules'} over the bundled snapshots)")
    for col in ("symbol", "status", "tick", "step", "min qty", "min notional", "brackets", "first bracket"):
        table.add_column(col, justify="left" if col in ("symbol", "status") else "right")
    for symbol in wanted:
        r, b = rules.get(symbol), brackets.get(symbol)
        filters = [r.status, *(plain(x) for x in (r.tick, r.step, r.min_qty, r.min_notional))] if r else \
            ["no rules", *["–"] * 4]
        tiers = [str(len(b)), f"< {b[0].cap:,.0f}: MMR {b[0].mmr:.2%}"] if b else ["none", "–"]
        table.add_row(symbol, *filters, *tiers)
    report.print(table)


def _require_rules(settings: Settings, symbols: list[str]) -> None:
    from connectors.binance.rules import require_rules

    require_rules(settings.home_dir, symbols)


trading_app = typer.Typer(help="Trading state: start (RUNNING), stop (REDUCE_ONLY), kill (flatten and HALT), status.",
                          no_args_is_help=True)
app.add_typer(trading_app, name="trading")


class TradingCommand(StrEnum):
    start = "start"
    stop = "stop"
    kill = "kill"


def _worker_api(settings: Settings) -> str:
    """The control API of the worker: PERPFLOW_CONTROL_URL, else the newest local worker's (run/worker-*.json)."""
    if settings.control_url:
        return settings.control_url.rstrip("/")
    infos = sorted(settings.run_dir.glob("worker-*.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(infos):
        try:
            return json.loads(path.read_text())["api_url"]
        except (OSError, ValueError, KeyError):
            continue
    raise PerpflowError(f"no running worker for {settings.home_dir}: start `perpflow up` (or set "
                        "PERPFLOW_CONTROL_URL to a worker's control API)")


def _call(url: str, token: str = "", body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        hint = "; set PERPFLOW_CONTROL_TOKEN to the worker's token" if exc.code == 401 else ""
        raise PerpflowError(f"{url}: {exc.code} {json.loads(exc.read() or b'{}').get('error', exc.reason)}"
                            f"{hint}") from None
    except OSError as exc:
        raise PerpflowError(f"cannot reach the worker's control API at {url} ({exc})") from None


@trading_app.command("status")
def trading_status() -> None:
    """Trading state, account, positions and the newest verdict per symbol, from the running worker."""
    from streams.control import control_token

    settings = _settings()
    s = _call(_worker_api(settings) + "/status", control_token(settings))  # wanted when the worker is not on loopback
    out.print(f"trading [bold]{s.get('trading_state', '?')}[/bold] {s.get('reason') or ''}")
    out.print(f"equity {s.get('equity', 0):,.2f} USDT · drawdown {s.get('drawdown', 0):.2%} · "
              f"today {s.get('daily_pnl', 0):+.2%} · margin used {s.get('margin_used', 0):,.2f}")
    out.print("models: " + (", ".join(f"{k} {v}" for k, v in sorted(s.get("models", {}).items())) or "none"))
    out.print("lag: " + ", ".join(f"{k} {v:,}" for k, v in sorted(s.get("lag", {}).items())))
    table = Table(title="positions")
    for col in ("symbol", "side", "status", "quantity", "entry", "leverage", "liq distance (ATR)", "closing"):
        table.add_column(col)
    for symbol, p in sorted(s.get("positions", {}).items()):
        distance = p.get("liq_distance_atr")
        table.add_row(symbol, p["side"], p["status"], f"{p['quantity']:g}", f"{p['entry']:g}", str(p["leverage"]),
                      "–" if distance is None else f"{distance:.1f}", p.get("closing") or "")
    out.print(table)
    latest = Table(title="newest verdict per symbol")
    for col in ("symbol", "bar", "decision", "verdict", "violations"):
        latest.add_column(col)
    for symbol, v in sorted(s.get("latest", {}).items()):
        latest.add_row(symbol, _day(v["open_time"], "%Y-%m-%d %H:%M"), v["decision"], v["verdict"],
                       ", ".join(v["violations"]))
    out.print(latest)


def _trading(command: TradingCommand, reason: str | None) -> None:
    from streams.control import control_token

    settings = _settings()
    answer = _call(f"{_worker_api(settings)}/trading/{command.value}", control_token(settings),
                   {"reason": reason or command.value, "actor": "cli"})
    accepted = answer["accepted"]
    out.print(f"trading → {accepted['state']}{' (flattening every position)' if accepted['flatten'] else ''}: "
              f"published on `control` as {answer['event_id']}")


@trading_app.command("start")
def trading_start(reason: str = typer.Option(None, help="Why, for the record.")) -> None:
    """RUNNING: entries allowed again."""
    _trading(TradingCommand.start, reason)


@trading_app.command("stop")
def trading_stop(reason: str = typer.Option(None, help="Why, for the record.")) -> None:
    """REDUCE_ONLY: no new entries; open positions keep their stop-loss and take-profit."""
    _trading(TradingCommand.stop, reason)


@trading_app.command("kill")
def trading_kill(reason: str = typer.Option(None, help="Why, for the record.")) -> None:
    """Flatten every position at market and HALT."""
    _trading(TradingCommand.kill, reason)


class BacktestSource(StrEnum):
    clickhouse = "clickhouse"
    kafka = "kafka"


@app.command()
def backtest(
    symbols: str = typer.Option(None, help="Comma-separated symbols (default: PERPFLOW_SYMBOLS)."),
    start: str = typer.Option(..., help="First bar replayed (UTC, inclusive); the first ~5 days warm the indicators."),
    end: str = typer.Option(..., help="End of the replay (UTC, exclusive)."),
    model: str = typer.Option("promoted", help="'promoted', or model ids (comma-separated) pinned for the run; "
                              "a side not named uses its promoted model."),
    source: BacktestSource = typer.Option(BacktestSource.clickhouse, help="Replay the ClickHouse archive (md_* "
                                          "tables) or the md.* topics of the broker."),
    fee: float = typer.Option(None, help="Taker fee per fill, a fraction (default PERPFLOW_PAPER_TAKER_FEE); the "
                              "policy's EV assumes the same."),
    slippage_bps: float = typer.Option(None, help="Slippage per fill in bps (default PERPFLOW_PAPER_SLIPPAGE_BPS)."),
    out_dir: Path = typer.Option(None, "--out", help="Where report.html and metrics.json go (default "
                                 "$PERPFLOW_HOME/backtests/<run>)."),
    keep_topics: bool = typer.Option(False, "--keep-topics", help="Keep the run's bt.<run>.* topics."),
    walk_forward: bool = typer.Option(False, "--walk-forward", help="Retrain both sides before each step on the "
                                      "trailing window (the pinned models' label spec and training config) and "
                                      "trade each step only with its own models."),
    retrain_every: str = typer.Option("7d", help="Walk-forward step: a duration such as 7d, 12h."),
    train_window: str = typer.Option("180d", help="Walk-forward training window, ending a label horizon plus the "
                                     "embargo before each step."),
) -> None:
    """Replay archived market data through the live chain (features → predict → policy → risk → paper exchange) on
    topics of the run's own, with the models pinned; archive every row with its run id (bt_* tables), record the
    run in `backtest_runs`, write report.html and metrics.json."""
    from training.backtest.orchestrate import BacktestOptions, run_backtest

    start_ms, end_ms = _window_options(start, end)
    settings = _settings()
    if settings.embedded_store and not (settings.home_dir / "clickhouse").exists():
        raise PerpflowError(f"no store at {settings.home_dir / 'clickhouse'}: archive market data first (`perpflow "
                            "up --source replay ... --until-drained`) and train a model")
    _require_rules(settings, _symbols(symbols, settings))
    opts = BacktestOptions(_symbols(symbols, settings), start_ms, end_ms, model, source.value, fee, slippage_bps,
                           out_dir, keep_topics, walk_forward, parse_duration(retrain_every, "--retrain-every"),
                           parse_duration(train_window, "--train-window"))
    _stop_on_signals()
    result = run_backtest(settings, opts, say=lambda line: print(line, file=sys.stderr))
    m = result.metrics
    table = Table(title=f"backtest {result.run_id}")
    table.add_column("")
    table.add_column("", justify="right")
    signals = m.get("signals", {})
    for label_, value in (
            ("models", ", ".join(result.models) if not walk_forward else
             f"{len(result.models)}, {len(result.models) // 2} walk-forward steps (see the report's parameters)"),
            ("bars through the chain", f"{result.bars:,} in {result.seconds:.1f} s ({result.bars_per_second:,.0f}/s)"),
            ("signals", " · ".join(f"{k} {v:,}" for k, v in sorted(signals.items())) or "none"),
            ("trades closed (open)", f"{m['trades']:,} ({m['open_trades']:,})"),
            ("net PnL (closed trades)", f"{m['net_pnl']:+,.2f} USDT"),
            ("total return", f"{m['total_return']:+.2%}"), ("max drawdown", f"{m['max_drawdown']:.2%}"),
            ("report", str(result.report_path)),
            ("topics", "kept" if keep_topics else f"{result.topics_deleted} deleted")):
        table.add_row(label_, value)
    out.print(table)


def _share(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


@app.command()
def demo(
    data: Path = typer.Option(Path("data/binance-um-futures"), help="Directory of historical files (the bundled "
                              "real sample by default)."),
    symbols: str = typer.Option("BTCUSDT,ETHUSDT,1000PEPEUSDT", help="Comma-separated symbols."),
    trade_days: int = typer.Option(7, min=1, help="The most recent days traded through the live chain."),
) -> None:
    """The whole system on historical files: replay the older part into the archive, label, train and promote,
    then replay the most recent days through features → predict → policy → risk → the paper exchange, and
    summarize what it traded (what `make run` runs)."""
    from connectors.history_files import load_history
    from streams.demo import plan, run_demo

    if not data.is_dir():
        raise typer.BadParameter(f"{data} is not a directory", param_hint="--data")
    settings = _settings()
    wanted = _symbols(symbols, settings)
    histories, _ = load_history(data, wanted)
    bars = [h.klines.open_time for h in histories.values() if len(h.klines)]
    if not bars:
        raise PerpflowError(f"no 5m klines of {', '.join(wanted)} in {data}")
    first, last = max(int(b.min()) for b in bars), min(int(b.max()) for b in bars) + 300_000
    p = plan(str(data), wanted, first, last, trade_days)
    _stop_on_signals()
    started = time.monotonic()
    up, t, models = run_demo(settings, p, say=lambda line: print(line, file=sys.stderr))
    _print_summary(up)
    table = Table(title=f"traded {_day(p.trade_start_ms)} → {_day(p.end_ms)} on models trained "
                        f"{_day(p.start_ms)} → {_day(p.train_end_ms)} ({time.monotonic() - started:.0f} s in all)")
    table.add_column("")
    table.add_column("", justify="right")
    m = t.metrics
    rows = [("bars with features", f"{t.bars:,}"),
            ("signals", " · ".join(f"{k} {v:,}" for k, v in sorted(t.signals.items())) or "none"),
            ("verdicts by reason", " · ".join(f"{k} {v:,}" for k, v in sorted(t.verdicts.items())) or "none"),
            ("orders", " · ".join(f"{k} {v:,}" for k, v in sorted(t.orders.items())) or "none"),
            ("trades closed (win rate)", f"{m['trades']:,} ({_share(m['win_rate'])})"),
            ("PnL gross at reference prices", f"{m['gross_pnl']:+,.2f} USDT"), ("fees", f"{-m['fees']:+,.2f} USDT"),
            ("slippage", f"{-m['slippage']:+,.2f} USDT"), ("funding", f"{m['funding']:+,.2f} USDT"),
            ("net PnL", f"{m['net_pnl']:+,.2f} USDT"), ("max drawdown (equity)", f"{m['max_drawdown']:.2%}"),
            ("trading state changes", " → ".join(t.trading_states) or "none (RUNNING throughout)")]
    for label_, value in rows:
        table.add_row(label_, value)
    out.print(table)
    for model_id, m in models:
        out.print(f"model {model_id}: out-of-sample AUC {m.get('auc', float('nan')):.3f}, "
                  f"log loss {m.get('log_loss', float('nan')):.4f}")
    if not t.signals.get("LONG") and not t.signals.get("SHORT"):
        out.print(f"no entry qualified: the best P(win) was {t.best_p_win:.3f} against PERPFLOW_MIN_PWIN "
                  f"{settings.min_pwin} with EV net of costs > PERPFLOW_MIN_EV {settings.min_ev} — the models find "
                  "no edge after fees and slippage here, and perpflow does not trade without one")


@app.command()
def worker() -> None:
    """Run one Faust worker (the decision-chain agents) against PERPFLOW_KAFKA_BOOTSTRAP or the broker of
    the running `perpflow up`."""
    from streams.stack import StackInfo
    from streams.worker import run_worker

    settings = _settings()
    info = StackInfo.load(settings)
    bootstrap = settings.kafka_bootstrap or (info.bootstrap if info else "")
    if not bootstrap:
        raise PerpflowError("no broker: set PERPFLOW_KAFKA_BOOTSTRAP or start `perpflow up` first")
    run_worker(settings, bootstrap)


# -- perpflow connector: one exchange connector as its own service (streams/connector.py) -------------------------
class ConnectorPart(StrEnum):
    market = "market"
    user = "user"
    execution = "execution"


@app.command()
def connector(
    part: ConnectorPart = typer.Argument(..., help="market: Binance market streams + REST backfill → md.*; user: "
                                         "the user data stream → user.events, risk.events; execution: orders → "
                                         "Binance orders (live), reconciled. There is no paper connector: the "
                                         "worker's risk agent paper-trades (PERPFLOW_PAPER_TRADING)."),
    symbols: str = typer.Option(None, help="Comma-separated symbols (default: PERPFLOW_SYMBOLS)."),
    start: str = typer.Option(None, help="market: first bar to backfill when md.klines holds none yet (UTC; "
                              "default: PERPFLOW_BINANCE_BACKFILL_HOURS ago)."),
    mainnet: bool = typer.Option(False, "--mainnet", help="Required for user and execution on Binance mainnet "
                                 "(PERPFLOW_BINANCE_TESTNET=false, or a REST/WS URL on a binance.com host): real "
                                 "money."),
) -> None:
    """Run one exchange connector on its own against PERPFLOW_KAFKA_BOOTSTRAP (or the broker of the running
    `perpflow up`), serving /metrics and /health on PERPFLOW_METRICS_PORT, until stopped. The docker-compose
    services and Kubernetes Deployments of the connectors run this; never run two execution connectors at once, nor
    one with a worker that paper-trades (run it with PERPFLOW_PAPER_TRADING=false)."""
    from streams.connector import LIVE_PARTS, run_connector
    from streams.stack import StackInfo

    start_ms = parse_time(start, "--start")
    if start_ms is not None and part is not ConnectorPart.market:
        raise typer.BadParameter("only the market connector backfills", param_hint="--start")
    settings = _settings()
    if part.value in LIVE_PARTS:
        if not (settings.binance_api_key.get_secret_value() and settings.binance_api_secret.get_secret_value()):
            raise PerpflowError(f"the {part.value} connector trades or watches the account: it needs "
                                "PERPFLOW_BINANCE_API_KEY and PERPFLOW_BINANCE_API_SECRET in the environment (testnet "
                                "keys unless PERPFLOW_BINANCE_TESTNET=false)")
        _check_live(settings, mainnet)
    if part is ConnectorPart.execution and settings.paper_trading:
        raise PerpflowError("the execution connector trades the orders on Binance, but PERPFLOW_PAPER_TRADING is "
                            "true: the workers' risk agent would fill them on paper too; set "
                            "PERPFLOW_PAPER_TRADING=false for the workers and this connector")
    info = StackInfo.load(settings)
    bootstrap = settings.kafka_bootstrap or (info.bootstrap if info else "")
    if not bootstrap:
        raise PerpflowError("no broker: set PERPFLOW_KAFKA_BOOTSTRAP or start `perpflow up` first")
    _stop_on_signals()
    run_connector(settings, bootstrap, part.value, _symbols(symbols, settings), start_ms)


def main() -> None:
    """Console entry point: usage errors and PerpflowError become one clear line, not a traceback."""
    try:
        rv = app(standalone_mode=False)
    except UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx else "perpflow"
        print(f"{cmd}: {' '.join(exc.format_message().split())} (see '{cmd} --help')", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except PerpflowError as exc:
        print(f"perpflow: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()

"""One typed settings object, read from PERPFLOW_* environment variables (and `.env` if present).

Defaults are the safe ones: embedded broker and store, Binance testnet, paper trading."""

from __future__ import annotations

import ipaddress
from functools import cache
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# the decision chain, in order: streams/<name>/agent.py (the predict agent runs the policy, streams/policy)
AGENTS = ("features", "predict", "risk")
# the topics the agents take one record per bar and symbol from: features md.klines, predict features, risk signals
# (and md.klines); what a replay's back-pressure, the drain wait and GET /status count as the chain's input
CHAIN_HOPS = ("md.klines", "features", "signals")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PERPFLOW_", env_file=".env", extra="ignore")

    home: Path = Path("./var")
    """Where the embedded store and run state live."""
    kafka_bootstrap: str = ""
    """host:port list of a Kafka cluster; empty = start the embedded Tansu broker."""
    clickhouse_url: SecretStr = SecretStr("")
    """http(s)://user:pass@host:8123/db of a ClickHouse server; empty = chDB in $home/clickhouse. Secret (it holds
    the password): shown only as `clickhouse_where`, the password masked."""
    symbols: Annotated[list[str], NoDecode] = ["BTCUSDT", "ETHUSDT"]
    """Comma-separated Binance symbols to trade and replay."""
    metrics_host: str = "127.0.0.1"
    """Bind address of the control API; anything but loopback needs PERPFLOW_CONTROL_TOKEN."""
    metrics_port: int = 9464
    """Port of the /metrics + control API server of `perpflow up`; 0 = any free port."""
    worker_metrics_port: int = 9465
    """Port of the /metrics server of a `perpflow worker`; 0 = any free port."""
    control_token: SecretStr = SecretStr("")
    """Bearer token of the HTTP routes that change state (trading start/stop/kill, promote, POST /sql) and the key
    of the HMAC every `control` record carries; empty = one is made per home in run/control-token (mode 0600), which
    only works on loopback: every process of a deployment needs the same token."""
    store_api: str = ""
    """Base URL of the control API of the `perpflow up` that holds an embedded store, for processes of another home
    (a worker fetching a model artifact, `perpflow sql`); empty = this home's `perpflow up`. Unused with a
    ClickHouse server."""
    control_url: str = ""
    """Base URL of the worker's control API for `perpflow trading ...`; empty = the local worker's."""
    topic_prefix: str = ""
    """Prefix of every topic a worker's agents read and write, and of their consumer group; `perpflow backtest` sets
    `bt.<run>.` for the workers of a run. Empty = the live topics."""
    run_worker: bool = True
    """Whether `perpflow up` starts a Faust worker (off when workers run as their own deployment)."""
    log_level: str = "INFO"
    sink_batch_rows: int = 50_000
    sink_batch_seconds: float = 1.0

    # -- Binance USDT-M (connectors/binance): only the base URLs differ between testnet, mainnet and a fake
    binance_testnet: bool = True
    """Testnet unless set to false; mainnet (this, or a REST/WS URL on a Binance production host) also needs
    `--mainnet` on the command line to trade."""
    binance_rest_url: str = ""
    """REST base URL; empty = the testnet's or mainnet's."""
    binance_ws_url: str = ""
    """WebSocket base URL (combined market streams at /stream, user data at /ws/<listenKey>); empty = default."""
    binance_api_key: SecretStr = SecretStr("")
    binance_api_secret: SecretStr = SecretStr("")
    """API credentials: from the environment only, never logged."""
    binance_intervals: Annotated[list[str], NoDecode] = ["1m", "5m"]
    """Kline intervals the market connector streams and backfills."""
    binance_recv_window_ms: int = 5000
    binance_leverage: int = 2
    """Leverage set per symbol (isolated margin) before the first order."""
    execution_max_intent_age_seconds: float = 600.0
    """An entry intent older than this (two 5m bars) is not traded when it reaches the execution connector."""
    execution_reconcile_seconds: float = 60.0
    """The execution connector reconciles positions and orders with the exchange this often (and on reconnects)."""
    binance_stale_seconds: float = 30.0
    """A market stream silent this long is treated as dead and reconnected."""
    binance_user_stale_seconds: float = 60.0
    """The user data stream is pinged every third of this; no pong or frame for this long and it is down (no new
    entries) and reconnected. An idle account's stream carries no events: silence is measured on pongs."""
    binance_max_connection_seconds: float = 23.5 * 3600
    """Connections are rolled before Binance's 24-hour limit."""
    binance_open_interest_seconds: float = 60.0
    """How often open interest is polled from REST."""
    binance_listen_key_keepalive_seconds: float = 30 * 60
    """PUT /fapi/v1/listenKey interval (a key lives 60 minutes)."""
    binance_backfill_hours: float = 24.0
    """On a first start with no bars in md.klines, how far back the market connector backfills."""

    # -- decision chain (streams/policy): EV thresholds and sizing; fee and slippage as in the label spec
    min_ev: float = 0.0
    """A side qualifies when its EV (return per unit of notional, net of costs) is above this..."""
    min_pwin: float = 0.55
    """... and its P(win) = P(TP) / (P(TP) + P(SL)) is at least this."""
    risk_per_trade_usdt: float = 50.0
    """Loss at the stop-loss a trade is sized for: notional = risk / stop distance."""
    leverage_min: int = 2
    leverage_max: int = 8
    leverage_default: int = 5
    """Leverage at the reference volatility; scaled inversely with ATR/price, kept in [min, max]."""
    leverage_ref_atr_pct: float = 0.003
    """The reference volatility: ATR(14) of 5m bars / price."""
    fee: float = 0.0004
    """Taker fee per fill (entry and exit), as the label spec's."""
    slippage: float = 0.0015
    """Slippage per fill (entry and exit), as the label spec's."""

    # -- live calibration of the promoted models (streams/calibration.py, computed by `perpflow up`)
    calibration_interval_seconds: float = 300.0
    """How often `perpflow up` recomputes perpflow_model_calibration_error."""
    calibration_predictions: int = 1000
    """Over how many of the latest predictions whose outcome is known (per side)."""
    calibration_min_predictions: int = 100
    """Fewer predictions with a known outcome: no calibration series for that side (too few to judge)."""

    # -- the risk guard (streams/risk): every rule's threshold; defaults from the seeds
    risk_max_margin_usage: float = 0.70
    """Isolated margin in use (the new entry's included) / equity above this rejects an entry."""
    risk_daily_loss: float = 0.02
    """Today's (UTC) loss ≥ this share of the day's starting equity: flatten everything and HALT."""
    risk_max_drawdown: float = 0.15
    """Drawdown from peak equity ≥ this: flatten everything and HALT."""
    risk_min_liq_distance_atr: float = 2.0
    """An entry needs its liquidation this many ATRs away; an open position closer than this is force-closed."""
    risk_max_funding_rate: float = 0.01
    """A funding rate beyond this, against the entry's side, rejects it."""
    risk_max_symbol_exposure: float = 0.20
    """Isolated margin on one symbol / equity above this rejects an entry (an isolated position loses at most it)."""
    risk_fat_finger_multiple: float = 10.0
    """An entry's notional above this many times the average approved notional rejects it."""
    risk_max_orders_per_minute: int = 10
    """Orders in a minute (event time) at which entries cool down for a minute."""
    risk_stale_seconds: float = 30.0
    """Live bars older than this (wall clock) are stale: their entries are rejected."""
    risk_allow_pyramiding: bool = False
    """Whether a second entry may add to a symbol's open position."""
    risk_close_retry_seconds: float = 60.0
    """A position still open this long after the guard's CLOSE (a kill, a loss HALT) gets the CLOSE again."""

    # -- the paper exchange (connectors/paper): the fill and cost model of paper trading
    paper_trading: bool = True
    """The worker's risk agent fills its own orders on the paper exchange (false when an execution connector
    trades an account: `perpflow up --live` sets it)."""
    paper_taker_fee: float = 0.0004
    """Fee per fill, a fraction of the notional (the labels' default)."""
    paper_slippage_bps: float = 15.0
    """Market fills move this far against the order (the labels' default slippage)."""
    paper_leverage: int = 5
    """Leverage of every paper position: its isolated margin is the entry notional divided by it."""
    paper_balance: float = 10_000.0
    """Starting USDT wallet balance."""

    agents: Annotated[list[str], NoDecode] = list(AGENTS)
    """Comma-separated agents a `perpflow worker` runs: the whole chain by default. Fewer drive one agent on its
    own, its inputs published by hand (the risk agent's tests publish the signals)."""
    watchdog_seconds: float = 120.0
    """A worker whose agent has input waiting but handles none of it this long is stalled: /health fails, trading
    is HALTED, a critical chain_stalled risk event (streams/watchdog.py). 0 turns the watchdog off."""

    @field_validator("symbols", mode="before")
    @classmethod
    def _split_symbols(cls, value):
        if isinstance(value, str):
            value = [s for s in value.replace(" ", "").split(",") if s]
        return [s.upper() for s in value]

    @field_validator("binance_intervals", mode="before")
    @classmethod
    def _split_intervals(cls, value):
        if isinstance(value, str):
            value = [s for s in value.replace(" ", "").split(",") if s]
        return value

    @field_validator("agents", mode="before")
    @classmethod
    def _split_agents(cls, value):
        if isinstance(value, str):
            value = [s for s in value.replace(" ", "").split(",") if s]
        unknown = [a for a in value if a not in AGENTS]
        if unknown:
            raise ValueError(f"unknown agent {', '.join(unknown)} (the agents: {', '.join(AGENTS)})")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("log level must be DEBUG, INFO, WARNING or ERROR")
        return value

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def run_dir(self) -> Path:
        return self.home_dir / "run"

    @property
    def embedded_store(self) -> bool:
        return not self.clickhouse_url.get_secret_value()

    @property
    def binance_rest_base(self) -> str:
        default = "https://testnet.binancefuture.com" if self.binance_testnet else "https://fapi.binance.com"
        return (self.binance_rest_url or default).rstrip("/")

    @property
    def binance_ws_base(self) -> str:
        default = "wss://stream.binancefuture.com" if self.binance_testnet else "wss://fstream.binance.com"
        return (self.binance_ws_url or default).rstrip("/")

    @property
    def clickhouse_dsn(self) -> str:
        """With the password: for the store's client only, never to print or store (see `clickhouse_where`)."""
        return self.clickhouse_url.get_secret_value() or f"chdb://{self.home_dir / 'clickhouse'}"

    @property
    def clickhouse_where(self) -> str:
        """The store's DSN as it may be shown: password masked."""
        return redact_dsn(self.clickhouse_dsn)

    @property
    def loopback_bind(self) -> bool:
        return is_loopback(self.metrics_host)

    def binance_mainnet_urls(self) -> list[tuple[str, str]]:
        """(the variable that chose it, URL) of each resolved Binance base URL on a production host: trading there
        moves real money, whether PERPFLOW_BINANCE_TESTNET says so or a URL was set by hand."""
        found = []
        for variable, explicit, url in (("PERPFLOW_BINANCE_REST_URL", self.binance_rest_url, self.binance_rest_base),
                                        ("PERPFLOW_BINANCE_WS_URL", self.binance_ws_url, self.binance_ws_base)):
            if is_binance_production(url):
                found.append((variable if explicit else "PERPFLOW_BINANCE_TESTNET", url))
        return found


TESTNET_HOSTS = ("testnet.binancefuture.com", "stream.binancefuture.com", "testnet.binance.vision")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "" (every interface) or a host name other than localhost
        return False


def is_binance_production(url: str) -> bool:
    """A host of binance.com that is not a testnet's (fapi.binance.com, fstream.binance.com, ...)."""
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    if host in TESTNET_HOSTS or host.startswith("testnet."):
        return False
    return host == "binance.com" or host.endswith(".binance.com")


def redact_dsn(url: str) -> str:
    """The URL with its password as ***, to print or store."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@cache
def settings() -> Settings:
    return Settings()

"""One typed settings object, read from PERPFLOW_* environment variables (and `.env` if present).

Defaults are the safe ones: embedded broker and store, Binance testnet, paper trading."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated

from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PERPFLOW_", env_file=".env", extra="ignore")

    home: Path = Path("./var")
    """Where the embedded store and run state live."""
    kafka_bootstrap: str = ""
    """host:port list of a Kafka cluster; empty = start the embedded Tansu broker."""
    clickhouse_url: str = ""
    """http(s)://user:pass@host:8123/db of a ClickHouse server; empty = chDB in $home/clickhouse."""
    symbols: Annotated[list[str], NoDecode] = ["BTCUSDT", "ETHUSDT"]
    """Comma-separated Binance symbols to trade and replay."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    """Port of the /metrics + control API server of `perpflow up`; 0 = any free port."""
    worker_metrics_port: int = 9465
    """Port of the /metrics server of a `perpflow worker`; 0 = any free port."""
    run_worker: bool = True
    """Whether `perpflow up` starts a Faust worker (off when workers run as their own deployment)."""
    log_level: str = "INFO"
    sink_batch_rows: int = 50_000
    sink_batch_seconds: float = 1.0

    @field_validator("symbols", mode="before")
    @classmethod
    def _split_symbols(cls, value):
        if isinstance(value, str):
            value = [s for s in value.replace(" ", "").split(",") if s]
        return [s.upper() for s in value]

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
        return not self.clickhouse_url

    @property
    def clickhouse_dsn(self) -> str:
        return self.clickhouse_url or f"chdb://{self.home_dir / 'clickhouse'}"


@cache
def settings() -> Settings:
    return Settings()

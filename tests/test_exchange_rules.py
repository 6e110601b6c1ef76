"""Exchange rules for any symbol: files saved from Binance's exchangeInfo and leverageBracket answers are imported
and used by the policy (and the guard and the paper exchange, through the same table); a run whose symbols lack
rules stops at start saying what to run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from connectors.binance.rules import RulesFileError, exchange_rules, import_rule_files, leverage_brackets
from streams.policy.signals import Policy
from streams.settings import Settings
from tests.test_policy_ev import prediction

ROOT = Path(__file__).resolve().parents[1]
PERPFLOW = str(Path(sys.executable).parent / "perpflow")


def symbol_info(symbol: str, tick: str = "0.0100", status: str = "TRADING") -> dict:
    """One entry of GET /fapi/v1/exchangeInfo's `symbols`, every field Binance sends (strings where it sends them)."""
    return {"symbol": symbol, "pair": symbol, "contractType": "PERPETUAL", "deliveryDate": 4133404800000,
            "onboardDate": 1569398400000, "status": status, "maintMarginPercent": "2.5000",
            "requiredMarginPercent": "5.0000", "baseAsset": symbol[:-4], "quoteAsset": "USDT", "marginAsset": "USDT",
            "pricePrecision": 4, "quantityPrecision": 0, "baseAssetPrecision": 8, "quotePrecision": 8,
            "underlyingType": "COIN", "underlyingSubType": ["Layer-1"], "triggerProtect": "0.0500",
            "liquidationFee": "0.015000", "marketTakeBound": "0.05", "maxMoveOrderLimit": 10000,
            "filters": [{"filterType": "PRICE_FILTER", "minPrice": "0.4200", "maxPrice": "6857", "tickSize": tick},
                        {"filterType": "LOT_SIZE", "stepSize": "1", "maxQty": "1000000", "minQty": "1"},
                        {"filterType": "MARKET_LOT_SIZE", "stepSize": "1", "maxQty": "100000", "minQty": "1"},
                        {"filterType": "MAX_NUM_ORDERS", "limit": 200},
                        {"filterType": "MAX_NUM_ALGO_ORDERS", "limit": 10},
                        {"filterType": "MIN_NOTIONAL", "notional": "5"},
                        {"filterType": "PERCENT_PRICE", "multiplierUp": "1.0500", "multiplierDown": "0.9500",
                         "multiplierDecimal": "4"}],
            "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET"],
            "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"]}


def exchange_info(*symbols: dict) -> dict:
    return {"timezone": "UTC", "serverTime": 1704067200000, "futuresType": "U_MARGINED",
            "rateLimits": [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
                            "limit": 2400}],
            "exchangeFilters": [], "assets": [{"asset": "USDT", "marginAvailable": True,
                                               "autoAssetExchange": "-10000"}],
            "symbols": list(symbols)}


def brackets(symbol: str, first_mmr: float = 0.01) -> dict:
    """One entry of GET /fapi/v1/leverageBracket (a list of these)."""
    return {"symbol": symbol, "notionalCoef": 1.0, "brackets": [
        {"bracket": 1, "initialLeverage": 50, "notionalCap": 5000, "notionalFloor": 0,
         "maintMarginRatio": first_mmr, "cum": 0.0},
        {"bracket": 2, "initialLeverage": 20, "notionalCap": 100000, "notionalFloor": 5000,
         "maintMarginRatio": 0.025, "cum": 5000 * (0.025 - first_mmr)}]}


def saved(tmp_path: Path, name: str, doc) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_imported_rules_let_a_fourth_symbol_trade_and_a_symbol_not_trading_takes_no_entry(tmp_path):
    home = tmp_path / "home"
    policy = Policy(Settings(home=home, risk_per_trade_usdt=50))
    assert policy.signals([prediction(symbol="SOLUSDT", close=100.0, atr_14=0.5)])[0]["flat_reason"] == \
        "no_exchange_rules"
    info = exchange_info(symbol_info("SOLUSDT"), symbol_info("OLDUSDT", status="SETTLING"))
    done = import_rule_files(home, [saved(tmp_path, "info.json", info),
                                    saved(tmp_path, "brackets.json", [brackets("SOLUSDT"), brackets("OLDUSDT")])])
    assert done == {"exchange_info.json": ["OLDUSDT", "SOLUSDT"], "leverage_brackets.json": ["OLDUSDT", "SOLUSDT"]}
    policy = Policy(Settings(home=home, risk_per_trade_usdt=50))
    sol, old = policy.signals([prediction(symbol="SOLUSDT", close=100.0, atr_14=0.5),
                               prediction(symbol="OLDUSDT", close=100.0, atr_14=0.5)])
    # 50 USDT at a 0.5 stop (k_sl 1 ATR): 100 contracts of step 1; stop and target on the 0.01 tick
    assert (sol["decision"], sol["quantity"], sol["stop_loss"], sol["take_profit"]) == ("LONG", 100.0, 99.5, 101.0)
    assert (old["decision"], old["flat_reason"]) == ("FLAT", "symbol_not_trading")
    assert "BTCUSDT" in exchange_rules(home)  # the bundled symbols stay


def test_a_newer_import_replaces_a_symbols_rules_and_keeps_the_others(tmp_path):
    home = tmp_path / "home"
    import_rule_files(home, [saved(tmp_path, "a.json", exchange_info(symbol_info("SOLUSDT"), symbol_info("XRPUSDT"))),
                             saved(tmp_path, "b.json", [brackets("SOLUSDT", 0.01)])])
    import_rule_files(home, [saved(tmp_path, "c.json", exchange_info(symbol_info("SOLUSDT", tick="0.0010"))),
                             saved(tmp_path, "d.json", [brackets("SOLUSDT", 0.02)])])
    rules = exchange_rules(home)
    assert str(rules["SOLUSDT"].tick) == "0.0010" and "XRPUSDT" in rules
    assert leverage_brackets(home)["SOLUSDT"][0].mmr == 0.02


@pytest.mark.parametrize("doc, says", [
    ({"symbols": [{"symbol": "SOLUSDT", "filters": [{"filterType": "PRICE_FILTER", "tickSize": "0.01"}]}]},
     "no field 'LOT_SIZE'"),
    ({"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}, "neither an exchangeInfo"),
    ([{"symbol": "SOLUSDT", "brackets": [{"bracket": 1}]}], "no field"),
])
def test_a_file_that_is_not_binances_answer_is_refused_whole_and_nothing_is_written(tmp_path, doc, says):
    home = tmp_path / "home"
    good = saved(tmp_path, "good.json", exchange_info(symbol_info("XRPUSDT")))
    with pytest.raises(RulesFileError, match=says):
        import_rule_files(home, [good, saved(tmp_path, "bad.json", doc)])
    assert not (home / "rules").exists()


def _perpflow(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PERPFLOW_HOME": str(home)}
    return subprocess.run([PERPFLOW, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_replay_of_a_symbol_without_rules_stops_at_start_saying_what_to_run_and_runs_once_imported(tmp_path):
    home = tmp_path / "home"
    up = ("up", "--source", "replay", "--data", str(tmp_path / "no-files"), "--symbols", "BTCUSDT,SOLUSDT")
    (tmp_path / "no-files").mkdir()
    refused = _perpflow(home, *up)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "perpflow: no exchange rules for SOLUSDT (their signals could never trade): save GET /fapi/v1/exchangeInfo "
        "(and GET /fapi/v1/leverageBracket, signed) to files and run `perpflow rules import FILE...`"]
    assert not (home / "clickhouse").exists()  # stopped before anything started

    bad = _perpflow(home, "rules", "import", str(saved(tmp_path, "bad.json", {"msg": "x"})))
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "bad.json" in bad.stderr
    imported = _perpflow(home, "rules", "import", str(saved(tmp_path, "i.json", exchange_info(symbol_info("SOLUSDT")))),
                         str(saved(tmp_path, "b.json", [brackets("SOLUSDT")])))
    assert imported.returncode == 0, imported.stderr
    assert "exchangeInfo rules: 1 symbols imported (SOLUSDT)" in imported.stdout
    listed = _perpflow(home, "rules", "list", "--symbols", "SOLUSDT,DOGEUSDT")
    assert listed.returncode == 0, listed.stderr
    sol = next(line for line in listed.stdout.splitlines() if "SOLUSDT" in line)
    doge = next(line for line in listed.stdout.splitlines() if "DOGEUSDT" in line)
    assert "TRADING" in sol and "0.01" in sol and "no rules" in doge
    again = _perpflow(home, *up)  # past the rules check now: what stops it is the empty data directory
    assert again.returncode == 1 and "no exchange rules" not in again.stderr
    assert "no 5m kline files for" in again.stderr.strip().splitlines()[-1]

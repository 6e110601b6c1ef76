"""Encode + decode cost per message: the project's Avro codec (single-object encoding, fastavro) against
stdlib json, on the records the replay source publishes, built from real Binance data."""

from __future__ import annotations

import gc
import json
import math
import statistics
import time

from benchmarks import _data
from connectors.replay import ReplaySource
from schemas.codec import default_codec


def _filled(k: dict) -> dict:
    """The kline with the optional fields present, as the live stream has them. The files have no such
    columns, so the values are derived from the real bar (quote volume at the typical price, half of it
    bought by takers, one trade per ~10k USDT), rounded like Binance's decimal strings."""
    qv = round(k["volume"] * (k["high"] + k["low"] + k["close"]) / 3, 4)
    return {**k, "quote_volume": qv, "trades": 1 + int(qv // 10_000), "taker_buy_volume": round(k["volume"] / 2, 3),
            "taker_buy_quote_volume": round(qv / 2, 4)}


def real_records(quick: bool, per_kind: int) -> tuple[str, dict[str, tuple[str, list[dict]]]]:
    """{case: (schema stem, records)}: ~per_kind records of each kind, spread evenly over symbols and time;
    kinds with fewer real events (funding) are cycled up to per_kind."""
    data, symbols, start_ms = _data.choose(quick)
    src = ReplaySource("", str(data), symbols, start_ms, None)
    prepared, _ = src.load()
    klines, marks, funding = [], [], []
    for p in prepared:
        rows = range(0, len(p.kline_rows), max(len(p.kline_rows) * len(prepared) // per_kind, 1))
        klines += [src.kline_record(p, r) for r in rows]
        marks += [src.mark_record(p, r) for r in rows]
        funding += [src.funding_record(p, r) for r in range(len(p.funding_rows))]
    cases = {"md.klines": ("kline", klines),
             "md.klines, optional fields filled": ("kline", [_filled(k) for k in klines]),
             "md.markprice": ("mark_price", marks), "md.funding": ("funding", funding)}
    cycled = {case: (stem, (recs * math.ceil(per_kind / len(recs)))[:per_kind]) for case, (stem, recs) in cases.items()}
    return str(data), cycled


def _ops(stem: str) -> dict[str, dict]:
    """Per format: encode(records), decode(blobs), both(records), each a plain loop over the messages."""
    codec = default_codec()
    encode, decode, dumps, loads = codec.encode, codec.decode, json.dumps, json.loads

    def avro_enc(recs):
        for r in recs:
            encode(stem, r)

    def avro_dec(blobs):
        for b in blobs:
            decode(b)

    def avro_both(recs):
        for r in recs:
            decode(encode(stem, r))

    def json_enc(recs):
        for r in recs:
            dumps(r).encode()

    def json_dec(blobs):
        for b in blobs:
            loads(b)

    def json_both(recs):
        for r in recs:
            loads(dumps(r).encode())

    return {"avro": {"enc": avro_enc, "dec": avro_dec, "both": avro_both, "to_bytes": lambda r: encode(stem, r)},
            "json": {"enc": json_enc, "dec": json_dec, "both": json_both, "to_bytes": lambda r: dumps(r).encode()}}


def _time_us(fn, items) -> float:
    gc.disable()
    try:
        t = time.perf_counter_ns()
        fn(items)
        return (time.perf_counter_ns() - t) / 1000 / len(items)
    finally:
        gc.enable()


def run(quick: bool = False) -> bool:
    per_kind, reps = (3_000, 7) if quick else (10_000, 9)
    data, records = real_records(quick, per_kind)
    codec = default_codec()
    cases = []  # (case, records, ops, {format: encoded messages})
    for case, (stem, recs) in records.items():
        ops = _ops(stem)
        cases.append((case, recs, ops, {fmt: [o["to_bytes"](r) for r in recs] for fmt, o in ops.items()}))
    ok = True
    for case, recs, _, blobs in cases:  # the round trip must give the record back, or timing means nothing
        if not all(codec.decode(b)[1] == r for b, r in zip(blobs["avro"], recs, strict=True)) or not all(
                json.loads(b) == r for b, r in zip(blobs["json"], recs, strict=True)):
            print(f"FAIL {case}: a round trip did not return the record")
            ok = False
    # every repetition runs every case, operation and format in turn, so a slow spell of the (virtual)
    # machine spreads over all figures and the median drops it; repetition 0 is an untimed warm-up
    samples: dict[tuple, list[float]] = {}
    for rep in range(reps + 1):
        for case, recs, ops, blobs in cases:
            for fmt, o in ops.items():
                for op in ("enc", "dec", "both"):
                    us = _time_us(o[op], blobs[fmt] if op == "dec" else recs)
                    if rep:
                        samples.setdefault((case, fmt, op), []).append(us)
    med = {k: statistics.median(v) for k, v in samples.items()}

    print(f"codec: Avro single-object (schemas.codec) vs json.dumps/loads, data {data}, "
          f"{per_kind:,} messages per case, median of {reps} repetitions")
    head = f"{'record':<34} {'format':<9} {'encode µs':>10} {'decode µs':>10} {'both µs':>10} {'bytes':>7}"
    print(head + "\n" + "-" * len(head))
    for case, _, _, blobs in cases:
        size = {fmt: statistics.fmean(map(len, b)) for fmt, b in blobs.items()}
        for fmt in ("avro", "json"):
            print(f"{case:<34} {fmt:<9} " + " ".join(f"{med[case, fmt, op]:>10.2f}" for op in ("enc", "dec", "both"))
                  + f" {size[fmt]:>7.1f}")
        ratios = [med[case, "json", op] / med[case, "avro", op] for op in ("enc", "dec", "both")]
        print(f"{'':<34} {'json/avro':<9} " + " ".join(f"{r:>9.2f}x" for r in ratios)
              + f" {size['json'] / size['avro']:>6.2f}x")
    print("json/avro > 1: Avro is faster (or smaller); bytes = mean message size, Avro including its 10-byte header")
    return ok


if __name__ == "__main__":
    raise SystemExit(0 if run() else 1)

"""The Avro single-object codec: every schema round-trips, old writers read with new readers,
and anything undecodable is a DecodeError with a reason (the sink turns it into a dead letter)."""

from __future__ import annotations

import copy
import io

import pytest
from fastavro import parse_schema, schemaless_reader

from schemas.catalog import TOPICS
from schemas.codec import MAGIC, Codec, DecodeError, default_codec, schema_fingerprint

SAMPLE_VALUES = {"string": "x-1", "double": 1.25, "long": 1704067499999, "int": 7, "boolean": True,
                 "bytes": b"\x00\xff"}


def example(schema: dict, nulls: bool) -> dict:
    """A record of `schema`: nullable fields null (nulls) or set, arrays empty (nulls) or of one element."""
    return {f["name"]: value(f["type"], nulls) for f in schema["fields"]}


def value(t, nulls: bool):
    if isinstance(t, list):
        return None if nulls else value(t[1], nulls)
    if isinstance(t, str):
        return SAMPLE_VALUES[t]
    if t["type"] == "array":
        return [] if nulls else [value(t["items"], nulls)]
    if t["type"] == "record":
        return example(t, nulls)
    return SAMPLE_VALUES[t["type"]]  # a logical type over a primitive


@pytest.mark.parametrize("topic", TOPICS, ids=lambda t: t.name)
@pytest.mark.parametrize("nulls", [False, True])
def test_every_catalog_schema_round_trips(topic, nulls):
    codec = default_codec()
    record = example(codec.schema(topic.schema), nulls)
    data = codec.encode(topic.schema, record)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == schema_fingerprint(codec.schema(topic.schema))
    name, back = codec.decode(data)
    assert name == codec.full_name(topic.schema)
    assert back == record


def test_body_is_plain_avro_binary_after_the_ten_byte_header():
    codec = default_codec()
    record = example(codec.schema("funding"), nulls=False)
    data = codec.encode("funding", record)
    # any Avro reader given the writer schema reads the body after the header
    back = schemaless_reader(io.BytesIO(data[10:]), parse_schema(codec.schema("funding")), None)
    assert back["funding_rate"] == record["funding_rate"]


def test_fingerprint_matches_the_avro_spec_for_a_primitive():
    # CRC-64-AVRO of the canonical form "int" is 0x7275d51a3f395c8f (Avro spec test vectors,
    # as Java's SchemaNormalization gives it); the header stores it little-endian
    assert schema_fingerprint("int") == (0x7275D51A3F395C8F).to_bytes(8, "little")


def test_old_writer_reads_with_new_reader_schema():
    codec = Codec()
    old = {"type": "record", "name": "Kline", "namespace": "perpflow",
           "fields": [{"name": "event_id", "type": "string"}, {"name": "close", "type": "double"}]}
    new = copy.deepcopy(old)
    new["fields"].append({"name": "trades", "type": ["null", "long"], "default": None})
    new["fields"].append({"name": "source", "type": "string", "default": "unknown"})
    codec.add_current("kline", new)
    codec.register(old)
    old_message = codec.encode_with(old, {"event_id": "a", "close": 2.5})
    name, record = codec.decode(old_message)
    assert name == "perpflow.Kline"
    assert record == {"event_id": "a", "close": 2.5, "trades": None, "source": "unknown"}
    # and a message of the new writer still reads normally
    assert codec.decode(codec.encode("kline", {"event_id": "b", "close": 1.0, "trades": 3, "source": "s"}))[1][
        "trades"] == 3


@pytest.mark.parametrize(
    "payload, reason",
    [
        (None, "too_short"),
        (b"\xc3\x01\x00", "too_short"),
        (b'{"json": "not avro"}', "bad_magic"),
        (MAGIC + b"\x01\x02\x03\x04\x05\x06\x07\x08" + b"\x00", "unknown_fingerprint"),
    ],
)
def test_undecodable_messages_raise_with_a_reason(payload, reason):
    with pytest.raises(DecodeError) as info:
        default_codec().decode(payload)
    assert info.value.reason == reason


def test_truncated_and_padded_bodies_are_rejected():
    codec = default_codec()
    data = codec.encode("funding", example(codec.schema("funding"), nulls=False))
    with pytest.raises(DecodeError) as info:
        codec.decode(data[:-3])
    assert info.value.reason == "corrupt_body"
    with pytest.raises(DecodeError) as info:
        codec.decode(data + b"\x00\x00")
    assert info.value.reason == "trailing_bytes"


def test_times_stay_integers_in_python():
    codec = default_codec()
    rec = example(codec.schema("kline"), nulls=True)
    _, back = codec.decode(codec.encode("kline", rec))
    assert isinstance(back["open_time"], int) and back["open_time"] == 1704067499999



def test_messages_of_a_retired_schema_version_still_read():
    """predictions gained `skip_reason`: a record written before (still in a topic when perpflow is upgraded) reads
    with the field's default instead of going to the dead letters."""
    import json
    from importlib import resources

    old = json.loads(resources.files("schemas").joinpath("avro/retired/prediction-1.avsc").read_text())
    assert "skip_reason" not in {f["name"] for f in old["fields"]}
    codec = default_codec()
    record = {f["name"]: f.get("default") for f in old["fields"]}
    record.update(event_id="prediction:BTCUSDT:5m:1", event_time=2, symbol="BTCUSDT", source="replay", interval="5m",
                  open_time=1, close=42_000.0, k_tp=2.0, k_sl=1.0, model_id_long="l", model_id_short="s",
                  **{f"{n}_{side}": 0.5 for n in ("p_tp", "p_sl", "p_timeout", "hold_bars", "mae")
                     for side in ("long", "short")})
    name, got = codec.decode(codec.encode_with(old, record))
    assert name == "perpflow.Prediction" and got == {**record, "skip_reason": ""}

"""Avro single-object encoding (Avro spec): `C3 01`, the writer schema's 8-byte little-endian
CRC-64-AVRO fingerprint, then the Avro binary body.

The decoder finds the writer schema by fingerprint among every schema it knows (current ones from
`schemas/avro/*.avsc` plus retired versions registered with `register`, those of `schemas/avro/retired/` by
`default_codec`), and resolves it to the
current reader schema of the same record name, so a field added with a default still reads old
messages.

Times are plain ints (UTC epoch ms) in Python: the logicalType annotations stay in the `.avsc`
files for other readers, but are stripped from the schemas fastavro uses (they are not part of
the canonical form, so fingerprints are unchanged) — no datetime objects on the hot path.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

MAGIC = b"\xc3\x01"
HEADER_LEN = 10


class DecodeError(ValueError):
    """A message that cannot be decoded; `reason` is a short machine-readable word."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _strip_logical_types(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_strip_logical_types(v) for v in node]
    return node


def schema_fingerprint(schema: dict) -> bytes:
    canonical = to_parsing_canonical_form(parse_schema(schema, _write_hint=False))
    return bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))


@dataclass(frozen=True)
class _Schema:
    full_name: str
    raw: dict  # as written in the .avsc (with logical types): the source of ClickHouse DDL
    parsed: Any  # fastavro-parsed, logical types stripped
    header: bytes  # MAGIC + fingerprint


class Codec:
    def __init__(self) -> None:
        self._current: dict[str, _Schema] = {}  # by schema file stem
        self._by_full_name: dict[str, _Schema] = {}  # current reader schema per record name
        self._writers: dict[bytes, _Schema] = {}  # every known writer schema by fingerprint

    def _make(self, raw: dict) -> _Schema:
        full_name = f"{raw.get('namespace', '')}.{raw['name']}".lstrip(".")
        parsed = parse_schema(_strip_logical_types(raw))
        return _Schema(full_name, raw, parsed, MAGIC + schema_fingerprint(raw))

    def add_current(self, stem: str, raw: dict) -> None:
        s = self._make(raw)
        self._current[stem] = s
        self._by_full_name[s.full_name] = s
        self._writers[s.header[2:]] = s

    def register(self, raw: dict) -> bytes:
        """Register a retired writer schema (an older version of a current record)."""
        s = self._make(raw)
        self._writers[s.header[2:]] = s
        return s.header[2:]

    def schema(self, stem: str) -> dict:
        return self._current[stem].raw

    def full_name(self, stem: str) -> str:
        return self._current[stem].full_name

    def encode(self, stem: str, record: dict) -> bytes:
        s = self._current[stem]
        buf = io.BytesIO()
        buf.write(s.header)
        schemaless_writer(buf, s.parsed, record)
        return buf.getvalue()

    def encode_with(self, raw_writer_schema: dict, record: dict) -> bytes:
        """Encode with an explicit (e.g. retired) writer schema; used to produce old data."""
        s = self._make(raw_writer_schema)
        buf = io.BytesIO()
        buf.write(s.header)
        schemaless_writer(buf, s.parsed, record)
        return buf.getvalue()

    def decode(self, data: bytes | None) -> tuple[str, dict]:
        """Return (record full name, record) read with the current schema of that record."""
        if data is None or len(data) < HEADER_LEN:
            raise DecodeError("too_short", f"{0 if data is None else len(data)} bytes, need ≥ {HEADER_LEN}")
        if data[:2] != MAGIC:
            raise DecodeError("bad_magic", f"starts with {data[:2].hex()}, expected c301")
        writer = self._writers.get(data[2:HEADER_LEN])
        if writer is None:
            raise DecodeError("unknown_fingerprint", data[2:HEADER_LEN].hex())
        reader = self._by_full_name.get(writer.full_name, writer)
        buf = io.BytesIO(data)
        buf.seek(HEADER_LEN)
        try:
            if reader is writer:
                record = schemaless_reader(buf, writer.parsed, None)
            else:
                record = schemaless_reader(buf, writer.parsed, reader.parsed)
        except Exception as exc:  # fastavro raises several types for corrupt bodies
            raise DecodeError("corrupt_body", f"{type(exc).__name__}: {exc}") from None
        if buf.tell() != len(data):
            raise DecodeError("trailing_bytes", f"{len(data) - buf.tell()} bytes after the record")
        return writer.full_name, record


@cache
def default_codec() -> Codec:
    """The codec with every schema shipped in schemas/avro/, and the older versions in schemas/avro/retired/
    (`<name>-<n>.avsc`): messages written before a field was added stay readable after an upgrade."""
    codec = Codec()
    avro = resources.files("schemas").joinpath("avro")
    for entry in sorted(avro.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".avsc"):
            codec.add_current(entry.name[: -len(".avsc")], json.loads(entry.read_text()))
    for entry in sorted(avro.joinpath("retired").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".avsc"):
            codec.register(json.loads(entry.read_text()))
    return codec

"""A small typed model of the Grafana dashboard JSON that perpflow provisions.

Only what the dashboards use: rows, time series, stats, tables and bar gauges, with Prometheus or ClickHouse
(grafana-clickhouse-datasource) queries. Each ClickHouse query names the columns the panel reads, so the
tests can run it against the real schema and check them; each PromQL expression is parsed by promtool."""

from __future__ import annotations

from dataclasses import dataclass

PROMETHEUS = {"type": "prometheus", "uid": "prometheus"}
CLICKHOUSE = {"type": "grafana-clickhouse-datasource", "uid": "clickhouse"}
GRID_WIDTH = 24
SCHEMA_VERSION = 39  # Grafana 11


@dataclass(frozen=True)
class PromQuery:
    expr: str
    legend: str = ""
    heatmap: bool = False  # histogram buckets (`le` series) shown as a distribution

    def target(self, ref_id: str) -> dict:
        return {"datasource": PROMETHEUS, "refId": ref_id, "expr": self.expr, "legendFormat": self.legend or "__auto",
                "range": True, "format": "heatmap" if self.heatmap else "time_series"}


@dataclass(frozen=True)
class SqlQuery:
    """Raw SQL for the ClickHouse data source; may use its macros ($__timeFilter(col), $__timeInterval(col),
    $__fromTime, $__toTime). `columns` are the result columns the panel reads, in order."""

    sql: str
    columns: tuple[str, ...]
    time_series: bool = False  # a `time` column first, then values (long format: string columns become labels)

    def target(self, ref_id: str) -> dict:
        return {"datasource": CLICKHOUSE, "refId": ref_id, "editorType": "sql", "rawSql": self.sql,
                "queryType": "timeseries" if self.time_series else "table",
                "format": 0 if self.time_series else 1}  # the plugin's Format enum: 0 time series, 1 table


Query = PromQuery | SqlQuery


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # timeseries | stat | table | bargauge
    unit: str = "short"
    description: str = ""
    width: int = 12
    height: int = 8

    @property
    def datasource(self) -> dict:
        kinds = {type(q) for q in self.queries}
        if len(kinds) != 1:
            raise ValueError(f"panel {self.title!r} mixes data sources")
        return PROMETHEUS if kinds == {PromQuery} else CLICKHOUSE


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    tags: tuple[str, ...] = ("perpflow",)
    time_from: str = "now-6h"
    refresh: str = "30s"

    def panels(self) -> list[Panel]:
        return [p for r in self.rows for p in r.panels]

    def to_json(self) -> dict:
        out, next_id, y = [], 1, 0
        for row in self.rows:
            out.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False,
                        "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}, "panels": []})
            next_id, y, x, row_h = next_id + 1, y + 1, 0, 0
            for p in row.panels:
                if x + p.width > GRID_WIDTH:  # wrap
                    x, y, row_h = 0, y + row_h, 0
                out.append(_panel_json(p, next_id, x, y))
                next_id, x, row_h = next_id + 1, x + p.width, max(row_h, p.height)
            y += row_h
        return {
            "uid": self.uid, "title": self.title, "description": self.description, "tags": list(self.tags),
            "timezone": "utc", "editable": True, "graphTooltip": 1, "schemaVersion": SCHEMA_VERSION, "version": 1,
            "time": {"from": self.time_from, "to": "now"}, "refresh": self.refresh,
            "annotations": {"list": []}, "templating": {"list": []}, "links": [], "panels": out,
        }


def _panel_json(p: Panel, panel_id: int, x: int, y: int) -> dict:
    options = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
               "tooltip": {"mode": "multi", "sort": "desc"}} if p.kind == "timeseries" else {}
    if p.kind in ("stat", "bargauge"):
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return {
        "id": panel_id, "type": p.kind, "title": p.title, "description": p.description,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y}, "datasource": p.datasource,
        "targets": [q.target(chr(ord("A") + i)) for i, q in enumerate(p.queries)],
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []}, "options": options,
    }

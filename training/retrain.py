"""`perpflow retrain`: the model lifecycle in one step, as a deployment runs it on a schedule.

From the newest archived bar back: the last `holdout_days` are the newest unseen window, kept out of training; the
`train_days` before them, less the label horizon (a training label must not look into the holdout), train. Labels
are built over both (the features are the archive's, as the stream computed them, or `perpflow features build`'s),
both sides are trained walk-forward, and each candidate is scored on the holdout beside the side's incumbent. It
is promoted only through the gates: the registry's (feature schema, not worse on the common out-of-fold window)
and this one's — on the holdout, log loss and Brier of P(TP) no worse than the incumbent's, or, with no
incumbent, than the constant base rate's. The outcome of each side, promoted or kept with the gate that refused,
is returned for the caller to publish (`control`, kind `retrain_outcome`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from connectors.clickhouse_store import Store
from streams.errors import PerpflowError
from training import registry, tables
from training.evaluate import evaluate
from training.label_build import build_labels
from training.labels import LabelSpec
from training.pipeline import train_models
from training.train import TrainConfig

BAR_MS = 300_000
DAY_MS = 86_400_000


@dataclass
class Window:
    train_start: int
    train_end: int  # exclusive; the label horizon short of the holdout
    holdout_start: int
    end: int  # exclusive: just after the newest archived bar

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Outcome:
    side: str
    candidate: str
    promoted: bool
    gates: list[registry.Gate] = field(default_factory=list)
    holdout: dict = field(default_factory=dict)  # candidate's and incumbent's metrics on the newest window

    @property
    def refused_by(self) -> str:
        return "; ".join(f"{g.name}: {g.detail}" for g in self.gates if not g.ok)

    def to_json(self) -> dict:
        return {"side": self.side, "candidate": self.candidate, "promoted": self.promoted,
                "gates": [g.__dict__ for g in self.gates], "refused_by": self.refused_by, "holdout": self.holdout}


def window(store: Store, symbols: list[str], train_days: int, holdout_days: int, spec: LabelSpec) -> Window:
    """The windows ending at the newest 5m bar all `symbols` have in the archive."""
    if not tables.exists(store, "md_klines"):
        raise PerpflowError("no archived bars: run `perpflow up` (it archives every topic) before retraining")
    listed = ", ".join(f"'{s}'" for s in symbols)
    found = dict(store.query_rows(
        "SELECT toString(symbol), toUnixTimestamp64Milli(max(open_time)) FROM md_klines FINAL "
        f"WHERE interval = '5m' AND symbol IN ({listed}) GROUP BY symbol"))
    missing = [s for s in symbols if s not in found]
    if missing:
        raise PerpflowError(f"no archived 5m bars of {', '.join(missing)}: archive them before retraining")
    end = min(found.values()) + BAR_MS
    holdout_start = end - holdout_days * DAY_MS
    return Window(holdout_start - train_days * DAY_MS, holdout_start - (spec.horizon + 1) * BAR_MS, holdout_start, end)


def holdout_gate(candidate: dict, incumbent: dict | None) -> registry.Gate:
    name = "not worse on the newest unseen window"
    c = candidate
    if incumbent is None:
        ok = c["log_loss"] <= c["log_loss_base"] and c["brier"] <= c["brier_base"]
        return registry.Gate(name, ok, f"{c['rows']:,} rows: log loss {c['log_loss']:.5f} vs the base rate's "
                             f"{c['log_loss_base']:.5f}, Brier {c['brier']:.5f} vs {c['brier_base']:.5f}")
    ok = c["log_loss"] <= incumbent["log_loss"] and c["brier"] <= incumbent["brier"]
    return registry.Gate(name, ok, f"{c['rows']:,} rows: log loss {c['log_loss']:.5f} vs the incumbent's "
                         f"{incumbent['log_loss']:.5f}, Brier {c['brier']:.5f} vs {incumbent['brier']:.5f}")


def retrain(store: Store, models_dir: Path, symbols: list[str], train_days: int, holdout_days: int, spec: LabelSpec,
            cfg: TrainConfig, actor: str, publish: Callable | None = None,
            say: Callable[[str], None] = print) -> tuple[Window, list[Outcome]]:
    w = window(store, symbols, train_days, holdout_days, spec)
    say(f"retrain: training on {_day(w.train_start)} → {_day(w.train_end)}, the newest unseen window "
        f"{_day(w.holdout_start)} → {_day(w.end)}")
    build_labels(store, symbols, w.train_start, w.end, spec, say=say)
    trained = train_models(store, models_dir, ["long", "short"], symbols, w.train_start, w.train_end, spec.id, cfg,
                           say=say)
    outcomes = []
    for row, _ in trained:
        incumbent = registry.promoted(store, row["side"])
        scored = {"candidate": _scored(evaluate(store, row, w.holdout_start, w.end))}
        if incumbent is not None and incumbent["label_spec_id"] == row["label_spec_id"]:
            scored["incumbent"] = {"id": incumbent["id"],
                                   **_scored(evaluate(store, incumbent, w.holdout_start, w.end))}
        gate = holdout_gate(scored["candidate"], scored.get("incumbent"))
        outcome = Outcome(row["side"], row["id"], False, holdout=scored)
        try:
            result = registry.promote(store, row["id"], actor, f"retrain: {gate.detail}", extra_gates=[gate],
                                      publish=publish)
            outcome.promoted, outcome.gates = True, result.gates
        except registry.Refused as refused:
            outcome.gates = refused.gates
        say(f"{row['side']}: {row['id']} " + ("promoted" if outcome.promoted else f"kept the incumbent "
                                              f"({outcome.refused_by})"))
        outcomes.append(outcome)
    return w, outcomes


def _scored(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("rows", "rate", "auc", "log_loss", "log_loss_base", "brier", "brier_base", "ece")}


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")

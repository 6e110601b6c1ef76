"""`python -m grafana`: write the dashboards' JSON to grafana/dashboards/ (what Grafana provisions)."""

from __future__ import annotations

import json
from pathlib import Path

from grafana.boards import DASHBOARDS

OUT = Path(__file__).resolve().parent / "dashboards"


def render(board) -> str:
    return json.dumps(board.to_json(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for board in DASHBOARDS:
        path = OUT / f"{board.uid}.json"
        path.write_text(render(board))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

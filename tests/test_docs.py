"""The README documents what the code defines: every topic of the catalog, every setting."""

from __future__ import annotations

from schemas.catalog import TOPICS
from streams.settings import Settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_every_catalog_topic_is_documented():
    missing = [t.name for t in TOPICS if f"`{t.name}`" not in README]
    assert not missing, f"README's topic table lacks {missing}"


def test_every_setting_is_documented():
    missing = [f"PERPFLOW_{name.upper()}" for name in Settings.model_fields
               if f"PERPFLOW_{name.upper()}" not in README]
    assert not missing, f"README's settings table lacks {missing}"


def test_every_command_is_documented():
    from streams.cli import app

    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    for group in app.registered_groups:
        names += [f"{group.name} {c.name or c.callback.__name__}" for c in group.typer_instance.registered_commands]
    missing = [n for n in names if f"`perpflow {n}" not in README]
    assert not missing, f"README's command table lacks {missing}"

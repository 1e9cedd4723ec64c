"""The README's config reference is the schema's: regenerating it must not change the README."""
from __future__ import annotations

import dataclasses

import pytest

from helpers import ROOT, run_cli
from propulsion_ds.config import reference, schema


def test_readme_holds_the_generated_reference():
    readme = (ROOT / "README.md").read_text()
    assert reference.current_block(readme) == reference.markdown(), (
        "README.md's config reference is stale: run python launch/config_reference.py --write README.md")


def test_every_key_is_in_the_reference_with_its_help():
    table = reference.markdown()
    for leaf in schema.leaves():
        assert f"| `{leaf.path}` |" in table
        assert leaf.meta["help"] in table.replace("\\|", "|")


def test_a_new_field_without_help_or_readme_update_fails(monkeypatch):
    real = schema.leaves
    knob = schema.option(3, ge=1, help="a knob added to the schema")
    extra = schema.Leaf("logging.new_knob", int, 3, dict(knob.metadata))
    monkeypatch.setattr(reference, "leaves", lambda: [*real(), extra])
    assert "| `logging.new_knob` | `3` | integer, >= 1 | a knob added to the schema |" in reference.markdown()
    assert reference.current_block((ROOT / "README.md").read_text()) != reference.markdown()

    @dataclasses.dataclass
    class NoHelp:
        knob: int = 1

    monkeypatch.setattr(reference, "leaves", lambda: real(NoHelp, "x."))
    with pytest.raises(ValueError, match="x.knob has no help"):
        reference.markdown()


def test_replace_block_round_trips_and_needs_markers():
    text = f"intro\n{reference.START}\nold\n{reference.END}\noutro\n"
    out = reference.replace_block(text)
    assert out.startswith("intro\n") and out.endswith(f"{reference.END}\noutro\n")
    assert reference.current_block(out) == reference.markdown()
    with pytest.raises(ValueError, match="config-reference"):
        reference.replace_block("no markers here")


def test_launch_entry_prints_the_table():
    proc = run_cli("config_reference", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reference.markdown()

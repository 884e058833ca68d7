"""docs/config.md shows the defaults the code has."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import configdoc


def test_the_documented_defaults_are_the_real_ones() -> None:
    page = configdoc.PAGE.read_text()

    assert configdoc.render(page) == page, "run: python scripts/configdoc.py"

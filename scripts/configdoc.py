"""Write the default configuration into docs/config.md (between its markers).

Run ``python scripts/configdoc.py``; a test fails when the page is stale.
"""

from pathlib import Path

import msgspec

from taskqueue.server.config import Config

PAGE = Path(__file__).resolve().parent.parent / "docs" / "config.md"
BEGIN = "<!-- defaults: begin -->"
END = "<!-- defaults: end -->"


def defaults_block() -> str:
    text = msgspec.yaml.encode(msgspec.to_builtins(Config())).decode()
    return f"{BEGIN}\n```yaml\n{text}```\n{END}"


def render(page: str) -> str:
    head, _, rest = page.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + defaults_block() + tail


if __name__ == "__main__":
    PAGE.write_text(render(PAGE.read_text()))

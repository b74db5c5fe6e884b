"""Regenerate the option tables of docs/config.md from the config dataclasses.

    python -m curate.pipeline.config_docs            # rewrite docs/config.md between the markers
"""

from __future__ import annotations

import sys
from pathlib import Path

from curate.pipeline.config import config_reference_markdown

BEGIN = "<!-- BEGIN GENERATED OPTIONS -->"
END = "<!-- END GENERATED OPTIONS -->"


def update(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    path.write_text(text[:start] + "\n" + config_reference_markdown() + text[end:], encoding="utf-8")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "config.md"
    update(target)
    print(f"updated {target}")

"""benchmarks/RESULTS.md holds one section per benchmark; each benchmark rewrites only its own section."""

from __future__ import annotations

import re
from pathlib import Path

from timm_metaperturb.training.provenance import machine

__all__ = ["machine", "write_section"]

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach section is written by the benchmark it names; rerun that command to refresh it.\n"


def write_section(name: str, markdown: str, results: Path = RESULTS) -> None:
    """Replace (or append) the section between `<!-- name -->` markers in RESULTS.md."""
    text = results.read_text() if results.exists() else HEADER
    block = f"<!-- {name}:start -->\n{markdown.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    results.write_text(text)

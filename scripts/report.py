"""How every benchmark script records a run: `{stem}.json` (meta + rows) and `{stem}.md` beside it,
under docs/benchmarks/records/ by default, named by what was measured, on which card, when."""

from __future__ import annotations

import json
from pathlib import Path

RECORDS = "docs/benchmarks/records"


def card_name(device: str) -> str:
    """A card's name for a file name: "NVIDIA H100 80GB HBM3" -> "H100-80GB-HBM3"."""
    return device.removeprefix("NVIDIA ").replace(" ", "-")


def record_stem(benchmark: str, device: str, date: str, *what: str) -> str:
    """`{benchmark}_{card}_{date}_{what...}`: e.g. train_step_H100-80GB-HBM3_2026-12-07_321f_compiled_keep10."""
    return "_".join([benchmark, card_name(device), date, *(w for w in what if w)])


def write_report(out_dir: str | Path, stem: str, meta: dict, rows: list[dict], markdown: str) -> Path:
    """Write `{stem}.json` and `{stem}.md` under `out_dir` (created if needed); returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return out

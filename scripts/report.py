"""How every benchmark script records a run: `{stem}.json` (meta + rows) and `{stem}.md` beside it."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out_dir: str | Path, stem: str, meta: dict, rows: list[dict], markdown: str) -> Path:
    """Write `{stem}.json` and `{stem}.md` under `out_dir` (created if needed); returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return out

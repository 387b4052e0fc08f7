"""The benchmark contract (CONVENTIONS.md): print a table, write JSON with the
machine and configuration, and measure the baseline in the same run."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"bench/{name}.py", description=doc)
    ap.add_argument("--quick", action="store_true", help="about a minute; same ratios on less data")
    ap.add_argument("--out", default=f"bench/results/{name}.json", help="JSON results file")
    return ap


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for j, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write(out: str, name: str, config: dict[str, Any], figures: dict[str, Any]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    doc = {"bench": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
           "config": config, **figures}
    Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out}")

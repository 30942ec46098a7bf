"""docs/streaming.png from bench/results/streaming.json (needs matplotlib: the training extra)."""

from __future__ import annotations

import json
import sys

from bench.streaming import RESULTS, ROOT

OUT = ROOT / "docs" / "streaming.png"


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads((RESULTS / "streaming.json").read_text())
    single = [r for r in data["rows"] if r["k"] == 1 and not r["sessions_per_message"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for server in dict.fromkeys(r["server"] for r in single):
        rows = sorted((r for r in single if r["server"] == server), key=lambda r: r["streams"])
        streams = [r["streams"] for r in rows]
        left.plot(streams, [r["steps_per_s"] for r in rows], marker="o", label=server)
        right.plot(streams, [r["server_cpu_us_per_step"] for r in rows], marker="o", label=server)
    for ax, title in (
        (left, "steps/s (one timestep per message)"),
        (right, "server CPU µs per step"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"echo streaming, {data['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale by simulation: a 7B-shaped Llama on the meta device, sharded by this trainer's code over
64 fake ranks as HSDP 8 × 8; rank 0's parameter, gradient and AdamW bytes against the arithmetic."""

import json
import subprocess
import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from memory_plan import LAYOUTS, RankBytes, table_row  # noqa: E402


def test_7b_over_64_ranks_as_8x8_hsdp_holds_an_eighth_per_rank():
    # Its own process: the fake process group is that process's default group.
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "memory_plan.py"), "7B (Llama-2-7B)", "64", "8"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    h, i, layers, vocab = 4096, 11008, 32, 32000
    total = 2 * vocab * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h  # embeddings, LM head, blocks, final norm
    assert got["total_params"] == total
    # Sharded within groups of 8 (replicated across the 8 groups): an eighth of the fp32 weights,
    # not a sixty-fourth; gradients alike; AdamW two fp32 states per weight.
    assert got["params"] == 4 * total // 8
    assert got["grads"] == got["params"]
    assert got["optimizer"] == 2 * got["params"]
    # The docs' table (docs/clusters.md) is this code's output (scripts/memory_table.py --write-docs), not stale.
    layout = next(name for name, size in LAYOUTS[64] if size == 8)
    row = table_row("7B (Llama-2-7B)", 64, layout, RankBytes(**got))
    page = (ROOT / "docs" / "clusters.md").read_text(encoding="utf-8")
    assert row in page.splitlines(), f"docs/clusters.md memory table is stale ({row}): run python scripts/memory_table.py --write-docs"

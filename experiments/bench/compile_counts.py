"""Graphs torch.compile builds per transformer block over 20 compiled SFT steps on data of varied lengths,
with and without static shapes (train.shape_buckets; 0 = the packed shapes, as before buckets existed):

    python experiments/bench/compile_counts.py 0 64

Prints, per setting, the micro-batches, their distinct (B, T) shapes, the graphs dynamo made (how many
with dynamic sizes) and at which micro-batch each was made. The run is tests/test_static_shapes.py's
`compiled_run` (backend "eager": graph capture is what is counted, not inductor code)."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("MASTER_PORT", "29733")

from test_static_shapes import compiled_run  # noqa: E402

for buckets in map(int, sys.argv[1:] or ["0", "64"]):
    shapes, made, graphs = compiled_run(buckets)
    new = [i for i in range(len(shapes)) if made[i + 1] > made[i]]
    dynamic = sum(any(not isinstance(s, int) for size in g for s in size) for g in graphs)
    print(
        f"shape_buckets={buckets}: {len(shapes)} micro-batches, {len(set(shapes))} distinct shapes, "
        f"{len(graphs)} graphs ({dynamic} with dynamic sizes), made at micro-batches {new}"
    )

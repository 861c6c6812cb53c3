"""Rebuild bge_ray/quickstart/scifact_sample.jsonl from ../shared/data/scifact (see its SOURCE.txt).

The first ROWS training claims of train_minilm_hardnegs.jsonl, each with its positives and the
first NEGS of its 15 mined hard negatives. Run from the repository root:

    python scripts/build_quickstart_sample.py
"""

import json
import os
import sys

ROWS, NEGS = 200, 7
SRC = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "scifact", "train_minilm_hardnegs.jsonl")
DST = os.path.join(os.path.dirname(__file__), "..", "bge_ray", "quickstart", "scifact_sample.jsonl")


def main() -> int:
    with open(SRC, encoding="utf-8") as f, open(DST, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i == ROWS:
                break
            row = json.loads(line)
            out.write(json.dumps({"query": row["query"], "pos": row["pos"], "neg": row["neg"][:NEGS]}) + "\n")
    print(f"wrote {DST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rebuild the quickstart data in bge_ray/quickstart/ from ../shared/data/scifact (see its SOURCE.txt).

scifact_sample.jsonl: the first ROWS training claims of train_minilm_hardnegs.jsonl, each with its
positives and the first NEGS of its 15 mined hard negatives.
scifact_eval/: a held-out BEIR folder: the first EVAL_QUERIES test claims (by id) with their qrels,
and a corpus of their cited abstracts plus random others, EVAL_DOCS in all (seed 0).
Run from the repository root:

    python scripts/build_quickstart_sample.py
"""

import json
import os
import sys

ROWS, NEGS = 200, 7
EVAL_QUERIES, EVAL_DOCS = 60, 1000
SCIFACT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "scifact")
SRC = os.path.join(SCIFACT, "train_minilm_hardnegs.jsonl")
QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "bge_ray", "quickstart")
DST = os.path.join(QUICKSTART, "scifact_sample.jsonl")


def build_eval() -> None:
    import random

    qrels: dict[str, dict[str, str]] = {}
    with open(os.path.join(SCIFACT, "qrels.tsv"), encoding="utf-8") as f:
        next(f)
        for line in f:
            q, d, s = line.rstrip("\n").split("\t")
            qrels.setdefault(q, {})[d] = s
    keep = sorted(qrels, key=int)[:EVAL_QUERIES]
    relevant = {d for q in keep for d in qrels[q]}
    with open(os.path.join(SCIFACT, "corpus.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    others = [d for d in docs if d["_id"] not in relevant]
    chosen_ids = relevant | {d["_id"] for d in random.Random(0).sample(others, EVAL_DOCS - len(relevant))}
    out = os.path.join(QUICKSTART, "scifact_eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "corpus.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs if d["_id"] in chosen_ids)
    with open(os.path.join(SCIFACT, "queries_test.jsonl"), encoding="utf-8") as f:
        queries = [json.loads(line) for line in f]
    with open(os.path.join(out, "queries.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": q["_id"], "text": q["text"]}) + "\n" for q in queries if q["_id"] in keep)
    with open(os.path.join(out, "qrels.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{s}\n" for q in keep for d, s in qrels[q].items())
    print(f"wrote {out}")


def main() -> int:
    with open(SRC, encoding="utf-8") as f, open(DST, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i == ROWS:
                break
            row = json.loads(line)
            out.write(json.dumps({"query": row["query"], "pos": row["pos"], "neg": row["neg"][:NEGS]}) + "\n")
    print(f"wrote {DST}")
    build_eval()
    return 0


if __name__ == "__main__":
    sys.exit(main())

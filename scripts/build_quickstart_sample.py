"""Rebuild the quickstart data in bge_ray/quickstart/ from a SciFact folder in the BEIR layout
(corpus.jsonl, queries_test.jsonl, qrels.tsv and train_triplets.jsonl; see NOTICE for the source).

scifact_sample.jsonl: the first ROWS training claims of train_triplets.jsonl with their cited
abstracts as positives and NEGS hard negatives mined by `bge-ray mine` with the base model
(all-MiniLM-L6-v2, its own mean pooling) over the whole SciFact corpus: ranks 3-100, seed 42.
scifact_eval/: a held-out BEIR folder: the first EVAL_QUERIES test claims (by id) with their qrels,
and a corpus of their cited abstracts plus random others, EVAL_DOCS in all (seed 0).
Run from the repository root:

    python scripts/build_quickstart_sample.py --scifact /path/to/scifact
"""

import argparse
import json
import os
import sys

ROWS, NEGS = 200, 7
EVAL_QUERIES, EVAL_DOCS = 60, 1000
SCIFACT = ""  # set by main() from --scifact
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


def build_train() -> None:
    import glob
    import tempfile

    from bge_ray.tools.mine import mine

    with tempfile.TemporaryDirectory() as tmp:
        pairs = os.path.join(tmp, "pairs.jsonl")
        with open(os.path.join(SCIFACT, "train_triplets.jsonl"), encoding="utf-8") as f, open(pairs, "w", encoding="utf-8") as out:
            rows = [json.loads(line) for _, line in zip(range(ROWS), f, strict=False)]
            out.writelines(json.dumps({"query": r["query"], "pos": r["pos"]}) + "\n" for r in rows)
        mined_dir = os.path.join(tmp, "mined")
        mine(input_file=[pairs], output_dir=mined_dir, candidate_pool=[os.path.join(SCIFACT, "corpus.jsonl")],
             embedder_name_or_path="sentence-transformers/all-MiniLM-L6-v2", range_for_sampling="3-100",
             negative_number=NEGS, embedder_query_max_length=64, embedder_passage_max_length=256, seed=42)
        mined = {}
        for path in glob.glob(os.path.join(mined_dir, "*.jsonl")):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    mined[row["query"]] = row
    with open(DST, "w", encoding="utf-8") as out:
        for r in rows:
            out.write(json.dumps({"query": r["query"], "pos": r["pos"], "neg": mined[r["query"]]["neg"]}) + "\n")
    print(f"wrote {DST}")


def main() -> int:
    global SCIFACT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scifact", required=True, help="SciFact folder in the BEIR layout")
    SCIFACT = ap.parse_args().scifact
    build_train()
    build_eval()
    return 0


if __name__ == "__main__":
    sys.exit(main())

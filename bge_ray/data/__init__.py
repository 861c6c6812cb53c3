"""Training data: JSONL reading (jsonl), row rules and group sampling (triplets), instructions and
lengths (text), the Ray Data pipeline (pipeline), and batching (collate)."""

"""Add teacher scores (for knowledge distillation) on the cluster this job runs on.

    ray job submit --working-dir . -- python jobs/score.py --input_file s3://bucket/mined/ --output_dir s3://bucket/scored/ --reranker_name_or_path BAAI/bge-reranker-base --use_gpu

Takes the same arguments as `bge-ray score`.
"""

import os
import sys

# The code shipped with the job (`--working-dir .`) wins over any bge-ray installed on the node.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bge_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))

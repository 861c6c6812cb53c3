"""Evaluate models on the cluster this job runs on.

    ray job submit --working-dir . -- python jobs/evaluate.py --model BAAI/bge-small-en-v1.5 --model /mnt/ft --data s3://bucket/scifact --use_gpu

Takes the same arguments as `bge-ray eval`.
"""

import sys

from bge_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))

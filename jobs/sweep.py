"""Run a hyperparameter sweep on the cluster this job runs on.

    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/sweep.yaml [--num_samples 16 ...]

Takes the same arguments as `bge-ray tune`.
"""

import os
import sys

# The code shipped with the job (`--working-dir .`) wins over any bge-ray installed on the node.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bge_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))

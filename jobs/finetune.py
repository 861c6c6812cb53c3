"""Fine-tune on the cluster this job runs on.

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/quickstart.yaml [--key value ...]

Takes the same arguments as `bge-ray train`; with none, runs the bundled quickstart.
"""

import sys

from bge_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

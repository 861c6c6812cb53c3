"""Write docs/config.md from the config field definitions (tests/test_cli.py fails when it is stale).

    python scripts/config_reference.py
"""

import os

from bge_ray.cli import config_reference

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "config.md")

if __name__ == "__main__":
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(config_reference())
    print(f"wrote {os.path.normpath(OUT)}")

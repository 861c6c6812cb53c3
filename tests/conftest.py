"""One local Ray cluster for the whole session, tiny models built from a config, real tokenizers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import pytest  # noqa: E402

from tests.helpers import build_tiny_bert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that needs one (2 training workers + data tasks)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, log_to_driver=True,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()

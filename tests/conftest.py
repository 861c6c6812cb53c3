"""One local Ray cluster for the whole session, tiny models built from a config, real tokenizers, and the read
guard that keeps every test inside the checkout."""

from __future__ import annotations

import atexit
import importlib.util
import os
import secrets
import shutil
import site
import sys
import sysconfig
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- the read guard (tests/read_guard/sitecustomize.py): tests open nothing outside the checkout,
# the temp dir and the installed Python and system files; every process they start inherits it.
_SESSION_DIR = tempfile.mkdtemp(prefix="bge-ray-tests-")
atexit.register(shutil.rmtree, _SESSION_DIR, True)
# caches and configs that libraries keep in the home folder go to this session's temp dir instead
os.environ.update(HF_HOME=os.path.join(_SESSION_DIR, "hf"), XDG_CACHE_HOME=os.path.join(_SESSION_DIR, "cache"),
                  XDG_CONFIG_HOME=os.path.join(_SESSION_DIR, "config"),
                  MPLCONFIGDIR=os.path.join(_SESSION_DIR, "matplotlib"),
                  AWS_CONFIG_FILE=os.path.join(_SESSION_DIR, "aws", "config"),
                  AWS_SHARED_CREDENTIALS_FILE=os.path.join(_SESSION_DIR, "aws", "credentials"))
_GUARD_DIR = os.path.join(REPO, "tests", "read_guard")
_spec = importlib.util.spec_from_file_location("bge_ray_read_guard", os.path.join(_GUARD_DIR, "sitecustomize.py"))
read_guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(read_guard)
_SYSTEM_DIRS = ["/proc", "/sys", "/dev", "/etc", "/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/run"]
GUARD_ROOTS = [REPO, tempfile.gettempdir(), "/tmp", sys.prefix, sys.base_prefix, sys.exec_prefix,
               *site.getsitepackages(), site.getusersitepackages(), *sysconfig.get_paths().values(), *_SYSTEM_DIRS]
GUARD_LOG = os.environ.get(read_guard.LOG_ENV) or os.path.join(_SESSION_DIR, "read_guard.log")
open(GUARD_LOG, "a").close()
os.environ.update({read_guard.ROOTS_ENV: os.pathsep.join(GUARD_ROOTS), read_guard.LOG_ENV: GUARD_LOG,
                   "PYTHONPATH": os.pathsep.join([_GUARD_DIR, *filter(None, [os.environ.get("PYTHONPATH")])])})
read_guard.install(GUARD_ROOTS)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

# A local S3 server (moto) stands in for cloud storage; the variables must be set before the
# session's Ray cluster starts so that Ray Data's read tasks see them too.
S3_PORT = 5577 + os.getpid() % 1000
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                  AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}")

# Token authentication for the session's Ray head, set before anything imports ray (Ray reads the
# mode once per process); every subprocess and `ray job submit` inherits it.
_AUTH_DIR = tempfile.mkdtemp(prefix="bge-ray-auth-")
with open(os.path.join(_AUTH_DIR, "token"), "w") as _f:
    _f.write(secrets.token_hex(32))
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=os.path.join(_AUTH_DIR, "token"))
atexit.register(shutil.rmtree, _AUTH_DIR, True)

import pytest  # noqa: E402

from tests.helpers import build_tiny_bert, build_tiny_llm_reranker  # noqa: E402


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest's hook signature
    """The fast tier is every test that starts no Ray cluster and trains nothing: a test that uses the
    session's Ray head is marked ``slow`` here; tests that train or start a process group without it carry
    the mark themselves."""
    for item in items:
        if "ray_head" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_reads_outside_the_checkout():
    """Fails the test during which any process of the suite opened a path outside the allowed folders
    (the guard raises in the process itself too, but a process may swallow the error)."""
    start = os.path.getsize(GUARD_LOG)
    yield
    with open(GUARD_LOG, encoding="utf-8") as f:
        f.seek(start)
        seen = f.read().strip()
    if seen:
        pytest.fail(seen, pytrace=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="session")
def tiny_llm_reranker(tmp_path_factory) -> str:
    return build_tiny_llm_reranker(str(tmp_path_factory.mktemp("tiny_llm_reranker")))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """The session's one Ray cluster: a real head started with `ray start --head` (job server
    included), token authentication on with a token made for this session. Every test, every
    subprocess and every `ray job submit` joins it; it is stopped at the end even when tests fail."""
    import subprocess
    import time
    import urllib.request

    token = open(os.environ["RAY_AUTH_TOKEN_PATH"]).read()
    gcs_port, dash_port = _free_port(), _free_port()
    temp_dir = f"/tmp/brt-{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
    os.environ.update(RAY_ADDRESS=f"127.0.0.1:{gcs_port}", RAY_worker_niceness="0")
    log = open(tmp_path_factory.mktemp("ray_head") / "head.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         f"--dashboard-port={dash_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dash_port}"
    # a SIGTERM to pytest (CI cancelling, `timeout`) becomes a KeyboardInterrupt, so the teardown
    # below still stops the head
    import signal

    def _interrupt(signum, frame):  # noqa: ANN001, ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {proc.returncode}; see {log.name}")
            try:
                req = urllib.request.Request(f"{dashboard}/api/version",
                                             headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(req, timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"the Ray head's job server did not come up in 120 s; see {log.name}") from None
                time.sleep(1)
        yield {"address": os.environ["RAY_ADDRESS"], "dashboard": dashboard, "log": log.name}
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="session")
def ray_cluster(ray_head):
    """This process connected to the session's Ray head (2 training workers + data tasks fit)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head["address"], log_to_driver=True,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """A real S3 API on loopback (moto's server) with an empty bucket ``bge-ray-test``; yields a boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="bge-ray-test")
    yield client
    server.stop()

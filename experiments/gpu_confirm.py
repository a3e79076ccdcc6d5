"""Issue 26, Must 5: the confirmatory study's stages 2-3 (Table 5's curve, the B.1 baselines) on a lent GPU, with
SmolLM2's real weights, in two device calls on one warm machine.

Why two calls: a call carries at most 64 MiB with the working tree (~15 MB), and SmolLM2's weights are a 98 MB GGUF
(90 MB xz-compressed). The compressed stream is cut in two: call 1 carries the first piece and stashes it outside the
tree; call 2, within the machine's 30 s warm window, carries the rest (second piece, SST-2, the gguf and peft
wheels, a source manifest) and runs. Nothing is trusted on arrival: the joined stream, the GGUF, the data and
the wheels are checked against SHA-256s taken here, the weights transformers converts there must hash (tensor by
tensor) and tokenize exactly as here, and the copy of the code must be the manifest's commit, file by file
(``randmask_lab.experiment.results.source_manifest``), so every record names its commit. A check that fails
stops the run: records of other weights or unknown code would not belong in the study.

    python experiments/gpu_confirm.py --prepare     # here, on committed code: fill .gpu_confirm/part1 and part2
    # pause the CPU workers, restart them with --stages 0 1 (they keep stages 0-1; the GPU takes 2-3), then:
    device run, carry [".gpu_confirm/part1"]:  python3 experiments/gpu_confirm.py --stash
    device run, carry [".gpu_confirm/part2"], timeout_s 600, at once after the first:
                                               python3 experiments/gpu_confirm.py --run
    # back here: join its export (under the device's files_at) with the CPU workers' file, then regenerate pages:
    randmask merge experiments/results/smollm2_confirm.jsonl <files_at>/smollm2_confirm_gpu.jsonl \\
        --out experiments/results/smollm2_confirm.jsonl
    python experiments/gpu_confirm.py --dry-run     # here: all of the above on the CPU, tiny protocol (~3 min)

``--run`` runs ``randmask study --stages 2 3`` in several workers sharing one store (the runner's leases: no cell
runs twice), from a copy of the committed study file (so it skips what is finished), until ``--minutes`` after
``--run`` began, less a reserve for stopping them and the summary;
what a worker has in flight then is lost, as when a CPU session ends. It writes under ``$OUT``: the export, one
log, and a summary (device, library versions, checks, records made).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu_confirm"  # ignored (.gitignore); each part travels as a device call's carry
STASH = Path("/tmp/randmask-gpu-stash")  # outside the tree: survives between calls on a warm machine
MODEL = "smollm2-135m"
SPEC = "experiments/smollm2_confirm.json"
COMMITTED = "experiments/results/smollm2_confirm.jsonl"
EXPORT_NAME = "smollm2_confirm_gpu.jsonl"
CALL_LIMIT = 64 * 2**20  # bytes one device call may carry, working tree included
MARGIN = 2**20  # for files the tree gains between --prepare and the call (a log, a note)
STOP_RESERVE = 40.0  # seconds --run keeps for stopping the workers (20 s grace) and writing the summary
WHEELS = ("gguf", "peft")  # the device image lacks gguf; peft is pinned to the CPU records' version
PROBE_TASK_FILE = Path("glue") / "SST-2" / "dev.tsv"  # tokenized for the tokenizer's fingerprint


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_bytes(root: Path) -> int:
    """What a device call sends besides its carry: tracked files and untracked files git does not ignore."""
    names = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file())


def fingerprint(folder: Path, probe: Path) -> dict:
    """SHA-256 over a converted model's tensors (name, dtype, shape, bytes: not the file, whose layout may change
    with the library version) and over its tokenizer (vocabulary, and the ids of every line of ``probe``)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    weights = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                weights.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                weights.update(t.view(torch.uint8).numpy().tobytes())
    tok = AutoTokenizer.from_pretrained(folder)
    tokens = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode())
    for line in probe.read_text(encoding="utf-8").splitlines():
        tokens.update(json.dumps(tok(line)["input_ids"]).encode())
    return {"weights": weights.hexdigest(), "tokenizer": tokens.hexdigest()}


def _converted_folder() -> Path:
    from randmask_lab.zoo import converted_gguf

    return converted_gguf(MODEL)


def prepare(root: Path, carry: Path, data_root: Path, preset: int = 9 | lzma.PRESET_EXTREME) -> dict:
    """Fill ``carry``/part1 and part2 from committed code and the installed weights; return the expectations."""
    from randmask_lab.experiment.results.record import CODE_PATHS
    from randmask_lab.experiment.results.source_manifest import write_manifest

    shutil.rmtree(carry, ignore_errors=True)
    part1, part2 = carry / "part1", carry / "part2"
    (part2 / "wheels").mkdir(parents=True)
    part1.mkdir()
    try:
        manifest = write_manifest(root, CODE_PATHS, part2 / "source_manifest.json")  # refuses uncommitted code
        return _fill(root, part1, part2, data_root, preset, manifest)
    except BaseException:
        shutil.rmtree(carry, ignore_errors=True)  # no half-prepared carry to send by mistake
        raise


def _fill(root: Path, part1: Path, part2: Path, data_root: Path, preset: int, manifest: dict) -> dict:
    """``prepare``'s work once the manifest is written (the code is committed)."""
    from randmask_lab.zoo import gguf_file

    gguf = gguf_file(MODEL)
    print(f"compressing {gguf.name} ({gguf.stat().st_size / 1e6:.1f} MB, xz preset {preset & 0xF}) ...", flush=True)
    stream = lzma.compress(gguf.read_bytes(), preset=preset)
    with tarfile.open(part2 / "data.tar.xz", "w:xz") as tar:
        tar.add(data_root / "glue" / "SST-2", arcname="glue/SST-2")
    from importlib.metadata import version

    versions = {}
    for name in WHEELS:
        versions[name] = version(name)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(part2 / "wheels"), f"{name}=={versions[name]}"], check=True)
    rest = sum(p.stat().st_size for p in part2.rglob("*") if p.is_file()) + (1 << 14)  # + expect.json
    room = CALL_LIMIT - tree_bytes(root) - MARGIN
    cut = min(len(stream), room)
    if len(stream) - cut + rest > room:
        raise SystemExit(f"the weights, data and wheels need {(len(stream) + rest) / 2**20:.1f} MiB, and two calls "
                         f"carry {2 * room / 2**20:.1f} MiB beside the {tree_bytes(root) / 2**20:.1f} MiB tree: "
                         "shrink the tree or split the weights in three")
    (part1 / "weights.xz.1").write_bytes(stream[:cut])
    (part2 / "weights.xz.2").write_bytes(stream[cut:])
    folder = _converted_folder()
    expect = {"commit": manifest["commit"], "model": MODEL, "gguf": gguf.name, "gguf_package": gguf.parent.name,
              "gguf_sha256": sha256_file(gguf),
              "stream_sha256": hashlib.sha256(stream).hexdigest(),
              "data_sha256": sha256_file(part2 / "data.tar.xz"),
              "wheels": {w.name: sha256_file(w) for w in sorted((part2 / "wheels").iterdir())},
              "versions_here": versions, "fingerprint": fingerprint(folder, data_root / PROBE_TASK_FILE)}
    (part2 / "expect.json").write_text(json.dumps(expect, indent=1) + "\n")
    sizes = [sum(p.stat().st_size for p in part.rglob("*") if p.is_file()) for part in (part1, part2)]
    print(f"prepared {part1.parent}: part1 {sizes[0] / 2**20:.1f} MiB, part2 {sizes[1] / 2**20:.1f} MiB, tree "
          f"{tree_bytes(root) / 2**20:.1f} MiB (each call at most {CALL_LIMIT / 2**20:.0f} MiB), commit "
          f"{manifest['commit'][:12]}")
    return expect


def stash(carry: Path, stash_dir: Path) -> Path:
    """Call 1: keep the first piece outside the tree (a carried path is replaced by the next call's carry)."""
    piece = carry / "part1" / "weights.xz.1"
    if not piece.is_file():
        raise SystemExit(f"{piece} is missing: carry .gpu_confirm/part1 (made by --prepare) in this call")
    stash_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(piece, stash_dir / piece.name)
    print(f"stashed {piece.name} ({piece.stat().st_size / 2**20:.1f} MiB) in {stash_dir}; now call --run with "
          "part2 within the warm window")
    return stash_dir / piece.name


def _check(ok: bool, what: str, checks: dict) -> None:
    checks[what] = ok
    if not ok:
        raise RuntimeError(f"check failed: {what}")


def setup(carry: Path, stash_dir: Path, work: Path, checks: dict) -> tuple[dict, dict]:
    """Call 2, before any run: rebuild and verify the weights package, data and wheels in ``work``; return the
    environment the workers run in and the expectations."""
    part2 = carry / "part2"
    _check((part2 / "expect.json").is_file(), f"{part2} is here (carry .gpu_confirm/part2, made by --prepare)", checks)
    expect = json.loads((part2 / "expect.json").read_text())
    first = next((p for p in (stash_dir / "weights.xz.1", carry / "part1" / "weights.xz.1") if p.is_file()), None)
    _check(first is not None, "the first piece of the weights is here (call 1 ran on this machine)", checks)
    stream = first.read_bytes() + (part2 / "weights.xz.2").read_bytes()
    _check(hashlib.sha256(stream).hexdigest() == expect["stream_sha256"], "the joined weights stream", checks)
    site = work / "site"
    package = site / expect["gguf_package"]
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")  # the zoo finds the GGUF in this package's folder
    gguf = package / expect["gguf"]
    gguf.write_bytes(lzma.decompress(stream))
    _check(sha256_file(gguf) == expect["gguf_sha256"], "the GGUF", checks)
    _check(sha256_file(part2 / "data.tar.xz") == expect["data_sha256"], "the SST-2 files", checks)
    with tarfile.open(part2 / "data.tar.xz") as tar:
        tar.extractall(work / "data", filter="data")
    wheels = sorted((part2 / "wheels").iterdir())
    _check({w.name: sha256_file(w) for w in wheels} == expect["wheels"], "the wheels", checks)
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, wheels)], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(site)]),
           "RANDMASK_CACHE": str(work / "cache"), "RANDMASK_DATA_DIR": str(work / "data"),
           "RANDMASK_SOURCE_MANIFEST": str(part2 / "source_manifest.json"), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return env, expect


def probe(env: dict, seconds: float) -> dict:
    """In the workers' environment: convert the weights (once, into the cache the workers read), fingerprint them,
    and read the code version and library versions the records will carry (within ``seconds``)."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe"], env=env, capture_output=True,
                          text=True, cwd=ROOT, timeout=max(seconds, 1.0))
    if done.returncode != 0:
        raise RuntimeError(f"the probe failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe_here() -> None:
    from importlib.metadata import version

    import torch

    from randmask_lab.experiment.results.record import source_folder, source_version
    from randmask_lab.zoo import gguf_file

    folder = _converted_folder()
    data = Path(os.environ["RANDMASK_DATA_DIR"])
    print(json.dumps({"fingerprint": fingerprint(folder, data / PROBE_TASK_FILE), "code": source_version(),
                      "source_folder": str(source_folder()), "gguf": str(gguf_file(MODEL).resolve()),
                      "versions": {n: version(n) for n in ("torch", "transformers", "peft", "gguf", "safetensors")},
                      "cuda": torch.cuda.is_available(),
                      "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}))


def run_workers(env: dict, spec: str, stages: list[int], workers: int, deadline: float, out: Path, work: Path,
                threads: int, max_runs: int | None) -> dict:
    """``workers`` copies of ``randmask study --stages`` on one store until they finish or ``deadline`` (a
    ``time.monotonic()`` value) passes."""
    export = out / EXPORT_NAME
    shutil.copyfile(ROOT / COMMITTED, export)  # the workers adopt what is finished and skip it
    log = open(out / "gpu_confirm.log", "ab")
    cmd = [sys.executable, "-m", "randmask_lab.cli", "study", spec, "--stages", *map(str, stages),
           "--out-dir", str(work / "runs"), "--export", str(export), "--threads", str(threads), "--no-progress",
           *(["--max-runs", str(max_runs)] if max_runs else [])]
    procs = []
    for _ in range(workers):
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        time.sleep(3)  # stagger the first claims on the store
    stopped, began = False, time.monotonic()
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            stopped = True
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            try:
                for p in procs:
                    p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(5)
    log.close()
    return {"workers": workers, "seconds": round(time.monotonic() - began, 1), "stopped_at_deadline": stopped,
            "exit_codes": [p.wait() for p in procs]}


def count_records(path: Path, commit: str, before: set[str]) -> dict:
    """Records in ``path`` made by this session (not in ``before``), by status, and whether each names ``commit``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    new = [r for r in rows if r["run_id"] not in before]
    return {"records": len(rows), "new": len(new),
            "new_by_status": {s: sum(r["status"] == s for r in new) for s in sorted({r["status"] for r in new})},
            "new_naming_the_commit": sum(r.get("code_version", {}).get("commit") == commit
                                         and r.get("code_version", {}).get("dirty") is False for r in new)}


def run(carry: Path, stash_dir: Path, out: Path, spec: str, stages: list[int], workers: int, minutes: float,
        threads: int, max_runs: int | None, allow_cpu: bool = False) -> int:
    """Call 2: verify everything, then run the workers; the summary says what passed and what was made.
    ``allow_cpu``: run without a GPU (the dry run); else a machine whose torch sees no GPU stops here."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="randmask-gpu-confirm-"))
    summary: dict = {"checks": {}, "spec": spec, "stages": stages}
    started = time.monotonic()
    try:
        env, expect = setup(carry, stash_dir, work, summary["checks"])
        deadline = started + minutes * 60 - STOP_RESERVE
        seen = probe(env, deadline - time.monotonic())
        summary.update(device=seen["device"], cuda=seen["cuda"], versions=seen["versions"], code=seen["code"],
                       versions_here=expect["versions_here"], setup_seconds=round(time.monotonic() - started, 1))
        _check(seen["cuda"] or allow_cpu, "torch sees a GPU" if not allow_cpu else
               f"torch sees a GPU, or --allow-cpu (it sees {'one' if seen['cuda'] else 'none'})", summary["checks"])
        _check(seen["fingerprint"] == expect["fingerprint"], "the converted weights and tokenizer match the CPU's",
               summary["checks"])
        _check(Path(seen["source_folder"]) == ROOT / "src", "the workers import this tree's src/", summary["checks"])
        _check(Path(seen["gguf"]).is_relative_to(work.resolve()), "the workers read the carried GGUF",
               summary["checks"])
        _check(seen["code"].get("commit") == expect["commit"] and seen["code"].get("dirty") is False,
               "the code is the manifest's commit, unchanged", summary["checks"])
        before = {json.loads(line)["run_id"] for line in (ROOT / COMMITTED).read_text().splitlines() if line.strip()}
        summary["workers"] = run_workers(env, spec, stages, workers, deadline, out, work, threads, max_runs)
        summary["records"] = count_records(out / EXPORT_NAME, expect["commit"], before)
        return 0
    except (RuntimeError, OSError, subprocess.SubprocessError, KeyError, ValueError) as e:
        summary["error"] = str(e)
        print(f"gpu_confirm: {e}", file=sys.stderr)
        return 3
    finally:
        summary["wall_seconds"] = round(time.monotonic() - started, 1)
        (out / "gpu_confirm_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary, indent=1))
        shutil.rmtree(work, ignore_errors=True)


def dry_run(data_root: Path, device_python: str = sys.executable) -> int:
    """Everything on the CPU: prepare (fast compression), a copy of the tree without .git standing in for the
    device's, both calls, and a tiny protocol (16 training examples, 1 epoch) for two workers: one run of every
    stage-2/3 cell (each method the GPU would run). Passes when every run is done and names the commit.
    ``device_python`` plays the device's interpreter in both calls (prepare runs here): a Python environment with
    the device image's library versions (transformers, tokenizers, ...) tries them before a GPU session does."""
    scratch = Path(tempfile.mkdtemp(prefix="randmask-gpu-dry-run-"))
    tree = scratch / "tree"
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                           capture_output=True, check=True).stdout.split(b"\0")
    for n in filter(None, names):
        src = ROOT / n.decode()
        if src.is_file():
            (tree / n.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / n.decode())
    prepare(ROOT, tree / ".gpu_confirm", data_root, preset=0)
    spec = json.loads((ROOT / SPEC).read_text())
    spec["name"] += "_dry_run"
    spec["protocol"] = {"sst2": {"n_train": 16, "n_val": 8, "n_test": 8, "epochs": 1}}
    spec["max_extend"] = 0  # one LR per cell, seed 0: every stage-2/3 cell's method runs once, no grid extension
    spec["cells"] = [{**c, "lrs": c["lrs"][:1], "seeds": [0]} for c in spec["cells"] if c.get("stage") in (2, 3)]
    spec.pop("reestimate", None)  # it names stage-0 cells, which the dry run's spec has not
    (tree / "dry_run_spec.json").write_text(json.dumps(spec))
    script, env = tree / "experiments" / "gpu_confirm.py", {**os.environ, "PYTHONPATH": ""}
    subprocess.run([device_python, str(script), "--stash", "--stash-dir", str(scratch / "stash")], cwd=tree,
                   env=env, check=True)
    shutil.rmtree(tree / ".gpu_confirm" / "part1")  # as on the device, where call 2's carry has only part2
    code = subprocess.run([device_python, str(script), "--run", "--stash-dir", str(scratch / "stash"), "--out",
                           str(scratch / "out"), "--spec", "dry_run_spec.json", "--workers", "2", "--threads", "1",
                           "--minutes", "10", "--allow-cpu"], cwd=tree, env=env).returncode
    summary = json.loads((scratch / "out" / "gpu_confirm_summary.json").read_text())
    made = summary.get("records", {})
    done = made.get("new_by_status", {}).get("done", 0)
    ok = code == 0 and made.get("new", 0) >= 1 and done == made["new"] and made.get("new_naming_the_commit") == done
    print(f"dry run {'passed' if ok else 'FAILED'}: exit {code}, {made.get('new', 0)} new records "
          f"({made.get('new_by_status', {})}), "
          f"{made.get('new_naming_the_commit', 0)} naming commit {summary.get('code', {}).get('commit')}; "
          f"files in {scratch}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prepare", action="store_true", help="here: fill .gpu_confirm/part1 and part2")
    what.add_argument("--stash", action="store_true", help="device call 1 (carry .gpu_confirm/part1)")
    what.add_argument("--run", action="store_true", help="device call 2 (carry .gpu_confirm/part2)")
    what.add_argument("--dry-run", action="store_true", help="here: the whole path on the CPU, tiny protocol")
    what.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # --run's check, in the workers' env
    parser.add_argument("--stash-dir", type=Path, default=STASH)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_confirm_out")))
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("RANDMASK_DATA_DIR", ROOT.parent /
                                                                           "shared" / "data")))
    parser.add_argument("--device-python", default=sys.executable,
                        help="--dry-run: the interpreter that plays the device in both calls (say, a venv with the "
                             "device image's transformers and tokenizers); default: this one")
    parser.add_argument("--spec", default=SPEC)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--workers", type=int, default=6, help="study workers sharing the GPU (default 6)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per worker (default 2)")
    parser.add_argument("--minutes", type=float, default=9.0, help="all of --run, setup included, ends within this "
                        "long (default 9: inside the device's 10 minutes a call); the workers stop 40 s before")
    parser.add_argument("--max-runs", type=int, help="runs per worker (default: until --minutes)")
    parser.add_argument("--allow-cpu", action="store_true", help="--run without a GPU (what --dry-run does); "
                        "without it, a machine whose torch sees no GPU stops before any run")
    args = parser.parse_args(argv)
    if args.probe:
        _probe_here()
        return 0
    if args.prepare:
        sys.path.insert(0, str(ROOT / "src"))  # here only: on the device, --stash and --run import no randmask_lab
        from randmask import MaskingError
        from randmask_lab.errors import LabError

        try:
            prepare(ROOT, CARRY, args.data_dir)
        except (LabError, MaskingError) as e:  # uncommitted code, no SmolLM2 package, no data: one line
            print(f"gpu_confirm --prepare: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        return 0
    if args.stash:
        stash(CARRY, args.stash_dir)
        return 0
    if args.dry_run:
        return dry_run(args.data_dir, args.device_python)
    return run(CARRY, args.stash_dir, args.out, args.spec, args.stages, args.workers, args.minutes, args.threads,
               args.max_runs, args.allow_cpu)


if __name__ == "__main__":
    sys.exit(main())

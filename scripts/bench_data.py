"""The data path's cost, side by side in one run: the token store (scripts/build_store.py, data.store_dir)
against the pre-store path, on corpora generated from wikitext-2 (cached in the workdir).

    python scripts/bench_data.py                                  # 20MB, 100MB and 1GB corpora
    python scripts/bench_data.py --sizes 2MB,5MB --skip-train     # a quick look

Of the sorted --sizes, the middle one compares build throughput: the store against the legacy path (same
tokenizer, the project's BPE), and the store on 2 cores against 1 (`taskset -c 0`, the first allowed CPU, and
RAYON_NUM_THREADS=1, the HF tokenizers' pool). The largest one measures the build's private memory, and each
training rank's (run.py, tp1_dp2) against the smallest. Each build and training runs in its own subprocess.
Private memory is RssAnon (pages no file backs, which a memory-mapped store should not grow), sampled from /proc
every --interval s and summed over the build's process tree (its worker pool included) or taken per Ray train
worker; VmRSS, which also counts mapped file pages, is shown beside it. Peaks are of the sum over time, not sums
of per-process peaks. A table goes to stdout, every number to <workdir>/bench_data.json.

`legacy_build` is the pre-store path reproduced for comparison, since that code is being replaced: the logic of
tp2d_exp/data/dataset.py before the store (load_documents' text_files branch, tokenize's packing branch,
content_digest, the torch.save of the samples; data.val_fraction=0 and dataset_percentage=100, the defaults).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's tp2d_exp, not an installed one

SEQ_LENGTH = 512
VOCAB_SIZE = 8192  # model=tiny's, whose tokenizer (the project's BPE) build_store.py and run.py use
MIB = 2**20
BUILD_CMD = ("{python} scripts/build_store.py data=text_files data.path={corpus} data.seq_length=512 "
             "data.store_dir={store_dir}")
TRAIN_CMD = ("{python} run.py data=text_files data.path={corpus} data.seq_length=512 parallelism=tp1_dp2 "
             "run.max_steps=20 run.batch_size_per_gpu=4 logger=none data.store_dir={store_dir} run.eval_every=0 "
             "hydra.run.dir={run_dir} cluster.storage_path={ray_dir}")
LEGACY_CMD = "{python} scripts/bench_data.py --legacy {corpus} {store_dir} {tokenizer}"
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}


def legacy_build(corpus: str, out_dir: str, tokenizer_dir: str) -> dict[str, Any]:
    import hashlib

    import datasets
    import torch
    from transformers import AutoTokenizer

    start = time.perf_counter()
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("text", data_files=[corpus], split="train")
    docs = [t for t in ds["text"] if t and t.strip()]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    stream = torch.tensor([t for ids in encoded for t in (*ids, eos)], dtype=torch.int32)
    n = len(stream) // SEQ_LENGTH
    ids = stream[: n * SEQ_LENGTH].view(n, SEQ_LENGTH)
    lengths = torch.full((n,), SEQ_LENGTH, dtype=torch.int32)
    h = hashlib.sha256()
    for t in (ids, lengths):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    path = Path(out_dir) / "tokens.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"input_ids": ids, "lengths": lengths, "pad_id": tokenizer.pad_token_id, "eos_id": eos,
                "digest": h.hexdigest()[:32]}, path)
    return {"tokens": ids.numel(), "samples": n, "build_s": time.perf_counter() - start, "reused": False,
            "path": str(path)}


def parse_sizes(text: str) -> dict[str, int]:
    """{"20MB": 20_000_000, ...}, smallest first."""
    sizes = {}
    for label in text.upper().replace(" ", "").split(","):
        if not (m := re.fullmatch(r"(\d+(?:\.\d+)?)(KB|MB|GB)", label)):
            raise ValueError(f"--sizes: {label!r} is not a number and KB, MB or GB, e.g. 20MB")
        sizes[label] = int(float(m[1]) * UNITS[m[2]])
    return dict(sorted(sizes.items(), key=lambda kv: kv[1]))


def make_corpus(source_dir: Path, size: int, seed: int, out: Path) -> Path:
    """`size` bytes of wikitext lines, one document per line, written pass by pass (never the whole corpus in
    memory): each pass shuffles the source's non-empty lines with its own seed and swaps about one word in 20
    of every line for a word of the source's vocabulary, so no pass repeats another's text."""
    if out.exists():
        return out
    lines = [line.strip() for f in ("valid.txt", "test.txt")
             for line in (source_dir / f).read_text(encoding="utf-8").splitlines() if line.strip()]
    vocab = sorted({w for line in lines for w in line.split() if w.isalpha()})
    tmp, written = out.with_suffix(".part"), 0
    with open(tmp, "wb") as f:
        for pass_no in itertools.count():
            rng = random.Random(f"{seed}-{pass_no}")
            rows = []
            for line in rng.sample(lines, len(lines)):
                words = line.split()
                for _ in range(max(1, len(words) // 20)):
                    words[rng.randrange(len(words))] = rng.choice(vocab)
                rows.append(" ".join(words))
            chunk = ("\n".join(rows) + "\n").encode()
            last = written + len(chunk) >= size
            if last:  # cut at a line end so the corpus stays whole documents
                chunk = chunk[: chunk.rfind(b"\n", 0, size - written + 1) + 1]
            f.write(chunk)
            written += len(chunk)
            if last:
                break
    tmp.rename(out)
    return out


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # exited between the listing and the read
                continue
            children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        tree.append(todo.pop())
        todo += children[tree[-1]]
    return tree


def memory_kib(pid: int) -> Optional[tuple[int, int]]:
    """(RssAnon, VmRSS) in KiB; None for a process gone or a zombie (no memory left to count)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return (int(fields["RssAnon"].split()[0]), int(fields["VmRSS"].split()[0])) if "RssAnon" in fields else None


def is_train_worker(pid: int) -> bool:
    try:  # Ray retitles a train worker actor's process `ray::RayTrainWorker...`
        return b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def watch(cmd: list[str], env: dict[str, str], log: Path, interval: float, ranks: bool = False) -> dict[str, Any]:
    """Run `cmd` to its exit, sampling its process tree's memory: the peak over time of the summed RssAnon and
    VmRSS (bytes) and, with `ranks`, each Ray train worker's own peaks. `result`: its stdout's last JSON line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    peak_anon = peak_rss = 0
    workers: dict[int, tuple[int, int]] = {}
    start = time.perf_counter()
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        rc = None
        while rc is None:
            anon = rss = 0
            for pid in process_tree(proc.pid):
                if (mem := memory_kib(pid)) is None:
                    continue
                anon, rss = anon + mem[0], rss + mem[1]
                if ranks and (pid in workers or is_train_worker(pid)):
                    old = workers.get(pid, (0, 0))
                    workers[pid] = (max(old[0], mem[0]), max(old[1], mem[1]))
            peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss)
            with contextlib.suppress(subprocess.TimeoutExpired):
                rc = proc.wait(timeout=interval)
    wall = time.perf_counter() - start
    if rc != 0:
        print(f"  !! exit {rc}: {shlex.join(cmd)}\n     see {log.with_suffix('.err')}")
    r = {"rc": rc, "wall_s": wall, "peak_anon": peak_anon * 1024, "peak_rss": peak_rss * 1024,
         "result": last_json(log.with_suffix(".out").read_text())}
    if ranks:  # by pid: Ray starts the workers in rank order, enough to tell them apart
        r["ranks"] = [{"pid": pid, "peak_anon": a * 1024, "peak_rss": v * 1024}
                      for pid, (a, v) in sorted(workers.items())]
    return r


def last_json(text: str) -> Optional[dict[str, Any]]:
    """The last line of `text` that is a JSON object: the entry point's result."""
    for line in reversed(text.splitlines()):
        with contextlib.suppress(ValueError):
            if isinstance(obj := json.loads(line), dict):
                return obj
    return None


def command(template: str, **values: str) -> list[str]:
    return shlex.split(template.format(python=shlex.quote(sys.executable),
                                       **{k: shlex.quote(v) for k, v in values.items()}))


def build(args: argparse.Namespace, template: str, corpus: Path, label: str, one_core: bool = False,
          env_extra: Optional[dict[str, str]] = None, keep: bool = False) -> dict[str, Any]:
    """One build into a fresh store dir (removed after unless `keep`), with its tokens/s."""
    store = args.workdir / "stores" / label
    shutil.rmtree(store, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"} | (env_extra or {})
    cmd = command(template, corpus=str(corpus), store_dir=str(store), tokenizer=args.tokenizer)
    if one_core:
        env["RAYON_NUM_THREADS"] = "1"
        cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *cmd]
    print(f"build {label} ...", flush=True)
    r = watch(cmd, env, args.workdir / "logs" / label, args.interval)
    res = r.pop("result") or {}
    r |= {"tokens": res.get("tokens"), "build_s": res.get("build_s"), "reused": res.get("reused"), "store": str(store)}
    if r["rc"] == 0 and r["tokens"]:
        r["tok_s_wall"] = r["tokens"] / r["wall_s"]
        r["tok_s_build"] = r["tokens"] / r["build_s"] if r["build_s"] else None
    if r["reused"]:
        print(f"  !! {label}: the build reports reused=true, so its time is not a build's")
    if not keep:
        shutil.rmtree(store, ignore_errors=True)
    return r


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def targets(out: dict[str, Any], small: str, mid: str, large: str) -> list[dict[str, Any]]:
    b, t, skip_train = out["builds"], out["train"], out["skip_train"]
    new, one, big = (b.get(f"store-{s}", {}) for s in (f"{mid}-2core", f"{mid}-1core", f"{large}-2core"))
    worst = lambda r, k: max((x[k] for x in r.get("ranks", [])), default=None)  # noqa: E731
    tl, ts = t.get(large, {}), t.get(small, {})
    anon = ratio(big.get("peak_anon"), 2 * 2**30)
    # Build throughput is the store's own build time (meta.json's build_s: reading, tokenizing, packing,
    # writing); the wall clock adds the entry point's interpreter start and imports (~4-5 s, the same for both).
    speedup = ratio(new.get("tok_s_build"), one.get("tok_s_build"))
    by_wall = ratio(new.get("tok_s_wall"), one.get("tok_s_wall"))
    rows = [(f"{large} builds" + ("" if skip_train else " and trains"), None,
             big.get("rc") == 0 and (skip_train or (tl.get("rc") == 0 and bool(tl.get("ranks"))))),
            (f"private memory building {large} <= 2 GiB (share of the limit)", anon, anon is not None and anon <= 1),
            (f"2-core build >= 1.6x 1-core ({mid}, build_s; by wall clock "
             + ("-" if by_wall is None else f"{by_wall:.2f}x") + ")", speedup,
             speedup is not None and speedup >= 1.6)]
    if not skip_train:
        for key, name, tol in (("peak_anon", "RssAnon", 0.10), ("peak_rss", "VmRSS", 0.20)):
            r = ratio(worst(tl, key), worst(ts, key))
            rows.append((f"per-rank {name} training {large} within {tol:.0%} of {small} (worst rank)", r,
                         r is not None and abs(r - 1) <= tol))
    return [{"target": name, "ratio": r, "pass": ok} for name, r, ok in rows]


def step_indexing(sizes: tuple[int, ...] = (12_000, 60_000, 600_000, 6_000_000), steps: int = 200) -> dict[str, Any]:
    """Seconds per step to find a dp rank's micro-batches (global batch 256, dp 8), after the epoch's first
    step (which computes the epoch's permutation once): flat in corpus size, where a permutation per step grew
    with it (0.1 ms at 12 k samples, 0.5 ms at 60 k, measured before the store)."""
    from tp2d_exp.data.order import BatchOrder

    out = {}
    BatchOrder(num_samples=1000, global_batch_size=256, micro_batch_size=4, dp=8, seed=0).micro_batches(0, 0, 3)  # warm-up
    for n in sizes:
        order = BatchOrder(num_samples=n, global_batch_size=256, micro_batch_size=4, dp=8, seed=n)
        t0 = time.perf_counter()
        order.micro_batches(0, 0, dp_rank=3)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for k in range(1, steps + 1):
            order.micro_batches(0, k * 256 % (n - 256), dp_rank=3)
        out[str(n)] = {"first_step_s": first, "step_s": (time.perf_counter() - t0) / steps,
                       "permutation_bytes": order.order(0).element_size() * n}
    return out


def print_report(out: dict[str, Any], mid: str) -> None:
    fmt = lambda v, scale=1.0, spec=".0f": "-" if v is None else f"{v / scale:{spec}}"  # noqa: E731
    print(f"\n{'build':<22}{'exit':>5}{'wall s':>9}{'build_s':>9}{'tokens':>12}{'tok/s wall':>12}"
          f"{'tok/s build_s':>15}{'anon MiB':>10}{'rss MiB':>9}")
    for label, r in out["builds"].items():
        print(f"{label:<22}{r['rc']:>5}{fmt(r['wall_s'], spec='.1f'):>9}{fmt(r['build_s'], spec='.1f'):>9}"
              f"{fmt(r['tokens']):>12}{fmt(r.get('tok_s_wall')):>12}{fmt(r.get('tok_s_build')):>15}"
              f"{fmt(r['peak_anon'], MIB):>10}{fmt(r['peak_rss'], MIB):>9}")
    new, legacy = out["builds"].get(f"store-{mid}-2core", {}), out["builds"].get(f"legacy-{mid}", {})
    print(f"store / legacy build tokens/s at {mid}: "
          f"{fmt(ratio(new.get('tok_s_wall'), legacy.get('tok_s_wall')), spec='.2f')}x by wall clock, "
          f"{fmt(ratio(new.get('tok_s_build'), legacy.get('tok_s_build')), spec='.2f')}x by build_s")
    for label, r in out["train"].items():
        print(f"\ntrain {label}: exit {r['rc']}, {r['wall_s']:.0f} s; per rank, peak RssAnon / VmRSS MiB: "
              + (", ".join(f"pid {x['pid']} {x['peak_anon'] / MIB:.0f} / {x['peak_rss'] / MIB:.0f}"
                           for x in r["ranks"]) or "no RayTrainWorker process seen"))
    print("\nper-step indexing (global batch 256, dp 8): "
          + ", ".join(f"{int(n):,} samples {r['step_s'] * 1e6:.0f} us (epoch's first step {r['first_step_s'] * 1e3:.1f} ms,"
                      f" permutation {r['permutation_bytes'] / MIB:.1f} MiB)" for n, r in out["indexing"].items()))
    print()
    for row in out["targets"]:
        print(f"{'PASS' if row['pass'] else 'FAIL'}  {row['target']}"
              + ("" if row["ratio"] is None else f": {row['ratio']:.2f}x"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20MB,100MB,1GB",
                    help="corpus sizes (KB/MB/GB, decimal): smallest = training baseline, middle = throughput, "
                         "largest = memory at scale (default 20MB,100MB,1GB)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench_data",
                    help="corpora (cached by size and seed), stores, logs, bench_data.json")
    ap.add_argument("--source-dir", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2")
    ap.add_argument("--seed", type=int, default=0, help="of the corpora's shuffles and salts")
    ap.add_argument("--interval", type=float, default=0.2, help="memory sampling period, s")
    ap.add_argument("--skip-train", action="store_true")
    # Stand-ins for testing the harness: templates with {python} {corpus} {store_dir} ({run_dir} {ray_dir}).
    ap.add_argument("--build-cmd", default=BUILD_CMD, help=argparse.SUPPRESS)
    ap.add_argument("--train-cmd", default=TRAIN_CMD, help=argparse.SUPPRESS)
    ap.add_argument("--legacy", nargs=3, help=argparse.SUPPRESS)  # CORPUS OUT_DIR TOKENIZER_DIR: the legacy child
    args = ap.parse_args()
    if args.legacy:
        print(json.dumps(legacy_build(*args.legacy)))
        return
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as e:
        ap.error(str(e))
    missing = [f for f in ("valid.txt", "test.txt") if not (args.source_dir / f).is_file()]
    if missing:
        sys.exit(f"--source-dir {args.source_dir}: no {' or '.join(missing)} (wikitext-2's raw text files)")
    if args.build_cmd == BUILD_CMD and not (ROOT / "scripts" / "build_store.py").exists():
        sys.exit("scripts/build_store.py is not in this checkout: the store's build entry point is needed")
    from tp2d_exp.data.tokenizer import project_bpe_dir

    args.workdir = args.workdir.resolve()
    (args.workdir / "corpora").mkdir(parents=True, exist_ok=True)
    args.tokenizer = project_bpe_dir(str(ROOT / "outputs" / "cache"), VOCAB_SIZE)  # built once, untimed
    corpora = {label: make_corpus(args.source_dir, n, args.seed, args.workdir / "corpora" / f"wiki-{n}-{args.seed}.txt")
               for label, n in sizes.items()}
    labels = list(corpora)
    small, mid, large = labels[0], labels[len(labels) // 2], labels[-1]
    out: dict[str, Any] = {"sizes": {"small": small, "compare": mid, "large": large}, "corpora": corpora,
                           "skip_train": args.skip_train, "builds": {}, "train": {}}
    builds = out["builds"]
    with tempfile.TemporaryDirectory(prefix="hf-datasets-", dir=args.workdir) as cache:  # its Arrow time counts
        builds[f"legacy-{mid}"] = build(args, LEGACY_CMD, corpora[mid], f"legacy-{mid}",
                                        env_extra={"HF_DATASETS_CACHE": cache})
    builds[f"store-{mid}-1core"] = build(args, args.build_cmd, corpora[mid], f"store-{mid}-1core", one_core=True)
    for s in dict.fromkeys((mid, large)):  # the largest one's store is kept for its training run
        builds[f"store-{s}-2core"] = build(args, args.build_cmd, corpora[s], f"store-{s}-2core",
                                           keep=s == large and not args.skip_train)
    if not args.skip_train:
        for s in dict.fromkeys((small, large)):
            # Built beforehand (untimed) so that training measures only training.
            store = Path(builds[f"store-{large}-2core"]["store"] if s == large else
                         build(args, args.build_cmd, corpora[s], f"store-{s}-train", keep=True)["store"])
            print(f"train {s} ...", flush=True)
            run_dir = args.workdir / "runs" / s
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = command(args.train_cmd, corpus=str(corpora[s]), store_dir=str(store), run_dir=str(run_dir),
                          ray_dir=str(args.workdir / "ray"))
            out["train"][s] = watch(cmd, dict(os.environ), args.workdir / "logs" / f"train-{s}", args.interval, True)
            shutil.rmtree(store, ignore_errors=True)
    out["indexing"] = step_indexing()
    out["targets"] = targets(out, small, mid, large)
    print_report(out, mid)
    (args.workdir / "bench_data.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"\nall numbers: {args.workdir / 'bench_data.json'}")


if __name__ == "__main__":
    main()

"""Speed and memory of `nanmerge run` against the I/O floor measured in the same run.

    python benchmarks/perf.py --size small --out results/perf [--mergekit PATH]
    python benchmarks/perf.py --startup    # start-up of the commands that compute nothing

Builds synthetic Llama-shaped bf16 checkpoints (a base and three fine-tunes = base + noise
of three different sizes, sharded safetensors with an index), cached under --cache. Each
merge runs in a fresh `nanmerge run` process; its wall time includes interpreter start-up
and its peak RSS comes from wait4() in a small launcher that forks it. The I/O floor is
measured next to each merge: a warm read of every input byte (the files are read once to warm
the page cache, then timed) plus writing the output's bytes once with fsync. It is a
benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import nanmerge

# name -> (hidden, intermediate, layers, attention heads, kv heads, vocab)
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (256, 688, 4, 8, 4, 4096),
    "small": (1024, 2816, 12, 16, 4, 32000),
    "medium": (1536, 4096, 16, 24, 4, 32000),
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B's shapes
}
NOISE = (0.001, 0.002, 0.004)  # fine-tune deltas of different sizes, so NAN is not uniform
SHARD_BYTES = {"tiny": 4 * 2**20, "small": 200 * 2**20, "medium": 500 * 2**20, "1b": 1000 * 2**20}
# Parameters that differ from the registry's defaults; every other method runs at its defaults.
METHODS: dict[str, dict[str, object]] = {
    "task_arithmetic": {},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "weight_average": {},
}
COEFFICIENTS: dict[str, object] = {
    "uniform": "uniform",
    "nan-model": {"estimator": "nan", "granularity": "model"},
    "nan-tensor": {"estimator": "nan", "granularity": "tensor"},
}
# mergekit's names and parameters for the same merges (its `linear` normalizes like ours).
MERGEKIT = {
    "task_arithmetic": ("task_arithmetic", {"weight": 0.3}),
    "ties": ("ties", {"weight": 1.0, "density": 0.5}),
    "dare_ties": ("dare_ties", {"weight": 1.0, "density": 0.5}),
    "weight_average": ("linear", {"weight": 1.0}),
}


def llama_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter, layers, heads, kv_heads, vocab = SIZES[size]
    kv = hidden // heads * kv_heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def _save_sharded(folder: Path, tensors: dict[str, torch.Tensor], size_name: str) -> None:
    shard_bytes = SHARD_BYTES[size_name]
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hidden, inter, layers, heads, kv_heads, vocab = SIZES[size_name]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def build_models(size: str, cache: Path) -> list[Path]:
    """Base + 3 fine-tunes under cache/size/, built once (a `done` file marks completion)."""
    root = cache / size
    folders = [root / "base", *(root / f"ft{j}" for j in range(len(NOISE)))]
    if (root / "done").exists():
        return folders
    shutil.rmtree(root, ignore_errors=True)
    shapes = llama_shapes(size)
    print(f"building {size} checkpoints in {root} ...", flush=True)
    gen = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    for name, shape in shapes:
        if len(shape) == 1:
            base[name] = (1 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
        else:
            base[name] = (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    _save_sharded(folders[0], base, size)
    for folder, noise in zip(folders[1:], NOISE, strict=True):
        tuned = {
            name: (t.float() + noise * torch.randn(t.shape, generator=gen)).to(torch.bfloat16)
            for name, t in base.items()
        }
        _save_sharded(folder, tuned, size)
        del tuned
    (root / "done").write_text("ok\n")
    return folders


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_floor(folders: list[Path]) -> float:
    """Seconds to read every input byte once more after a warming read (page cache warm)."""
    files = [f for folder in folders for f in _weight_files(folder)]
    buffer = bytearray(64 * 2**20)
    view = memoryview(buffer)

    def read_all() -> None:
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass

    read_all()
    start = time.perf_counter()
    read_all()
    return time.perf_counter() - start


def write_floor(nbytes: int, where: Path) -> float:
    """Seconds to write `nbytes` once (64 MiB blocks) and fsync, as the merged output is."""
    block = os.urandom(64 * 2**20)
    path = where / ".write-floor"
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        left = nbytes
        while left > 0:
            left -= fh.write(memoryview(block)[: min(left, len(block))])
        os.fsync(fh.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


# Linux's ru_maxrss of a process counts the peak RSS of the memory it was spawned from
# (exec records the old address space's peak, and vfork shares the spawner's), so a merge
# spawned straight from this process would report this process's peak (several GB after
# building the checkpoints). A small launcher forks the merge instead and times it.
LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as out:
    cpu = usage.ru_utime + usage.ru_stime
    out.write(f"{wall} {cpu} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and peak RSS bytes (wait4's ru_maxrss of the
    child, forked by a small launcher) of `cmd`; its output is shown only if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "usage"
        launch = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), *cmd]
        proc = subprocess.run(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = proc.stdout.decode(errors="replace")
        if not report.exists():
            raise RuntimeError(f"launcher failed ({proc.returncode}):\n{output[-4000:]}")
        wall, cpu, maxrss_kib, code = report.read_text().split()
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{output[-4000:]}")
    return float(wall), float(cpu), int(maxrss_kib) * 1024


@dataclass
class Row:
    tool: str
    method: str
    coefficients: str
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    input_gb: float
    read_floor_s: float
    write_floor_s: float
    bound_mib: float | None

    @property
    def ratio(self) -> float:
        return self.wall_s / (self.read_floor_s + self.write_floor_s)


def nanmerge_recipe(
    method: str, coefs: object, folders: list[Path], out: Path, extra: dict[str, object]
) -> dict[str, object]:
    uses_base = nanmerge.METHODS[method].needs_base
    recipe: dict[str, object] = {
        "base": str(folders[0]) if uses_base else None,
        "models": [str(f) for f in folders[1:]],
        "method": method,
        "parameters": METHODS.get(method, {}),
        "coefficients": coefs,
        "output": str(out),
        "overwrite": True,
        **extra,
    }
    if method == "weight_average" and isinstance(coefs, dict):
        recipe["coefficients"] = {**coefs, "norm_of": "finetuned"}
    return recipe


def mergekit_config(method: str, folders: list[Path]) -> dict[str, object]:
    name, params = MERGEKIT[method]
    config: dict[str, object] = {
        "merge_method": name,
        "models": [{"model": str(f), "parameters": dict(params)} for f in folders[1:]],
        "dtype": "bfloat16",
    }
    if method != "weight_average":
        config["base_model"] = str(folders[0])
    if name == "ties" or name == "dare_ties":
        config["parameters"] = {"normalize": True}
    return config


def input_bytes(folders: list[Path]) -> int:
    return sum(f.stat().st_size for folder in folders for f in _weight_files(folder))


def floors(folders: list[Path], output_bytes: int, where: Path) -> tuple[float, float]:
    return read_floor(folders), write_floor(output_bytes, where)


def run_nanmerge(
    folders: list[Path], work: Path, methods: list[str], coefs: list[str], extra: dict[str, object]
) -> list[Row]:
    import yaml

    rows = []
    out_bytes = input_bytes(folders[:1])
    exe = [sys.executable, "-m", "nanmerge"]
    for method in methods:
        for coef in coefs:
            recipe = nanmerge_recipe(method, COEFFICIENTS[coef], folders, work / "merged", extra)
            path = work / "recipe.yaml"
            path.write_text(yaml.safe_dump(recipe))
            used = folders if recipe["base"] else folders[1:]
            read_s, write_s = floors(used, out_bytes, work)
            shutil.rmtree(work / "merged", ignore_errors=True)  # as for mergekit: not timed
            wall, cpu, rss = timed([*exe, "run", str(path), "--quiet"])
            report = json.loads((work / "merged" / "merge_report.json").read_text())
            row = Row(
                "nanmerge",
                method,
                coef,
                wall,
                cpu,
                rss / 2**20,
                input_bytes(used) / 1e9,
                read_s,
                write_s,
                report["memory"]["bound_bytes"] / 2**20,
            )
            print(format_row(row), flush=True)
            rows.append(row)
    return rows


def run_mergekit(exe: str, folders: list[Path], work: Path, methods: list[str]) -> list[Row]:
    import yaml

    rows = []
    out_bytes = input_bytes(folders[:1])
    for method in [m for m in methods if m in MERGEKIT]:
        path = work / "mergekit.yaml"
        path.write_text(yaml.safe_dump(mergekit_config(method, folders)))
        used = folders if method != "weight_average" else folders[1:]
        read_s, write_s = floors(used, out_bytes, work)
        out = work / "mergekit-out"
        shutil.rmtree(out, ignore_errors=True)
        wall, cpu, rss = timed([exe, str(path), str(out), "--allow-crimes"])
        row = Row(
            "mergekit",
            method,
            "uniform",
            wall,
            cpu,
            rss / 2**20,
            input_bytes(used) / 1e9,
            read_s,
            write_s,
            None,
        )
        print(format_row(row), flush=True)
        rows.append(row)
    return rows


HEADER = (
    f"{'tool':<9} {'method':<16} {'coefficients':<11} {'wall s':>8} {'CPU s':>7} "
    f"{'peak RSS MiB':>13} {'bound MiB':>10} {'input GB':>9} {'floor s':>8} {'wall/floor':>10}"
)


def format_row(row: Row) -> str:
    bound = "-" if row.bound_mib is None else f"{row.bound_mib:.0f}"
    floor = row.read_floor_s + row.write_floor_s
    return (
        f"{row.tool:<9} {row.method:<16} {row.coefficients:<11} {row.wall_s:8.2f} {row.cpu_s:7.2f} "
        f"{row.peak_rss_mib:13.0f} {bound:>10} {row.input_gb:9.2f} {floor:8.2f} "
        f"{row.ratio:10.2f}"
    )


def print_median_floor_ratios(rows: list[Row]) -> None:
    """wall / the median floor of all rows reading the same inputs: when the page cache
    cannot hold the inputs, one floor measurement swings with the disk (3-9 s for the same
    8.8 GB here), and the median is the steadier reference."""
    print("\nwall / median floor of the run, per input size:")
    for gb in sorted({r.input_gb for r in rows}):
        same = [r for r in rows if r.input_gb == gb]
        floor = statistics.median(r.read_floor_s + r.write_floor_s for r in same)
        print(f"  {gb:.2f} GB read, median floor {floor:.2f} s ({len(same)} measurements)")
        for r in same:
            print(f"    {r.tool:<9} {r.method:<16} {r.coefficients:<11} {r.wall_s / floor:6.2f}")


def median_seconds(cmd: list[str], repeats: int, exit_code: int = 0) -> float:
    """Median wall seconds of `cmd`, each run a fresh process that must exit with `exit_code`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        times.append(time.perf_counter() - start)
        if proc.returncode != exit_code:
            output = proc.stdout.decode(errors="replace")
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-4000:]}")
    return statistics.median(times)


def startup_seconds(repeats: int = 3) -> float:
    """Median seconds for `nanmerge --version`-like import of the merge path (no tensor read)."""
    return median_seconds([sys.executable, "-c", "import nanmerge.cli, nanmerge.engine"], repeats)


def command_startups(work: Path, repeats: int) -> dict[str, float]:
    """Median wall seconds of commands that compute nothing (no torch needed), next to two
    references measured in the same run: a bare interpreter and `import torch`. Inspecting
    with norms and a recipe whose method is unknown (the engine's plan reports it, with
    every other problem) are timed too: inspecting imports torch; an unknown method is
    answered by the engine's torch-free recipe check."""
    small = work / "small.safetensors"
    save_file({"w": torch.zeros(64, 64), "b": torch.zeros(64)}, small)
    models = f"models: [{work / 'a'}, {work / 'b'}]\noutput: {work / 'out'}"
    (work / "unknown-field.yaml").write_text(f"{models}\nmethod: ties\nsead: 1\n")
    (work / "unknown-method.yaml").write_text(f"{models}\nmethod: tie\n")
    exe = [sys.executable, "-m", "nanmerge"]
    commands: dict[str, tuple[list[str], int]] = {
        "python -c pass": ([sys.executable, "-c", "pass"], 0),
        "python -c 'import torch'": ([sys.executable, "-c", "import torch"], 0),
        "nanmerge --help": ([*exe, "--help"], 0),
        "nanmerge methods": ([*exe, "methods"], 0),
        "nanmerge inspect --headers-only": ([*exe, "inspect", "--headers-only", str(small)], 0),
        "nanmerge run (unknown field)": ([*exe, "run", str(work / "unknown-field.yaml")], 2),
        "nanmerge inspect (norms)": ([*exe, "inspect", "--quiet", str(small)], 0),
        "nanmerge run (unknown method)": ([*exe, "run", str(work / "unknown-method.yaml")], 2),
    }
    return {label: median_seconds(cmd, repeats, code) for label, (cmd, code) in commands.items()}


def finite_check_cost(
    folders: list[Path], work: Path, methods: list[str], extra: dict[str, object]
) -> None:
    """Seconds the merge spends checking that every output chunk is finite, against the
    merge's wall time, measured in the same in-process merge (the check wrapped in a timer).

    Paired wall times cannot resolve a cost of 1-2% on this machine (run-to-run noise is
    15-30%), so the check is timed where it runs, on the real output tensors.
    """
    import nanmerge
    from nanmerge.engine import _stream

    check = _stream._all_finite
    spent = [0.0]

    def timed_check(tensor: torch.Tensor) -> bool:
        start = time.perf_counter()
        try:
            return check(tensor)
        finally:
            spent[0] += time.perf_counter() - start

    _stream._all_finite = timed_check  # type: ignore[assignment]
    try:
        for method in methods:
            recipe = nanmerge_recipe(method, "uniform", folders, work / "merged", extra)
            shutil.rmtree(work / "merged", ignore_errors=True)
            spent[0] = 0.0
            start = time.perf_counter()
            nanmerge.merge(recipe)
            wall = time.perf_counter() - start
            print(
                f"{method:<16} merge {wall:6.2f} s, finite check {spent[0]:5.2f} s "
                f"({100 * spent[0] / wall:.2f}% of the merge)",
                flush=True,
            )
    finally:
        _stream._all_finite = check


def print_command_startups(repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        seconds = command_startups(Path(tmp), repeats)
    print(f"start-up, median of {repeats} fresh processes:")
    for label, value in seconds.items():
        print(f"  {label:<34} {value:6.3f} s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--out", type=Path, default=Path("results/perf"))
    parser.add_argument("--cache", type=Path, default=Path("cache/perf"))
    parser.add_argument(
        "--methods", nargs="+", choices=sorted(nanmerge.METHODS), default=list(METHODS)
    )
    parser.add_argument(
        "--coefficients", nargs="+", choices=list(COEFFICIENTS), default=list(COEFFICIENTS)
    )
    parser.add_argument("--threads", type=int, default=None, help="recipe `threads` override")
    parser.add_argument("--device", default=None, help="recipe `device` override, e.g. cuda")
    parser.add_argument("--mergekit", default=None, help="path to a mergekit-yaml executable")
    parser.add_argument("--label", default="", help="suffix for the results file name")
    parser.add_argument(
        "--startup",
        action="store_true",
        help="only time the start-up of commands that compute nothing (help, methods, "
        "inspect --headers-only, a recipe error), then stop",
    )
    parser.add_argument(
        "--finite-check",
        action="store_true",
        help="only time the output's finiteness check within in-process merges, then stop",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for every merge process (torch's intra-op threads)",
    )
    args = parser.parse_args()
    if args.torch_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # inherited by the merges
    if args.startup:
        seconds = print_command_startups(repeats=7)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "startup.json").write_text(json.dumps(seconds, indent=2))
        print(f"\nwrote {args.out / 'startup.json'}")
        return

    folders = build_models(args.size, args.cache)
    work = args.out / f"work-{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    extra: dict[str, object] = {}
    if args.threads is not None:
        extra["threads"] = args.threads
    if args.device is not None:
        extra["device"] = args.device
    if args.finite_check:
        finite_check_cost(folders, work, args.methods, extra)
        return
    params = sum(torch.Size(s).numel() for _, s in llama_shapes(args.size))
    print(
        f"size {args.size}: {params / 1e6:.0f}M parameters per model, bf16, "
        f"{input_bytes(folders) / 1e9:.2f} GB of inputs; nproc {os.cpu_count()}; "
        f"OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    start_s = startup_seconds()
    print(f"start-up (import nanmerge.cli + engine in a fresh interpreter): {start_s:.2f} s")
    print(HEADER, flush=True)
    rows = run_nanmerge(folders, work, args.methods, args.coefficients, extra)
    if args.mergekit:
        rows += run_mergekit(args.mergekit, folders, work, args.methods)
        print("\nnanmerge / mergekit (uniform coefficients):")
        for method in [m for m in args.methods if m in MERGEKIT]:
            ours = next(r for r in rows if r.tool == "nanmerge" and r.method == method)
            theirs = next(r for r in rows if r.tool == "mergekit" and r.method == method)
            print(
                f"  {method:<16} wall {ours.wall_s / theirs.wall_s:5.2f}  "
                f"peak RSS {ours.peak_rss_mib / theirs.peak_rss_mib:5.2f}"
            )
    print_median_floor_ratios(rows)
    shutil.rmtree(work / "merged", ignore_errors=True)
    result = {
        "size": args.size,
        "parameters": params,
        "startup_s": start_s,
        "extra": extra,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "nproc": os.cpu_count(),
        "rows": [{**asdict(r), "wall_over_floor": r.ratio} for r in rows],
    }
    name = f"perf-{args.size}{'-' + args.label if args.label else ''}.json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out / name}")


if __name__ == "__main__":
    main()

"""nanmerge against mergekit, method by method: the same mergekit YAML through both tools.

Builds tiny float32 Llamas (a base and three fine-tunes near it, with the builders of
`layered_vs_mergekit.py`), runs every merge method both tools share and the recipe features
(per-model density and weight, normalize false, rescale true and false, gradients and
filters, dtype and out_dtype) through mergekit's `mergekit-yaml` (from `--mergekit-bin`, a
virtualenv with mergekit installed) and through `nanmerge run`, which translates the YAML with
mergekit's conventions, and prints one row per case: the tensors compared, the largest
absolute difference over them, and a verdict.

DARE and DELLA draw their masks at random, mergekit from torch's global generator, so their
masks cannot be shared: at density 1 they are compared exactly, at density < 1 on one
fine-tune by statistics of each tool's own output (the kept fraction of entries, the L1 norm
of the merged update over the task vector's, which L1 rescaling makes exactly 1, and for
DELLA the mean |tau| of the kept entries over the mean of all, above 1 since it keeps large
entries more often). A method nanmerge does not register is reported as such.
Never a test dependency: `python benchmarks/peer_mergekit.py [--only ties] [--verbose]`.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from click.testing import CliRunner
from layered_vs_mergekit import shards, write_llama  # the script's folder is on sys.path
from safetensors.torch import save_file

from nanmerge import MergeError
from nanmerge.cli import main as nanmerge_cli
from nanmerge.methods import METHODS
from nanmerge.recipes import from_mergekit

FINE_TUNES = 3
EXACT = 1e-5  # float32 rounding of the same sums in another order
BF16 = 2.0**-5  # mergekit sums in bfloat16: a few roundings of 2^-8 relative each
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # one unit in the last place, relative


@dataclass(frozen=True)
class Case:
    label: str
    recipe: dict[str, Any]  # mergekit YAML; models named base, ft1, ft2, ft3
    stats: bool = False  # random masks: compare statistics of one fine-tune's merge
    bf16: bool = False  # mergekit computes in bfloat16: its rounding is expected


def m(name: str, **params: Any) -> dict[str, Any]:
    return {"model": name, "parameters": params} if params else {"model": name}


def tv(method: str, *models: dict[str, Any], **params: Any) -> dict[str, Any]:
    """A task-vector recipe over `base` (listed too, as mergekit's examples do)."""
    data: dict[str, Any] = {"merge_method": method, "base_model": "base"}
    data["models"] = [m("base"), *models]
    return data | ({"parameters": params} if params else {})


W3 = (m("ft1", weight=1.0), m("ft2", weight=0.5), m("ft3", weight=0.8))
D3 = (
    m("ft1", weight=1.0, density=0.5),
    m("ft2", weight=0.5, density=0.7),
    m("ft3", weight=0.8, density=0.3),
)


def cases() -> list[Case]:
    linear = {"merge_method": "linear", "models": [*W3]}
    gradient = [
        m("ft1", weight=1.0, density=[1, 0.5, 0.2]),
        m("ft2", weight=[{"filter": "mlp", "value": 0.5}, {"value": 0.8}], density=0.4),
    ]
    return [
        Case("linear", linear),
        Case("linear normalize=false", linear | {"parameters": {"normalize": False}}),
        Case("task_arithmetic lambda=0.8", tv("task_arithmetic", *W3, **{"lambda": 0.8})),
        Case("ties per-model density", tv("ties", *D3)),
        Case("ties normalize=false", tv("ties", *W3, density=0.5, normalize=False)),
        Case("ties rescale=true", tv("ties", *W3, density=0.5, rescale=True)),
        Case("ties gradient+filter", tv("ties", *gradient)),
        Case("dare_linear density=1", tv("dare_linear", *W3)),
        Case("dare_ties density=1", tv("dare_ties", *W3)),
        Case("breadcrumbs", tv("breadcrumbs", *W3, density=0.8, gamma=0.05)),
        Case(
            "breadcrumbs gamma+density>1",
            tv("breadcrumbs", m("ft1", weight=1.0, density=0.95, gamma=0.1), m("ft2", weight=1)),
        ),
        Case("breadcrumbs rescale=true", tv("breadcrumbs", *D3, gamma=0.05, rescale=True)),
        Case("breadcrumbs_ties", tv("breadcrumbs_ties", *D3, gamma=0.05)),
        Case(
            "breadcrumbs_ties normalize", tv("breadcrumbs_ties", *W3, density=0.6, normalize=True)
        ),
        Case("della density=1", tv("della", *W3)),
        Case("della_linear density=1", tv("della_linear", *W3)),
        Case("sce", tv("sce", m("ft1"), m("ft2"), m("ft3"))),
        Case("sce select_topk=0.5", tv("sce", m("ft1"), m("ft2"), m("ft3"), select_topk=0.5)),
        Case("slerp t=0.3", tv("slerp", m("ft1"), t=0.3)),
        Case("multislerp", tv("multislerp", *W3)),
        Case("nuslerp", tv("nuslerp", m("ft1", weight=0.3), m("ft2", weight=0.7))),
        Case("karcher", {"merge_method": "karcher", "models": [m("ft1"), m("ft2"), m("ft3")]}),
        Case("model_stock", tv("model_stock", m("ft1"), m("ft2"), m("ft3"))),
        Case("nearswap t=0.05", tv("nearswap", m("ft1"), t=0.05)),
        Case("arcee_fusion", tv("arcee_fusion", m("ft1"))),
        Case("passthrough", {"merge_method": "passthrough", "models": [m("ft1")]}),
        Case("linear dtype=bfloat16", linear | {"dtype": "bfloat16"}, bf16=True),
        Case("linear out_dtype=bfloat16", linear | {"dtype": "float32", "out_dtype": "bfloat16"}),
        Case("ties out_dtype=float16", tv("ties", *D3) | {"out_dtype": "float16"}),
        # one fine-tune: each tool's own masks, compared by statistics
        Case("dare_linear d=0.5", tv("dare_linear", m("ft1", weight=1.0), density=0.5), True),
        Case(
            "dare_linear d=0.5 rescale=false",
            tv("dare_linear", m("ft1", weight=1.0), density=0.5, rescale=False),
            True,
        ),
        Case("dare_ties d=0.5", tv("dare_ties", m("ft1", weight=1.0), density=0.5), True),
        Case(
            "della d=0.5 eps=0.1", tv("della", m("ft1", weight=1.0), density=0.5, epsilon=0.1), True
        ),
        Case(
            "della_linear d=0.4 eps=0.2 rescale=false",
            tv("della_linear", m("ft1", weight=1.0), density=0.4, epsilon=0.2, rescale=False),
            True,
        ),
    ]


def write_models(root: Path) -> dict[str, Path]:
    """base (random, from layered_vs_mergekit) and fine-tunes base + 0.1 * noise."""
    write_llama(root / "base", 0)
    base = shards(root / "base")
    folders = {"base": root / "base"}
    for i in range(1, FINE_TUNES + 1):
        gen = torch.Generator().manual_seed(100 + i)
        folder = root / f"ft{i}"
        folder.mkdir()
        tuned = {n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        save_file(tuned, folder / "model.safetensors")
        (folder / "config.json").write_text((root / "base" / "config.json").read_text())
        folders[f"ft{i}"] = folder
    return folders


def with_paths(value: Any, folders: dict[str, Path]) -> Any:
    """The recipe with model names swapped for their folders."""
    if isinstance(value, dict):
        return {
            k: (str(folders[v]) if k in ("model", "base_model") else with_paths(v, folders))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [with_paths(v, folders) for v in value]
    return value


def run_both(
    case: Case, folders: dict[str, Path], work: Path, mergekit_bin: Path
) -> tuple[Any, Any] | str:
    """Both tools' outputs, or why a row has none."""
    recipe = with_paths(case.recipe, folders)
    try:
        method = from_mergekit(recipe)["method"]
    except MergeError as error:
        return "nanmerge refuses: " + str(error).splitlines()[1].strip()
    if method not in METHODS:
        return f"not registered in nanmerge ({method})"
    path = work / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    mk = subprocess.run(
        [str(mergekit_bin / "mergekit-yaml"), str(path), str(work / "mk")],
        capture_output=True,
        text=True,
    )
    if mk.returncode != 0:
        return "mergekit failed: " + (mk.stderr.strip().splitlines() or ["?"])[-1][:90]
    result = CliRunner().invoke(nanmerge_cli, ["run", str(path), str(work / "nm"), "--quiet"])
    if result.exit_code != 0:
        return "nanmerge failed: " + " ".join(result.output.split())[:120]
    return shards(work / "nm"), shards(work / "mk")


def exact_row(
    case: Case, ours: dict[str, Any], theirs: dict[str, Any], verbose: bool
) -> tuple[str, str]:
    diffs = {n: float((ours[n].float() - theirs[n].float()).abs().max()) for n in theirs}
    worst = max(diffs.values())
    if verbose:
        for name, diff in sorted(diffs.items(), key=lambda item: -item[1])[:5]:
            print(f"    {case.label}: {name} {diff:.3g}")
    dtypes = {t.dtype for t in ours.values()}
    if dtypes != {t.dtype for t in theirs.values()}:
        return f"{worst:.3g}", "dtypes differ"
    size = max(float(t.float().abs().max()) for t in theirs.values())
    # one rounding to a 16-bit output can fall either way of a float32 difference
    ulps = [ULP[d] * size for d in dtypes if d in ULP] + ([BF16 * size] if case.bf16 else [])
    if worst <= EXACT:
        return f"{worst:.3g}", "match"
    if worst <= max(ulps, default=0.0):
        why = " (mergekit computes in bfloat16)" if case.bf16 else ""
        return f"{worst:.3g}", f"match to 16-bit rounding{why}"
    beyond = sum(d > EXACT for d in diffs.values())
    return f"{worst:.3g}", f"DIFFERS in {beyond} of {len(diffs)} tensors"


def statistics(out: dict[str, Any], folders: dict[str, Path]) -> tuple[float, ...]:
    """Over all entries: the kept fraction, L1(update) / L1(tau), the kept entries' mean
    |tau| over all entries' mean |tau|; and the worst |L1(update) / L1(tau) - 1| of a tensor."""
    base, tuned = shards(folders["base"]), shards(folders["ft1"])
    kept = entries = 0
    l1_update = l1_tau = l1_kept = worst = 0.0
    for name, merged in out.items():
        tau = (tuned[name] - base[name]).flatten().abs()
        update = (merged.float() - base[name]).flatten().abs()
        mask = update != 0
        kept, entries = kept + int(mask.sum()), entries + mask.numel()
        l1_update, l1_tau = l1_update + float(update.sum()), l1_tau + float(tau.sum())
        l1_kept += float(tau[mask].sum())
        worst = max(worst, abs(float(update.sum() / tau.sum()) - 1))
    return kept / entries, l1_update / l1_tau, (l1_kept / kept) / (l1_tau / entries), worst


def stats_row(case: Case, ours: Any, theirs: Any, folders: dict[str, Path]) -> tuple[str, str]:
    params = case.recipe["parameters"]
    density = params["density"]
    nm, mk = statistics(ours, folders), statistics(theirs, folders)
    entries = sum(t.numel() for t in theirs.values())
    sigma = math.sqrt(2 * density * (1 - density) / entries)  # of the two fractions' gap
    # |tau| is half-normal here: its spread is 0.76 of its mean, so a mean over k kept
    # entries wanders by 0.76 / sqrt(k) of the overall mean
    spread = 0.76 * math.sqrt(1 / (nm[0] * entries) + 1 / (mk[0] * entries))
    agree = abs(nm[0] - mk[0]) <= 4 * sigma and abs(nm[2] - mk[2]) <= 4 * spread * nm[2]
    if params.get("rescale", True):  # L1 rescale: every tensor's update has tau's L1 norm
        agree = agree and max(nm[3], mk[3]) <= 1e-5
    else:  # the L1 ratio is the kept fraction times the kept entries' mean |tau| ratio
        agree = agree and abs(nm[1] - mk[1]) <= 4 * (sigma * nm[2] + density * spread * nm[2])
    text = (
        f"kept {nm[0]:.4f} vs {mk[0]:.4f}; L1 ratio {nm[1]:.4f} vs {mk[1]:.4f} (worst tensor "
        f"{nm[3]:.1e} vs {mk[3]:.1e} off 1); kept/all mean abs tau {nm[2]:.3f} vs {mk[2]:.3f}"
    )
    return "(random)", f"{'stats agree' if agree else 'STATS DIFFER'}: {text}"


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = write_models(root / "models")
        rows = []
        for i, case in enumerate(cases()):
            if args.only and not any(word in case.label for word in args.only):
                continue
            work = root / f"case{i}"
            work.mkdir()
            outcome = run_both(case, folders, work, args.mergekit_bin)
            if isinstance(outcome, str):
                rows.append((case.label, "-", "-", outcome))
                continue
            ours, theirs = outcome
            if set(ours) != set(theirs):
                odd = sorted(set(ours) ^ set(theirs))[:3]
                rows.append((case.label, str(len(theirs)), "-", f"tensor names differ: {odd}"))
                continue
            if case.stats:
                diff, verdict = stats_row(case, ours, theirs, folders)
            else:
                diff, verdict = exact_row(case, ours, theirs, args.verbose)
            rows.append((case.label, str(len(theirs)), diff, verdict))
            print(f"  {case.label}: {verdict}", flush=True)
    print("\n| case | tensors | max abs diff | verdict |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-bin", type=Path, default=Path("/tmp/mk/bin"))
    parser.add_argument("--only", nargs="*", help="run the cases whose label contains a word")
    parser.add_argument("--verbose", action="store_true", help="the 5 largest diffs per case")
    main(parser.parse_args())

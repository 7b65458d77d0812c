"""The overlapped stream (loader threads, writer thread, device) changes nothing in the output."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanmerge
from nanmerge._types import MergeError
from nanmerge.coefficients import _norms
from nanmerge.engine import _stream
from nanmerge.engine._threads import BackgroundSink
from nanmerge.methods import _sparsify, tensor_generator
from tests.conftest import Family, build_family

SHAPES = {f"layers.{i}.weight": (24, 16) for i in range(12)} | {"embed.weight": (64, 16)}


def recipe(family: Family, **overrides: Any) -> dict[str, Any]:
    return {
        "base": str(family.base),
        "models": [str(p) for p in family.models],
        "method": "ties",
        **overrides,
    }


@pytest.fixture
def wide(tmp_path: Path) -> Family:
    return build_family(tmp_path / "wide", shapes=SHAPES, dtype=torch.bfloat16)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "weight_average"])
@pytest.mark.parametrize(
    "coefficients", ["uniform", "nan", {"estimator": "nan", "granularity": "tensor"}]
)
def test_threads_give_bitwise_the_same_files_as_the_sequential_stream(
    wide: Family, tmp_path: Path, method: str, coefficients: Any
) -> None:
    outputs = []
    for threads in (0, 1, 2):
        out = tmp_path / f"out{threads}"
        nanmerge.merge(
            recipe(
                wide,
                method=method,
                coefficients=coefficients,
                threads=threads,
                output=out,
                max_shard_size="2KB",
            )
        )
        outputs.append(out)
    shards = sorted(p.name for p in outputs[0].glob("*.safetensors"))
    assert len(shards) > 1
    for out in outputs[1:]:
        assert sorted(p.name for p in out.glob("*.safetensors")) == shards
        for shard in shards:
            assert (out / shard).read_bytes() == (outputs[0] / shard).read_bytes()


def test_the_background_writer_writes_in_order_from_one_thread() -> None:
    seen: list[tuple[str, str]] = []
    with BackgroundSink(lambda n, t: seen.append((n, threading.current_thread().name))) as write:
        for i in range(20):
            write(f"t{i}", torch.full((3,), float(i)))
    assert [n for n, _ in seen] == [f"t{i}" for i in range(20)]
    assert {t for _, t in seen} == {"nanmerge-write"}


def test_a_failing_write_is_raised_in_the_merging_thread_and_stops_the_writer() -> None:
    written: list[str] = []

    def sink(name: str, tensor: torch.Tensor) -> None:
        if name == "t2":
            raise MergeError("disk full")
        written.append(name)

    with pytest.raises(MergeError, match="disk full"), BackgroundSink(sink) as write:
        for i in range(50):
            write(f"t{i}", torch.zeros(2))
    assert written == ["t0", "t1"]


def test_an_error_while_merging_leaves_queued_tensors_unwritten() -> None:
    written: list[str] = []
    sinks: list[BackgroundSink] = []

    def sink(name: str, tensor: torch.Tensor) -> None:
        while not sinks[0]._abandoned:  # the write in progress outlasts the caller's error
            time.sleep(0.001)
        written.append(name)

    with pytest.raises(RuntimeError, match="merge failed"), BackgroundSink(sink) as write:
        sinks.append(write)
        write("t0", torch.zeros(2))
        write("t1", torch.zeros(2))  # queued once the writer has taken t0
        raise RuntimeError("merge failed")
    assert written == ["t0"]


def test_a_failing_merge_with_threads_leaves_no_output(wide: Family, tmp_path: Path) -> None:
    tensors = load_file(wide.models[1])
    tensors["layers.7.weight"][3, 4] = float("inf")
    save_file(tensors, wide.models[1])
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=r"layers\.7\.weight.*ft1\.safetensors.*NaN or Inf"):
        nanmerge.merge(recipe(wide, threads=2, output=out))
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_a_non_finite_base_is_named_as_the_damaged_input(wide: Family, tmp_path: Path) -> None:
    tensors = load_file(wide.base)
    tensors["embed.weight"][0, 0] = float("nan")
    save_file(tensors, wide.base)
    with pytest.raises(MergeError, match=r"embed\.weight.*base\.safetensors.*1 of 1024"):
        nanmerge.merge(recipe(wide))


def test_an_explicit_cpu_device_merges_exactly_as_the_default(wide: Family) -> None:
    default = nanmerge.merge(recipe(wide, method="dare_ties", seed=3))
    on_cpu = nanmerge.merge(recipe(wide, method="dare_ties", seed=3, device="cpu", threads=1))
    assert isinstance(default, dict) and isinstance(on_cpu, dict)
    assert all(
        torch.equal(default[k], on_cpu[k]) and on_cpu[k].device.type == "cpu" for k in default
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_an_unavailable_cuda_device_is_refused_before_any_work(
    wide: Family, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=r"device: cuda is not available.*device: cpu"):
        nanmerge.merge(recipe(wide, device="cuda", output=out))
    assert not out.exists()


def test_a_misspelt_device_is_refused(wide: Family) -> None:
    with pytest.raises(MergeError, match="'gpu' is not a torch device"):
        nanmerge.merge(recipe(wide, device="gpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merges_match_cpu_merges(wide: Family) -> None:
    for method in ("ties", "dare_ties", "task_arithmetic"):
        cpu = nanmerge.merge(recipe(wide, method=method))
        gpu = nanmerge.merge(recipe(wide, method=method, device="cuda", threads=1))
        assert isinstance(cpu, dict) and isinstance(gpu, dict)
        for k in cpu:
            assert gpu[k].device.type == "cpu"
            torch.testing.assert_close(gpu[k], cpu[k], atol=1e-2, rtol=1e-2)


# (the family has three models; passthrough, which merges one, copies it whole or chunked;
# a method with no coefficient slot runs with uniform coefficients only)
@pytest.mark.parametrize(
    ("method", "coefficients"),
    [
        (name, coefficients)
        for name, spec in sorted(nanmerge.METHODS.items())
        if spec.elementwise and (spec.max_models or 3) >= 3
        for coefficients in ("uniform", "nan")
        if spec.takes_coefficients or coefficients == "uniform"
    ],
)
@pytest.mark.filterwarnings("ignore:the method kept")  # EMR's masks, dropped without output
def test_elementwise_methods_merged_in_chunks_equal_the_whole_tensor_merge(
    wide: Family, method: str, coefficients: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # random masks drawn, and norms summed, in blocks of 50 entries, which divides the chunks
    monkeypatch.setattr(_sparsify, "DRAW", 50)
    monkeypatch.setattr(_norms, "NORM_BLOCK", 50)
    monkeypatch.setattr(_stream, "CHUNK", 1 << 20)  # 1024-entry tensors: one chunk
    whole = nanmerge.merge(recipe(wide, method=method, coefficients=coefficients))
    monkeypatch.setattr(_stream, "CHUNK", 100)  # 11 chunks, one partial
    chunked = nanmerge.merge(recipe(wide, method=method, coefficients=coefficients))
    assert isinstance(whole, dict) and isinstance(chunked, dict)
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], rtol=0, atol=0)
    # the method itself, on float32 stacks: its output on chunks (given what `prepare` found
    # over the whole tensor, one generator continued) is its output on the whole tensor
    spec = nanmerge.METHODS[method]
    stack = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    base, coef = torch.randn(1000), torch.tensor([0.5, 1.0, 2.0])
    draws = {"generator": tensor_generator(0, "w")} if spec.uses_generator else {}
    whole_output = spec.fn(stack, coef, base=base, **draws)
    draws = {"generator": tensor_generator(0, "w")} if spec.uses_generator else {}
    prepared = {} if spec.prepare is None else spec.prepare(list(stack), base, **spec.params)
    parts = [
        spec.fn(stack[:, i : i + 100], coef, base=base[i : i + 100], **draws, **prepared, **at)
        for i in range(0, 1000, 100)
        for at in [{"offset": i} if spec.prepare else {}]
    ]
    assert torch.equal(torch.cat(parts), whole_output)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"density": 0.3}),
        ("breadcrumbs", {"density": 0.5, "gamma": 0.05}),
        ("dare_ties", {"density": 0.5}),
        ("task_arithmetic", {}),
    ],
)
def test_large_bf16_tensors_merged_in_chunks_equal_the_method_on_the_whole_stack(
    tmp_path: Path, method: str, params: dict[str, float]
) -> None:
    # 600K entries: two chunks, and enough for trimming's sampled bracket and streamed cuts
    family = build_family(tmp_path, shapes={"w": (600, 1000)}, dtype=torch.bfloat16)
    merged = nanmerge.merge(recipe(family, method=method, parameters=params, seed=3))
    assert isinstance(merged, dict)
    spec = nanmerge.METHODS[method]
    stack = torch.stack([t["w"].float() for t in family.model_tensors])
    draws = {"generator": tensor_generator(3, "w")} if spec.uses_generator else {}
    whole = spec.fn(stack, torch.ones(3), base=family.base_tensors["w"].float(), **params, **draws)
    assert torch.equal(merged["w"], whole.to(torch.bfloat16))

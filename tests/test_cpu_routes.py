"""cpu_routes: the CPU route of linear / int8_linear chosen per shape by timing on this machine, kept
in memory and on disk, never timed while compiling or for gradients, overridable by environment.
Timing is faked (a clock that charges each route a fixed cost) so the picks are known in advance;
the routes' arithmetic is tested in test_linear.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo.testing

import bloom_kernels
from bloom_kernels import _tune_cache, cpu, cpu_routes, reference

COSTS = {"F.linear": 3.0, "rowblock": 1.0, "gemv": 2.0, "onednn": 4.0, "dequant": 5.0, "blocked": 6.0}


@pytest.fixture
def routes(monkeypatch, tmp_path):
    """cpu_routes measuring, with a fresh cache folder and memory, and fake routes that record their
    calls and a clock that charges COSTS[route]. Returns the list of calls, in order."""
    monkeypatch.setenv("BLOOM_KERNELS_CPU_ROUTE", "measure")
    monkeypatch.setenv(_tune_cache.CACHE_DIR_ENV, str(tmp_path / "bk"))
    monkeypatch.setenv(_tune_cache.QUIET_ENV, "")
    monkeypatch.setattr(cpu_routes, "_picks", {})
    monkeypatch.setattr(_tune_cache, "_noted", set())
    monkeypatch.setattr(_tune_cache, "_warned", set())
    calls: list[str] = []

    def recording(name, fn):
        return lambda *args: calls.append(name) or fn(*args)

    for op, table in (("linear", cpu.LINEAR_ROUTES), ("int8_linear", cpu.INT8_LINEAR_ROUTES)):
        monkeypatch.setitem(cpu_routes.ROUTES, op, {n: recording(n, f) for n, f in table.items()})

    def fake_clock(fn):
        fn()
        return COSTS[calls[-1]]

    monkeypatch.setattr(cpu_routes, "_time_ms", fake_clock)
    return calls


def _disk(tmp_path) -> dict:
    return json.loads((tmp_path / "bk" / "cpu_routes.json").read_text())


def _linear_inputs(rows=1, n=300, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)


def test_first_call_times_every_route_and_keeps_the_fastest(routes, tmp_path, capsys):
    x, w, b = _linear_inputs()
    y = bloom_kernels.linear(x, w, b)
    torch.testing.assert_close(y, reference.linear(x, w, b), atol=5e-5, rtol=1e-5)
    n_rounds = cpu_routes.TIMING_ROUNDS
    # one warm-up each, the interleaved rounds, then the pick runs the call itself
    assert routes == list(cpu.LINEAR_ROUTES) * (1 + n_rounds) + ["rowblock"]
    (key, entry), = _disk(tmp_path).items()
    assert "|op=linear|rows=1|n=300|k=64|dtype=float32|bias=True" in key
    assert f"threads={torch.get_num_threads()}" in key and f"torch={torch.__version__}" in key
    assert entry == {"route": "rowblock", "ms": {name: COSTS[name] for name in cpu.LINEAR_ROUTES}}
    assert "tuning linear (CPU route) for (1 rows, N 300, K 64, float32, bias)" in capsys.readouterr().err

    routes.clear()
    bloom_kernels.linear(x, w, b)  # known now: no timing, no note
    assert routes == ["rowblock"] and capsys.readouterr().err == ""


def test_picks_persist_across_processes(routes, tmp_path):
    x, w, b = _linear_inputs()
    bloom_kernels.linear(x, w, b)
    cpu_routes.forget()  # "another process": empty memory, the file on disk
    routes.clear()
    bloom_kernels.linear(x, w, b)
    assert routes == ["rowblock"]


def test_each_shape_row_count_and_bias_is_its_own_key(routes, tmp_path):
    for rows, n, with_bias in ((1, 300, True), (2, 300, True), (1, 301, True), (1, 300, False)):
        x, w, b = _linear_inputs(rows, n)
        bloom_kernels.linear(x, w, b if with_bias else None)
    assert len(_disk(tmp_path)) == 4


def test_corrupt_or_stale_file_is_remeasured(routes, tmp_path):
    x, w, b = _linear_inputs()
    path = tmp_path / "bk" / "cpu_routes.json"
    path.parent.mkdir(parents=True)
    path.write_text("{ not json")
    with pytest.warns(RuntimeWarning, match="not valid JSON"):
        bloom_kernels.linear(x, w, b)
    (key, entry), = _disk(tmp_path).items()  # rewritten, valid
    assert entry["route"] == "rowblock"

    path.write_text(json.dumps({key: {"route": "a-route-of-another-version"}}))
    cpu_routes.forget()
    routes.clear()
    bloom_kernels.linear(x, w, b)
    assert len(routes) > 1 and _disk(tmp_path)[key]["route"] == "rowblock"


def test_a_route_that_fails_here_is_not_a_candidate(routes, monkeypatch, tmp_path):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(cpu_routes.ROUTES["linear"], "rowblock", broken)
    x, w, b = _linear_inputs()
    bloom_kernels.linear(x, w, b)
    (entry,) = _disk(tmp_path).values()
    assert entry["route"] == "gemv" and "rowblock" not in entry["ms"]


def test_prefill_sized_inputs_take_the_default_untimed(routes, tmp_path):
    x, w, b = _linear_inputs(rows=cpu_routes.MEASURED_MAX_ROWS + 1)
    bloom_kernels.linear(x, w, b)
    q, s = reference.quantize_int8(w)
    bloom_kernels.int8_linear(x, q, s, b)
    # with gradients (int8: the input's), the reference routes autograd differentiates
    bloom_kernels.linear(x.clone().requires_grad_(), w, b)
    bloom_kernels.int8_linear(x.clone().requires_grad_(), q, s, b)
    assert routes == ["F.linear", "blocked", "F.linear", "dequant"]
    assert not (tmp_path / "bk" / "cpu_routes.json").exists()


def test_environment_default_pinned_and_invalid(routes, monkeypatch, tmp_path):
    x, w, b = _linear_inputs()
    monkeypatch.setenv("BLOOM_KERNELS_CPU_ROUTE", "default")
    bloom_kernels.linear(x, w, b)
    assert routes == ["F.linear"] and not (tmp_path / "bk" / "cpu_routes.json").exists()
    monkeypatch.setenv("BLOOM_KERNELS_CPU_ROUTE", "gemv")
    bloom_kernels.linear(x, w, b)
    assert routes[-1] == "gemv"
    monkeypatch.setenv("BLOOM_KERNELS_CPU_ROUTE", "fastest")
    with pytest.raises(ValueError, match=r"BLOOM_KERNELS_CPU_ROUTE must be measure, default or a route"):
        bloom_kernels.linear(x, w, b)


def test_int8_linear_is_measured_the_same_way(routes, tmp_path):
    x, w, b = _linear_inputs(rows=3, n=40, k=24)
    q, s = reference.quantize_int8(w)
    y = bloom_kernels.int8_linear(x, q, s, b)
    torch.testing.assert_close(y, reference.int8_linear(x, q, s, b), atol=5e-5, rtol=1e-5)
    (key, entry), = _disk(tmp_path).items()
    assert "|op=int8_linear|rows=3|n=40|k=24|" in key and entry["route"] == "gemv"  # 2.0 < dequant's 5.0


def test_gradients_take_the_reference_untimed(routes, tmp_path):
    x, w, b = _linear_inputs()
    bloom_kernels.linear(x.requires_grad_(), w, b).sum().backward()
    assert routes == ["F.linear"] and x.grad is not None
    assert not (tmp_path / "bk" / "cpu_routes.json").exists()


def test_compiled_graph_takes_the_traced_route_untimed(routes, monkeypatch, tmp_path):
    """Under torch.compile nothing is timed and every decode-sized call traces TRACED_ROUTE (gemv, as
    plain ops the graph fuses), whatever the eager pick (rowblock here) or none; prefill-sized calls
    trace F.linear. Picks made later do not recompile the graph."""
    x, w, b = _linear_inputs()
    with torch.inference_mode():
        bloom_kernels.linear(x, w, b)  # eager: measured, rowblock
    assert cpu_routes._picks[("linear", 1, 300, 64, torch.float32, True)] == "rowblock"
    # the real routes from here on: the recording ones append to a list, which dynamo would guard on
    monkeypatch.setitem(cpu_routes.ROUTES, "linear", cpu.LINEAR_ROUTES)

    backend = torch._dynamo.testing.EagerAndRecordGraphs()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    x2 = _linear_inputs(rows=2)[0]  # never measured
    x_many = _linear_inputs(rows=cpu_routes.MEASURED_MAX_ROWS + 1)[0]

    def three_linears(x, x2, x_many):
        return bloom_kernels.linear(x, w, b), bloom_kernels.linear(x2, w, b), bloom_kernels.linear(x_many, w, b)

    compiled = torch.compile(three_linears, fullgraph=True, dynamic=False, backend=counter)
    with torch.inference_mode():
        for got, inp in zip(compiled(x, x2, x_many), (x, x2, x_many)):
            torch.testing.assert_close(got, reference.linear(inp, w, b), atol=5e-5, rtol=1e-5)
        assert len(_disk(tmp_path)) == 1  # nothing timed while tracing
        cpu_routes._picks[("linear", 2, 300, 64, torch.float32, True)] = "rowblock"  # measured later
        compiled(x, x2, x_many)
    assert counter.frame_count == 1
    code = backend.graphs[0].code
    assert code.count(".sum(") == 2 and code.count("linear(") == 1 and "bmm" not in code


def test_traced_gemv_stores_its_input_once(monkeypatch):
    """After prepare_to_compile, a traced gemv passes its input through inductor's force_stride_order
    prim, so inductor stores a LayerNorm's output once instead of inlining it into the loop over the
    weight and recomputing it for every output row (3-4x slower decode, see cpu._materialized). Eagerly
    nothing changes; compiled by inductor the numbers are the reference's."""
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", "auto")
    monkeypatch.setenv("BLOOM_KERNELS_CPU_ROUTE", "default")
    g = torch.Generator().manual_seed(3)
    x, ln_w, ln_b = torch.randn(2, 1, 72, generator=g), torch.randn(72, generator=g), torch.randn(72, generator=g)
    w, b = torch.randn(40, 72, generator=g), torch.randn(40, generator=g)
    q, s = reference.quantize_int8(w)

    def layer_norm_then_projections(x):
        h = bloom_kernels.layer_norm(x, ln_w, ln_b)
        return bloom_kernels.int8_linear(h, q, s, b), bloom_kernels.linear(h, w, b)

    h = reference.layer_norm(x, ln_w, ln_b)
    want = reference.int8_linear(h, q, s, b), reference.linear(h, w, b)
    bloom_kernels.prepare_to_compile()
    recorder = torch._dynamo.testing.EagerAndRecordGraphs()
    with torch.inference_mode():
        traced = torch.compile(layer_norm_then_projections, fullgraph=True, dynamic=False, backend=recorder)(x)
        inductor = torch.compile(layer_norm_then_projections, fullgraph=True, dynamic=False)(x)
    assert recorder.graphs[0].code.count("inductor_force_stride_order") == 2
    for got in (traced, inductor):
        for y, y_ref in zip(got, want):
            torch.testing.assert_close(y, y_ref, atol=5e-5, rtol=1e-5)

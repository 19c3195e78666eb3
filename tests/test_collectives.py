"""Reading collectives from compiled HLO: what is refused, and counts, depths and bytes.

One device, in the main test process. The multi-device programs (``jax.pmap`` and
``jax.shard_map`` steps on 8 devices, FSDP all-gather/reduce-scatter) are checked in
``tests/collectives_checks.py``, which ``tests/test_sharding.py`` runs in a subprocess.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import jaxaccum

HOW = "jax.jit(f).lower(*args).compile().as_text()"

# A compiled-HLO-shaped module with what GPU and TPU programs print and XLA:CPU does not:
# asynchronous pairs, a generic async-start wrapping a reduce-scatter, a loop inside a loop,
# conditionals (both spellings) and collectives reached through calls. Per device:
# - outer loop body (depth 1): an all-reduce-start/-done pair, and an all-to-all inside a
#   call inside a call;
# - inner loop body (depth 2): an all-gather-start/-done pair (the start's tuple also holds
#   the operand: the bytes are the gathered result's), a reduce-scatter in an async
#   computation, and a conditional whose true branch holds a collective-permute pair;
# - ENTRY (depth 0): a conditional with branch_computations={...}, one branch all-reducing;
# - a computation nothing calls, holding an all-reduce that must not be reported.
SYNTHETIC_HLO = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8,32]{1,0}, f32[4,16]{1,0}, s32[])->f32[8,32]{1,0}}, num_partitions=8

FileNames
1 "train.py"

StackFrames
1 {file_location_id=1 parent_frame_id=1}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %x, f32[] %y)
}

%wrapped_reduce_scatter (p: f32[64,32]) -> f32[8,32] {
  %p = f32[64,32]{1,0} parameter(0)
  ROOT %rs = f32[8,32]{1,0} reduce-scatter(f32[64,32]{1,0} %p), channel_id=4, replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, dimensions={0}, to_apply=%add, metadata={op_name="jit(step)/while/body/while/body/reduce_scatter"}
}

%permute_branch (p.1: f32[4]) -> f32[4] {
  %p.1 = f32[4]{0} parameter(0)
  %cp-start = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(f32[4]{0} %p.1), channel_id=5, source_target_pairs={{0,1},{1,0}}
  ROOT %cp-done = f32[4]{0} collective-permute-done((f32[4]{0}, f32[4]{0}, u32[], u32[]) %cp-start)
}

%identity_branch (p.2: f32[4]) -> f32[4] {
  ROOT %p.2 = f32[4]{0} parameter(0)
}

%fused_slice (param_0: f32[8,32]) -> f32[4] {
  %param_0 = f32[8,32]{1,0} parameter(0)
  %slice = f32[1,4]{1,0} slice(f32[8,32]{1,0} %param_0), slice={[0:1], [0:4]}
  ROOT %bitcast = f32[4]{0} bitcast(f32[1,4]{1,0} %slice)
}

%outer_fusion (param_1: f32[8,32]) -> f32[4] {
  %param_1 = f32[8,32]{1,0} parameter(0)
  ROOT %inner_fusion = f32[4]{0} fusion(f32[8,32]{1,0} %param_1), kind=kLoop, calls=%fused_slice
}

%inner_body (q: (s32[], f32[8,32], f32[8,32])) -> (s32[], f32[8,32], f32[8,32]) {
  %q = (s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) %q), index=0
  %w = f32[8,32]{1,0} get-tuple-element((s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) %q), index=1
  %acc = f32[8,32]{1,0} get-tuple-element((s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) %q), index=2
  %ag-start = (f32[8,32]{1,0}, f32[64,32]{1,0}) all-gather-start(f32[8,32]{1,0} %w), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, use_global_device_ids=true, metadata={op_name="jit(step)/while/body/while/body/all_gather"}
  %ag-done = f32[64,32]{1,0} all-gather-done((f32[8,32]{1,0}, f32[64,32]{1,0}) %ag-start)
  %rs-start = ((f32[64,32]{1,0}), f32[8,32]{1,0}, s32[]) async-start(f32[64,32]{1,0} %ag-done), calls=%wrapped_reduce_scatter
  %rs-done = f32[8,32]{1,0} async-done(((f32[64,32]{1,0}), f32[8,32]{1,0}, s32[]) %rs-start), calls=%wrapped_reduce_scatter
  %piece = f32[4]{0} fusion(f32[8,32]{1,0} %rs-done), kind=kLoop, calls=%outer_fusion
  %odd = pred[] compare(s32[] %i, s32[] %i), direction=EQ
  %swapped = f32[4]{0} conditional(pred[] %odd, f32[4]{0} %piece, f32[4]{0} %piece), true_computation=%permute_branch, false_computation=%identity_branch
  %sum.1 = f32[8,32]{1,0} add(f32[8,32]{1,0} %acc, f32[8,32]{1,0} %rs-done)
  ROOT %out = (s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) tuple(s32[] %i, f32[8,32]{1,0} %w, f32[8,32]{1,0} %sum.1)
}

%inner_cond (q.1: (s32[], f32[8,32], f32[8,32])) -> pred[] {
  %q.1 = (s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(false)
}

%exchange (r: f32[8,16]) -> f32[8,16] {
  %r = f32[8,16]{1,0} parameter(0)
  ROOT %a2a = f32[8,16]{1,0} all-to-all(f32[8,16]{1,0} %r), channel_id=6, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}

%exchange_outer (r.1: f32[8,16]) -> f32[8,16] {
  %r.1 = f32[8,16]{1,0} parameter(0)
  ROOT %call.2 = f32[8,16]{1,0} call(f32[8,16]{1,0} %r.1), to_apply=%exchange
}

%outer_body (s: (s32[], f32[8,32], f32[8,32])) -> (s32[], f32[8,32], f32[8,32]) {
  %s = (s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) parameter(0)
  %inner = (s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) while((s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) %s), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"4"}}
  %g = f32[8,32]{1,0} get-tuple-element((s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) %inner), index=2
  %ar-start = f32[8,32]{1,0} all-reduce-start(f32[8,32]{1,0} %g), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, to_apply=%add, backend_config={"collective_backend_config":{"is_sync":false}}, metadata={op_name="jit(step)/while/body/psum"}
  %ar-done = f32[8,32]{1,0} all-reduce-done(f32[8,32]{1,0} %ar-start)
  %h = f32[8,16]{1,0} slice(f32[8,32]{1,0} %ar-done), slice={[0:8], [0:16]}
  %call.1 = f32[8,16]{1,0} call(f32[8,16]{1,0} %h), to_apply=%exchange_outer
  ROOT %inner.out = (s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) copy((s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) %inner)
}

%outer_cond (s.1: (s32[], f32[8,32], f32[8,32])) -> pred[] {
  %s.1 = (s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) parameter(0)
  ROOT %lt.1 = pred[] constant(false)
}

%reduce_branch (b: f32[4,16]) -> f32[4,16] {
  %b = f32[4,16]{1,0} parameter(0)
  ROOT %ar.2 = f32[4,16]{1,0} all-reduce(f32[4,16]{1,0} %b), channel_id=7, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
}

%keep_branch (b.1: f32[4,16]) -> f32[4,16] {
  ROOT %b.1 = f32[4,16]{1,0} parameter(0)
}

%unused (u: f32[2]) -> f32[2] {
  %u = f32[2]{0} parameter(0)
  ROOT %ar.9 = f32[2]{0} all-reduce(f32[2]{0} %u), channel_id=9, replica_groups={}, to_apply=%add
}

ENTRY %main (w.1: f32[8,32], v: f32[4,16], k: s32[]) -> f32[8,32] {
  %w.1 = f32[8,32]{1,0} parameter(0), sharding={devices=[8,1]<=[8]}
  %v = f32[4,16]{1,0} parameter(1)
  %k = s32[] parameter(2)
  %chosen = f32[4,16]{1,0} conditional(s32[] %k, f32[4,16]{1,0} %v, f32[4,16]{1,0} %v), branch_computations={%reduce_branch, %keep_branch}
  %init = (s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) tuple(s32[] %k, f32[8,32]{1,0} %w.1, f32[8,32]{1,0} %w.1)
  %outer = (s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) while((s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) %init), condition=%outer_cond, body=%outer_body
  ROOT %result = f32[8,32]{1,0} get-tuple-element((s32[], f32[8,32]{1,0}, f32[8,32]{1,0}) %outer), index=2
}
"""  # noqa: E501 (HLO prints each instruction on one line)


def test_text_that_is_not_hlo_raises_and_says_what_to_pass():
    with pytest.raises(ValueError, match="compiled HLO module") as info:
        jaxaccum.inspect.CollectiveReport.from_hlo("not an HLO module")
    assert HOW in str(info.value) and "jaxaccum.inspect.collectives(f, *args)" in str(info.value)
    assert "not an HLO module" in str(info.value)


@pytest.mark.parametrize(
    "text",
    ["", "HloModule jit_f, is_scheduled=true\n", "%body (p: f32[]) -> f32[] {\n}\n"],
    ids=["empty", "header-only", "no-header"],
)
def test_hlo_without_header_or_entry_raises(text):
    with pytest.raises(ValueError, match=r"'HloModule \.\.\.' header line and an 'ENTRY'"):
        jaxaccum.inspect.CollectiveReport.from_hlo(text)


def test_stablehlo_text_raises_and_says_it_is_before_compilation():
    def step(x):
        return jnp.sin(x).sum()

    text = jax.jit(step).lower(jnp.ones(8)).as_text()
    with pytest.raises(ValueError, match="StableHLO/MLIR") as info:
        jaxaccum.inspect.CollectiveReport.from_hlo(text)
    message = str(info.value)
    assert "lowered program, before compilation" in message
    assert "only final after compilation" in message
    assert HOW in message


def test_stablehlo_with_an_all_reduce_is_not_read_as_no_collectives():
    text = """\
module @jit_step attributes {mhlo.num_partitions = 8 : i32} {
  func.func public @main(%arg0: tensor<4xf32>) -> tensor<4xf32> {
    %0 = "stablehlo.all_reduce"(%arg0) <{replica_groups = dense<[[0, 1]]> : tensor<1x2xi64>}> ({
    ^bb0(%a: tensor<f32>, %b: tensor<f32>):
      %1 = stablehlo.add %a, %b : tensor<f32>
      stablehlo.return %1 : tensor<f32>
    }) : (tensor<4xf32>) -> tensor<4xf32>
    return %0 : tensor<4xf32>
  }
}
"""
    with pytest.raises(ValueError, match="StableHLO/MLIR"):
        jaxaccum.inspect.CollectiveReport.from_hlo(text)


def test_hlo_before_compilation_raises():
    text = jax.jit(jnp.sin).lower(jnp.ones(8)).as_text(dialect="hlo")
    assert text.startswith("HloModule")
    with pytest.raises(ValueError, match="without a schedule") as info:
        jaxaccum.inspect.CollectiveReport.from_hlo(text)
    assert HOW in str(info.value)


def test_non_text_raises_type_error():
    compiled = jax.jit(jnp.sin).lower(jnp.ones(8)).compile()
    with pytest.raises(TypeError, match=r"got Compiled; pass .*compile\(\)\.as_text\(\)"):
        jaxaccum.inspect.CollectiveReport.from_hlo(compiled)  # type: ignore[arg-type]


def test_synthetic_program_counts_depths_and_bytes():
    report = jaxaccum.inspect.CollectiveReport.from_hlo(SYNTHETIC_HLO)
    got = [(c.op, c.loop_depth, c.bytes, c.computation) for c in report.collectives]
    assert got == [
        ("reduce-scatter", 2, 8 * 32 * 4, "wrapped_reduce_scatter"),
        ("collective-permute", 2, 4 * 4, "permute_branch"),
        ("all-gather", 2, 64 * 32 * 4, "inner_body"),
        ("all-to-all", 1, 8 * 16 * 4, "exchange"),
        ("all-reduce", 1, 8 * 32 * 4, "outer_body"),
        ("all-reduce", 0, 4 * 16 * 4, "reduce_branch"),
    ]
    assert report.counts(in_loop=True) == {
        "reduce-scatter": 1,
        "collective-permute": 1,
        "all-gather": 1,
        "all-to-all": 1,
        "all-reduce": 1,
    }
    assert report.counts(in_loop=False) == {"all-reduce": 1}
    by_op = {c.op: c for c in report.in_loop}
    assert by_op["all-gather"].shape == "f32[64,32]{1,0}"
    assert by_op["all-gather"].source == "jit(step)/while/body/while/body/all_gather"
    assert by_op["all-reduce"].source == "jit(step)/while/body/psum"
    assert "| all-gather | yes | 2 | 8192 |" in report.table()


def test_hlo_printed_without_percent_signs():
    def summary(text: str) -> list[tuple[str, int, int]]:
        report = jaxaccum.inspect.CollectiveReport.from_hlo(text)
        return [(c.op, c.loop_depth, c.bytes) for c in report.collectives]

    assert summary(SYNTHETIC_HLO.replace("%", "")) == summary(SYNTHETIC_HLO)


def test_jitted_function_on_one_device_has_no_collectives():
    @jax.jit
    def step(w, xs):
        def body(acc, x):
            return acc + jax.grad(lambda w: jnp.mean((x @ w) ** 2))(w), None

        return lax.scan(body, jnp.zeros_like(w), xs)[0]

    report = jaxaccum.inspect.collectives(step, jnp.ones((4, 3)), jnp.ones((5, 2, 4)))
    assert report.collectives == ()
    assert str(report).startswith("in loops: none; outside loops: none")


def scan_with_pmean(axis: str):
    def step(w, xs):
        def body(acc, x):
            return acc + lax.pmean(x @ w, axis), None

        return lax.scan(body, jnp.zeros(w.shape[-1]), xs)[0]

    return step


def test_pmap_and_shard_map_on_one_device_read_the_loop():
    """The multi-device forms compile on one device too; the one-device all-reduce stays."""
    w, xs = jnp.ones((4, 3)), jnp.ones((2, 4))
    pmapped = jax.pmap(scan_with_pmean("batch"), axis_name="batch")
    report = jaxaccum.inspect.collectives(pmapped, w[None], xs[None])
    assert report.counts(in_loop=True) == {"all-reduce": 1}, report
    assert report.in_loop[0].bytes == 3 * 4

    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    mapped = jax.shard_map(scan_with_pmean("data"), mesh=mesh, in_specs=P(), out_specs=P())
    for fn in (mapped, jax.jit(mapped)):
        report = jaxaccum.inspect.collectives(fn, w, xs)
        assert report.counts(in_loop=True) == {"all-reduce": 1}, report


def test_lowered_and_compiled_programs_are_read_as_they_are():
    lowered = jax.jit(jnp.sin).lower(jnp.ones(8))
    assert jaxaccum.inspect.collectives(lowered) == jaxaccum.inspect.collectives(lowered.compile())
    with pytest.raises(TypeError, match="without arguments"):
        jaxaccum.inspect.collectives(lowered, jnp.ones(8))


@pytest.mark.parametrize(
    ("fn", "match"),
    [("HloModule m", "CollectiveReport.from_hlo"), (3, "takes a function .* got int")],
)
def test_collectives_rejects_what_it_cannot_compile(fn, match):
    with pytest.raises(TypeError, match=match):
        jaxaccum.inspect.collectives(fn)

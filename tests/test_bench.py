"""The benchmark plumbing: input rotation for DRAM-cold graph timing, and every op suite running."""
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch

from bench import common, ops


def test_input_sets_cover_the_cache_with_independent_copies():
    x = torch.randn(4, 8, 16).transpose(1, 2)  # strided
    view = x[1:, 2:5]  # shares x's storage: counted once, copied as a view
    args = (x, view, 32, None)
    nbytes = x.untyped_storage().nbytes()
    sets = common.input_sets(args, cache=5 * nbytes)
    assert len(sets) == 15  # 3 x cache / bytes per set
    assert sets[0] is args
    for copy in sets[1:]:
        assert copy[2:] == (32, None)
        for new, old in zip(copy[:2], args[:2]):
            assert new.stride() == old.stride() and new.storage_offset() == old.storage_offset()
            assert torch.equal(new, old)
            assert new.untyped_storage().data_ptr() != old.untyped_storage().data_ptr()
        assert copy[1].untyped_storage().data_ptr() == copy[0].untyped_storage().data_ptr()  # still a view of x
    assert len(common.input_sets(args, cache=10**12)) == common._MAX_INPUT_SETS
    assert len(common.input_sets(args, cache=0)) == 1  # cache size unknown: no rotation


def test_median_seconds_rotates_inputs_through_the_cache(monkeypatch):
    """Wall timing reused one set of inputs, so cache-sized CPU shapes ran from L3 against a DRAM copy:
    "% copy BW" above 100%."""
    x = torch.randn(1024)
    monkeypatch.setattr(common, "cache_bytes", lambda dev: 4 * x.untyped_storage().nbytes())
    seen = set()
    common.median_seconds(lambda a, k: seen.add((a.data_ptr(), k)), 0.01, (x, 7))
    assert len(seen) == 12 and {k for _, k in seen} == {7}  # 3 x cache / bytes per set


def test_cpu_cache_size_is_read():
    """Linux reports CPU caches in sysfs; elsewhere 0 (no rotation)."""
    assert common.cache_bytes(torch.device("cpu")) >= (2**20 if os.path.isdir("/sys/devices/system/cpu/cpu0/cache") else 0)


def test_median_seconds_passes_args():
    seen = []
    seconds = common.median_seconds(lambda a, b: seen.append(a + b), 0.01, (1, 2))
    assert seconds > 0 and set(seen) == {3}


def test_median_seconds_takes_several_samples():
    """A call longer than min_run_time (CPU eager rows, --quick runs, graph replays of many calls) gave
    blocked_autorange one block: the "median" was that single sample, a slow outlier included."""
    durations = iter([0.05, 0.05, 0.5] + [0.05] * 20)  # warm-up, block-size estimate, one slow call
    calls = []

    def fn():
        calls.append(None)
        time.sleep(next(durations))

    seconds = common.median_seconds(fn, 0.01)
    assert len(calls) >= 2 + common.MIN_SAMPLES
    assert 0.04 < seconds < 0.08  # the slow call's 0.5 s would lift a mean of the samples past 0.08


def test_markdown_leaves_speedup_blank_without_an_eager_row(tmp_path):
    report = common.Report(device="test")
    report.add("suite_backward", "case", "warps=1", 1e-3, 10**6)  # e.g. the sweep's backward rows
    report.write(str(tmp_path), "r")
    assert "0.00x" not in (tmp_path / "r.md").read_text()


def test_unet_step_compiles_every_case_with_static_shapes(monkeypatch):
    """dynamo's cache is keyed on the forward's code: the second case (other batch / frames) of the same
    model class was timed through a recompiled dynamic-shape graph unless dynamo is reset."""
    from bench import unet_step

    dynamic = []

    def backend(gm, inputs):
        dynamic.append(any(isinstance(a, torch.SymInt) or (torch.is_tensor(a) and
                                                            any(isinstance(d, torch.SymInt) for d in a.shape))
                           for a in inputs))
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend=backend))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).relu()

    try:
        for rows in (3, 5):
            model, x = Net(), torch.randn(rows, 4)
            for _, _, fn in unet_step.implementations(model, lambda unet=model, x=x: unet(x), torch.device("cpu"),
                                                      True, ["compile"]):
                fn()
    finally:
        torch.compiler.reset()
    assert dynamic == [False, False]


def test_failed_rows_get_no_speedups_and_strict_json(tmp_path):
    """A failed row's time is NaN: it gave every row of its case a NaN speedup ("nanx") when it was the
    eager one, and json.dumps wrote a bare NaN, which strict JSON parsers refuse."""
    report = common.Report(device="test")
    report.rows.append(ops._failed("suite", "case", "eager", RuntimeError("grid too large")))
    report.add("suite", "case", "hbkernels", 1e-3, 10**6)
    report.add("suite", "other", "eager", 2e-3, 10**6)
    report.rows.append(ops._failed("suite", "other", "hbkernels", RuntimeError("out of memory")))
    report.write(str(tmp_path), "r")
    assert "nan" not in (tmp_path / "r.md").read_text().replace("| nan |", "")
    rows = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))["rows"]
    assert [r["median_ms"] for r in rows] == [None, 1.0, 2.0, None]
    assert [r["speedup_vs_eager"] for r in rows] == [0.0, 0.0, 1.0, 0.0]


def test_percent_of_copy_bandwidth_follows_the_final_copy_figure(tmp_path):
    report = common.Report(device="test", copy_gbps=10.0)
    report.add("suite", "case", "eager", 1e-3, 20 * 10**6)  # 20 GB/s: 200% of a low first copy figure
    report.copy_gbps = 40.0  # measured again at the end of the run
    report.write(str(tmp_path), "r")
    assert report.rows[0].pct_copy_bw == 50.0


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        common.atomic_write(str(path), "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_graph_timing_replays_whole_rounds_of_input_sets(monkeypatch):
    """10 calls over 3 sets ended a replay on set 0, which the next replay read again at once (from L2)."""
    captured = []
    monkeypatch.setattr(common, "input_sets", lambda args, cache: [(i,) for i in range(3)])
    monkeypatch.setattr(common, "cache_bytes", lambda dev: 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(common, "capture", lambda fn: (captured.append(fn()) or type("G", (), {"replay": id}), None))
    monkeypatch.setattr(common, "median_seconds", lambda fn, min_time: 12.0)
    assert common.median_seconds_graphed(lambda i: i, 0.0, (None,), calls=10) == 1.0
    assert captured == [[0, 1, 2] * 4]


def test_report_says_how_it_timed(tmp_path):
    report = common.Report(device="test", timing=common.GRAPH_TIMING)
    report.add("suite", "case", "eager", 2e-3, 10**6)
    report.add("suite", "case", "hbkernels", 1e-3, 10**6)
    report.write(str(tmp_path), "r")
    text = (tmp_path / "r.md").read_text()
    assert f"timing: {common.GRAPH_TIMING}" in text and "| 2.00x |" in text


@pytest.mark.parametrize("dtype", [torch.float32])
def test_every_op_suite_runs(dtype, monkeypatch):
    """The quick CPU suites, each implementation called once for real (the timer only counts), so a
    suite that breaks shows here and not first on a lent GPU; every implementation of a case computes
    what its eager row does (else the benchmark would time different work against each other); each
    row's bytes are the op's minimum traffic: its activations read once, its outputs written once."""
    monkeypatch.setattr(ops, "GN_CPU", [("small", 1, 64, 3, 4, 8), ("4D", 1, 64, 0, 8, 8)])
    monkeypatch.setattr(ops, "ATTN_CPU", [("small", 1, 5, 2, 40, 6)])
    monkeypatch.setattr(ops, "GEGLU_CPU", [("small", 6, 40)])
    monkeypatch.setattr(ops, "LN_CPU", [("small", 12, 40)])
    report = common.Report(device="cpu")
    calls = []

    def timer(fn, args):
        out = fn(*args)
        calls.append((args, out))
        return 1e-3

    ops.run(report, torch.device("cpu"), dtype, quick=True, timer=timer, compile_too=False)
    report.finish()
    suites = {r.suite for r in report.rows}
    assert suites == {"temporal_attention", "group_norm_silu", "temporal_path", "geglu", "layer_norm",
                      "add_layer_norm"}
    assert all(r.median_ms == 1.0 and "error" not in r.extra for r in report.rows)
    assert {r.impl for r in report.rows} >= {"eager", "hbkernels", "sdpa"}
    assert len(calls) == len(report.rows)
    for r, (args, out) in zip(report.rows, calls):
        activations = [a for a in args if torch.is_tensor(a) and a.dim() > 1]  # not the (C,) weights
        read = sum(a.numel() * a.element_size() for a in activations)
        written = sum(o.numel() * o.element_size() for o in (out if isinstance(out, tuple) else (out,)))
        assert r.bytes_moved == read + written, (r.suite, r.case, r.impl)
    outputs = {(r.suite, r.case, r.impl): out for r, (_, out) in zip(report.rows, calls)}
    for (suite, case, impl), out in outputs.items():
        torch.testing.assert_close(out, outputs[suite, case, "eager"], rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{suite} {case}: {impl} differs from eager: {m}")


def test_git_commit_override(monkeypatch):
    """HBKERNELS_COMMIT names the commit where the checkout's git cannot; otherwise git's short HEAD."""
    monkeypatch.delenv("HBKERNELS_COMMIT", raising=False)
    own = common.git_commit()
    assert own == "unknown" or own.split("-")[0].isalnum()
    monkeypatch.setenv("HBKERNELS_COMMIT", "1234abc")
    assert common.git_commit() == "1234abc" and common.Report(device="x").commit == "1234abc"


LAYOUTS = (torch.contiguous_format, torch.channels_last_3d)


def test_sweep_knobs_exist():
    """Every knob the GPU sweep patches is a constant of its module (mock.patch would fail on the lent
    GPU, not here, otherwise), and per layout exactly one forward setting is the default: the
    statistics grid's point, which is also profiled."""
    from bench import sweep
    from hbkernels.triton import group_norm as gn

    for fmt in LAYOUTS:
        settings = sweep._gn_settings_for(sweep._gn_forward_settings(), fmt)
        for knobs in settings:
            assert all(hasattr(gn, name) for name in knobs), knobs
        defaults = [k for k in settings if sweep._is_default(gn, k)]
        assert len(defaults) == 1 and "STATS_STAGES" in defaults[0]


def test_sweep_times_each_layout_its_own_knobs():
    """Channels-last shapes take the two passes whatever ONE_PASS says, 64-channel tiles whatever the
    NCHW widths say, and their own tile knobs: the sweep times no one-pass or NCHW-width setting on
    them, sets *_CHANNELS_LAST tiles there, and drops one-knob settings equal to the layout's default
    (timed once, in the grid)."""
    from bench import sweep
    from hbkernels.triton import group_norm as gn

    settings = sweep._gn_forward_settings()
    nchw = sweep._gn_settings_for(settings, torch.contiguous_format)
    cl = sweep._gn_settings_for(settings, torch.channels_last_3d)
    widths = {"_STATS_CHANNELS_NCHW", "_APPLY_CHANNELS_NCHW"}
    assert any(widths & set(k) for k in nchw) and not any(widths & set(k) for k in cl)
    backward = sweep._one_pass_settings()  # the one-pass backward's settings
    assert sweep._gn_settings_for(backward, torch.contiguous_format) == backward
    assert not sweep._gn_settings_for(backward, torch.channels_last_3d)
    assert {"_STATS_TILE", "_APPLY_TILE"} <= {n for k in nchw for n in k}
    assert not {"_STATS_TILE", "_APPLY_TILE"} & {n for k in cl for n in k}
    assert {"_STATS_TILE_CHANNELS_LAST", "_APPLY_TILE_CHANNELS_LAST"} <= {n for k in cl for n in k}
    apply_tiles = {fmt: sorted(v for k in chosen for n, v in k.items() if n.startswith("_APPLY_TILE"))
                   for fmt, chosen in ((torch.contiguous_format, nchw), (torch.channels_last_3d, cl))}
    assert gn._APPLY_TILE not in apply_tiles[torch.contiguous_format]
    assert gn._APPLY_TILE_CHANNELS_LAST not in apply_tiles[torch.channels_last_3d]


def test_sweep_knob_filter():
    """--knob _APPLY_CHANNELS_NCHW keeps the settings that set it and the default point to compare them
    with; nothing on channels-last tensors, where no NCHW width applies. --knob takes several."""
    from bench import sweep
    from hbkernels.triton import group_norm as gn

    knob = "_APPLY_CHANNELS_NCHW"
    settings = sweep._gn_forward_settings()
    chosen = sweep._gn_settings_for(settings, torch.contiguous_format, [knob])
    setting_it = [k for k in settings if knob in k and not sweep._is_default(gn, k)]
    assert len(setting_it) > 2 and chosen[1:] == setting_it
    assert sweep._is_default(gn, chosen[0]) and "STATS_STAGES" in chosen[0]
    assert sweep._gn_settings_for(settings, torch.channels_last_3d, [knob]) == []
    # several knobs: the settings of either; on channels-last, the one that runs there
    evict = dict(APPLY_EVICT_FIRST=not gn.APPLY_EVICT_FIRST)
    both = sweep._gn_settings_for(settings, torch.contiguous_format, [knob, "APPLY_EVICT_FIRST"])
    assert both == chosen[:1] + [evict] + chosen[1:]
    cl = sweep._gn_settings_for(settings, torch.channels_last_3d, [knob, "APPLY_EVICT_FIRST"])
    assert [sweep._is_default(gn, k) for k in cl] == [True, False] and cl[1] == evict
    # the backward has no setting of these knobs: not even its default point is timed
    backward = sweep._gn_backward_settings()
    assert sweep._gn_settings_for(backward, torch.contiguous_format, [knob]) == []
    assert sweep._gn_settings_for(backward, torch.contiguous_format, ["ONE_PASS"])[0] == dict(STATS_STAGES=4)


def test_sweep_knob_needs_group_norm(monkeypatch, tmp_path):
    """--knob filters GroupNorm's settings alone: with another op it is an error, without --op it
    sweeps GroupNorm only."""
    from bench import sweep

    with pytest.raises(SystemExit):
        sweep.main(["--op", "temporal_attention", "--knob", "ONE_PASS"])
    calls = []
    monkeypatch.setattr(common, "graph_report", lambda parser, what: (torch.device("cpu"), common.Report(device="cpu")))
    monkeypatch.setattr(sweep, "SWEEPS", {op: lambda *args, op=op, **kw: calls.append((op, kw)) for op in sweep.SWEEPS})
    sweep.main(["--knob", "ONE_PASS,APPLY_EVICT_FIRST", "--out", str(tmp_path)])
    assert calls == [("group_norm", {"only": ["ONE_PASS", "APPLY_EVICT_FIRST"]})]
    calls.clear()
    sweep.main(["--out", str(tmp_path)])
    assert calls == [(op, {}) for op in sweep.SWEEPS]


def test_unet_step_suite_runs(single_thread):
    """The U-Net step rows a CPU has (eager, hbkernels) in every model state, on the tiny config."""
    from bench import unet_step

    report = common.Report(device="cpu")
    calls = []
    unet_step.run(report, torch.device("cpu"), torch.float32, [("tiny", "tiny", {}, 1, 2, 8, 8)], False,
                  timer=lambda fn: calls.append(fn()) or 1e-3)
    assert [r.impl for r in report.rows] == [f"{impl}{state[1]}" for state in unet_step.STATES
                                             for impl in ("eager", "hbkernels")]
    assert len(calls) == len(report.rows) and all(c.shape == (1, 4, 2, 8, 8) for c in calls)


def test_cpu_cache_size_sums_the_last_level_instances(tmp_path):
    """sysfs sizes are binary units ("48K", "2048K", "32M"); the highest level is the last-level cache,
    and a CPU with one per chiplet (here two L3s of 32 MB, each shared by 2 CPUs) has all of them that
    the process's CPUs share."""
    def cache(cpu, index, level, kind, size, shared):
        folder = tmp_path / f"cpu{cpu}" / "cache" / f"index{index}"
        folder.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
            (folder / name).write_text(f"{value}\n")

    for cpu in range(4):
        cache(cpu, 0, 1, "Data", "48K", cpu)
        cache(cpu, 1, 1, "Instruction", "32K", cpu)
        cache(cpu, 2, 2, "Unified", "2048K", cpu)
        cache(cpu, 3, 3, "Unified", "32M", "0-1" if cpu < 2 else "2-3")
    assert common.cpu_cache_bytes(str(tmp_path), cpus={0, 1, 2, 3}) == 64 * 2**20
    assert common.cpu_cache_bytes(str(tmp_path), cpus={2}) == 32 * 2**20  # a process pinned to one chiplet
    assert common.cpu_cache_bytes(str(tmp_path / "absent")) == 0
    assert common._cpu_list("0-3,8,10-11") == {0, 1, 2, 3, 8, 10, 11}


def test_amd_instinct_cache_is_its_infinity_cache(monkeypatch):
    """MI300's driver reports its 4 MB L2; its last-level cache is the 256 MB Infinity Cache. GPUs without
    one keep the L2 they report."""
    from types import SimpleNamespace

    monkeypatch.setattr(common.torch.version, "hip", "6.4")
    for arch, want in (("gfx942:sramecc+:xnack-", 256 * 2**20), ("gfx90a:sramecc+:xnack-", 8 * 2**20)):
        props = SimpleNamespace(L2_cache_size=(4 if arch.startswith("gfx942") else 8) * 2**20, gcnArchName=arch)
        monkeypatch.setattr(common.torch.cuda, "get_device_properties", lambda dev, props=props: props)
        assert common.cache_bytes(torch.device("cuda", 0)) == want


def test_copy_bandwidth_is_timed_like_the_ops(monkeypatch):
    """The 100% mark goes through median_seconds with its tensors as arguments, so it rotates its inputs
    through the cache as the op rows do (a closure over one src / dst would read them from cache)."""
    seen = []

    def fake_median_seconds(fn, min_run_time=0.3, args=()):
        seen.append(args)
        fn(*args)
        return 1.0

    monkeypatch.setattr(common, "median_seconds", fake_median_seconds)
    bandwidth = common.copy_bandwidth(torch.device("cpu"))
    (args,) = seen
    dst, src = args
    assert torch.is_tensor(dst) and torch.is_tensor(src) and torch.equal(dst, src)
    assert bandwidth == 2 * src.numel() * src.element_size()


@pytest.mark.parametrize("only", [None, ["_APPLY_CHANNELS_NCHW", "APPLY_EVICT_FIRST"]])
def test_sweep_group_norm_runs(monkeypatch, only):
    """The GroupNorm sweep's own code (settings patched in, rows labelled and added, the default point
    profiled, the backward swept) on a tiny shape, with the GPU timers replaced: it runs only on a
    lent GPU otherwise, where an error costs the lease."""
    from bench import sweep
    from hbkernels.triton import group_norm as gn

    timed = []
    monkeypatch.setattr(sweep, "GN_SHAPES", [(label, (1, 64, 2, 4, 4), fmt) for label, _, fmt in sweep.GN_SHAPES[:2]])
    monkeypatch.setattr(common, "median_seconds_graphed",
                        lambda fn, min_time, args: timed.append(fn(*args)) or 1e-6 * len(timed))
    # profiled over the timing's rotated input sets, reported per call: 1 ms per set -> 1000 us
    monkeypatch.setattr(sweep, "kernel_breakdown",
                        lambda fn, calls: {"families": {"hbkernels group_norm": {"top": [("stats", len(fn()))]}}})
    # the cluster forward's rows say what ran: its plan (the device queries replaced), or that none did
    from hbkernels.cuda import group_norm as cluster

    monkeypatch.setattr(cluster, "device_plan",
                        lambda index, clusters, numel, cpg, size, blocks, backward, layout, cooperative, stages:
                        None if blocks == 6 else
                        cluster.Plan(blocks or (8 if backward else 4 * stages), 32, 528, cooperative, stages))
    monkeypatch.setattr(cluster, "resident", lambda index, blocks, smem: 132 // blocks)
    monkeypatch.setattr(cluster, "resident_blocks", lambda index, smem: 132)
    report = common.Report(device="cpu")
    sweep.sweep_group_norm(report, torch.device("cpu"), 0.0, only)
    rows = [r for r in report.rows if r.suite == "group_norm_silu"]
    plans = {(r.case, r.impl): r.extra["cluster"] for r in rows if "cluster" in r.extra}
    forward = {"None": "4 blocks of 528 B, 33 clusters resident", "4": "4 blocks of 528 B, 33 clusters resident",
               "6": None, "8": "8 blocks of 528 B, 16 clusters resident",
               "12": "12 blocks of 528 B, 11 clusters resident", "16": "16 blocks of 528 B, 8 clusters resident"}
    cases = (("vc2 L0 B1 T16", "nchw"), ("vc2 L0 B1 T16 CL", "channels_last"))
    assert plans == ({} if only else {  # both layouts: the forward's cluster kernel takes channels-last x too
        **{(case, f"cluster_forward=True cluster_blocks={b}"): f"{layout}, {plan}" if plan else
           "none: the Triton passes ran" for case, layout in cases for b, plan in forward.items()},
        **{(case, f"cluster_forward=True cluster_cooperative=True cluster_blocks=None cluster_stages={k}"):
           f"{layout}, cooperative, {k} stage(s), {4 * k} blocks per group, 528 B per block, 132 blocks resident"
           for case, layout in cases for k in sweep.GN_COOPERATIVE_STAGES}})
    labels = {r.impl for r in rows}
    assert len(report.rows) == len(timed) and "eager" in labels
    assert sum(r.impl.endswith("(default)") for r in rows) == 2  # one default point per shape, profiled
    assert all(r.extra["kernel_us"] == {"stats": 1000.0} for r in rows if r.impl.endswith("(default)"))
    assert any(r.impl.startswith("apply_channels_nchw=") for r in rows)
    assert any(r.impl == f"apply_evict_first={not gn.APPLY_EVICT_FIRST}" for r in rows)
    backward = [r for r in report.rows if r.suite == "group_norm_silu_backward"]
    assert bool(backward) == (only is None)
    backward_plans = {"None": "8 blocks of 528 B, 16 clusters resident", "8": "8 blocks of 528 B, 16 clusters resident",
                      "12": "12 blocks of 528 B, 11 clusters resident", "16": "16 blocks of 528 B, 8 clusters resident"}
    assert {(r.case, r.impl): r.extra["cluster"] for r in backward if "cluster" in r.extra} == ({} if only else {
        (case, f"cluster_backward=True cluster_blocks={b}"): f"{layout}, {plan}"
        for case, layout in (("vc2 L0 B1 T16", "nchw"), ("vc2 L0 B1 T16 CL", "channels_last"))
        for b, plan in backward_plans.items()})


def test_sweep_temporal_attention_runs(monkeypatch):
    """The attention sweep's own code on a tiny shape, the GPU timer replaced."""
    from bench import sweep

    monkeypatch.setattr(sweep, "ATTN_SHAPES", [("tiny", 3, 5, 2, 16)])
    monkeypatch.setattr(common, "median_seconds_graphed", lambda fn, min_time, args: (fn(*args), 1e-6)[1])
    report = common.Report(device="cpu")
    sweep.sweep_temporal_attention(report, torch.device("cpu"), 0.0)
    assert [r.suite for r in report.rows] == ["temporal_attention"] * 5 + ["temporal_attention_backward"] * 5
    assert [r.impl for r in report.rows[:5]] == ["warps: default rule", "warps=1", "warps=2", "warps=4", "warps=8"]


def test_gn_phases_summarises_the_stamps():
    """Two waves of two blocks (stamps in ns: start, loaded, statistics known, stored): medians per
    block, the span from first start to last store, the starts' spread and the waves they make."""
    from bench import gn_phases

    clocks = torch.tensor([[[0, 4000, 5000, 9000], [500, 4000, 5500, 9500]],
                           [[10000, 14000, 15000, 19000], [10500, 14500, 15000, 20000]]], dtype=torch.int64)
    got = gn_phases.phases(clocks)
    assert got == dict(span_us=20.0, start_spread_us=10.5, load_us=4.0, wait_us=1.0, apply_us=4.0, waves=2)
    report = dict(device="GPU", date="d", commit="c", torch="t", runs=3,
                  cases={"case": [dict(config="cooperative", plan="4 blocks per group, 1 B each", **got),
                                  dict(config="clusters of 6", plan=None)]})
    lines = gn_phases.markdown(report).splitlines()
    assert "| case | cooperative | 4 blocks per group, 1 B each | 20.0 | 10.5 | 4.0 | 1.0 | 4.0 | 2 |" in lines
    assert "| case | clusters of 6 | none | | | | | | |" in lines
    # in 2 stages the second group row is the blocks' second stage: its starts are neither spread nor
    # waves, and each stage is summarised apiece (start after the first block's, load, wait, apply)
    staged = gn_phases.phases(clocks, stages=2)
    assert staged == dict(got, start_spread_us=0.5, waves=1,
                          stages=[dict(start_us=0.0, load_us=3.5, wait_us=1.0, apply_us=4.0),  # lower medians
                                  dict(start_us=10.0, load_us=4.0, wait_us=0.5, apply_us=4.0)])
    report["cases"]["case"][0].update(staged)
    lines = gn_phases.markdown(report).splitlines()
    assert "| case | cooperative: stage 2 | starts at 10.0 | | | 4.0 | 0.5 | 4.0 | |" in lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is")
def test_gn_phases_says_what_it_needs():
    from bench import gn_phases

    with pytest.raises(SystemExit) as exit_info:
        gn_phases.main(["--runs", "1"])
    assert exit_info.value.code == 1


@pytest.mark.parametrize("fail_tests", [False, True])
def test_gpu_check_exit_status_and_archive(tmp_path, fail_tests):
    """bench/gpu_check.sh runs every step whatever the last one did, and its exit status says whether any
    failed (it was the last archive's, 0 after failed tests). The archive holds the results after each
    step, renamed into place, with no partial .tmp left beside it."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho stub-gpu\n")
    (stubs / "python3").write_text(  # the tests step exits 1 when asked to; every other command writes a result
        "#!/bin/sh\ncase \"$*\" in\n"
        "  *'import xdist'*|*'import pytest_timeout'*) exit 1;;\n"
        f"  *'-m pytest'*) exit {int(fail_tests)};;\n"
        "  *) echo result > \"$RES/phases.json\";;\nesac\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    res, tarball = tmp_path / "res", tmp_path / "res.tar"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STEPS": "tests phases", "RES": str(res)}
    script = Path(__file__).parent.parent / "bench" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script), str(tmp_path / "log"), str(res), str(tarball)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == int(fail_tests), proc.stdout + proc.stderr
    assert ("failed steps: tests" in proc.stdout) == fail_tests
    assert "=== phases: exit 0" in proc.stdout  # ran after the failed step
    with tarfile.open(tarball) as tar:
        assert "./phases.json" in tar.getnames()
    assert not Path(f"{tarball}.tmp").exists()


def test_markdown_notes_what_a_row_actually_ran(tmp_path):
    """A sweep row whose knob setting fell back to the default kernels says so in the table: without it,
    such a row read as a tie with the default (a cluster backward "tie" at T26 that never ran)."""
    report = common.Report(device="test")
    report.add("suite", "case", "default", 1e-3, 10**6)
    report.add("suite", "case", "cluster_blocks=8", 1e-3, 10**6, cluster="none: the Triton passes ran",
               kernel_us={"k": 1.0})
    lines = report.markdown().splitlines()
    header = next(line for line in lines if line.startswith("| suite"))
    assert header.endswith("| notes |")
    assert lines[-1].endswith("| cluster: none: the Triton passes ran |") and "kernel_us" not in lines[-1]
    plain = common.Report(device="test")
    plain.add("suite", "case", "default", 1e-3, 10**6)
    assert "notes" not in plain.markdown()


def test_filtered_sweep_keeps_the_full_sweeps_files(tmp_path, monkeypatch):
    """A sweep of one op or some knobs writes files of its own name, not over the full sweep's."""
    from bench import sweep

    saved = []
    monkeypatch.setattr(sweep.common, "graph_report", lambda parser, why: ("cuda", common.Report(device="H100")))
    monkeypatch.setattr(sweep.common.Report, "save", lambda self, out, *parts: saved.append(parts))
    monkeypatch.setattr(sweep, "SWEEPS", {name: lambda *a, **k: None for name in ("group_norm", "temporal_attention")})
    sweep.main(["--out", str(tmp_path)])
    sweep.main(["--op", "temporal_attention", "--out", str(tmp_path)])
    sweep.main(["--op", "group_norm", "--knob", "ONE_PASS,CLUSTER_FORWARD", "--out", str(tmp_path)])
    assert saved[0] == ("sweep", "float16")
    assert len(set(saved)) == 3


def test_pipeline_table_says_how_many_runs_its_medians_take():
    from bench import pipeline

    report = pipeline.PipelineReport(device="test")
    report.add("pipeline", "320x512 T16", "hummingbird", 2.0, steps=4, text_encode_s=0.01, denoise_s=1.5, decode_s=0.4,
               ms_per_unet_call=375.0, peak_mib=1000.0, speedup_vs_videocrafter2=5.0, repeats=1)
    assert "medians of 1 timed run(s) per case" in report.markdown()


def test_a_wrong_or_failing_implementation_becomes_an_error_row_not_a_timing(monkeypatch):
    """Each implementation's result is checked against eager's before it is timed, and any exception
    (Triton's OutOfResources and CompilationError are not RuntimeErrors) fails its row alone."""
    monkeypatch.setattr(ops, "GEGLU_CPU", [("small", 6, 40)])
    monkeypatch.setattr(ops, "LN_CPU", [("small", 12, 40)])
    for name in ("ATTN_CPU", "GN_CPU"):
        monkeypatch.setattr(ops, name, [])

    class OutOfResources(Exception):
        pass

    def half_written_geglu(x):
        out = torch.randn(x.shape[0], x.shape[1] // 2)
        out[:, :10] = ops.eager_geglu(x)[:, :10]
        return out

    def out_of_resources(*args, **kwargs):
        raise OutOfResources("shared memory")

    monkeypatch.setattr(ops.hbkernels, "geglu", half_written_geglu)
    monkeypatch.setattr(ops.hbkernels, "layer_norm", out_of_resources)
    report = common.Report(device="cpu")
    ops.run(report, torch.device("cpu"), torch.float32, quick=True, timer=lambda fn, args: 1e-3, compile_too=False)
    rows = {(r.suite, r.impl): r for r in report.rows}
    assert set(rows) == {(s, i) for s in ("geglu", "layer_norm", "add_layer_norm") for i in ("eager", "hbkernels")}
    assert rows["geglu", "hbkernels"].extra["error"].startswith("wrong result: hbkernels differs from eager")
    assert rows["layer_norm", "hbkernels"].extra["error"] == "shared memory"
    assert all(r.median_ms == 1.0 for (_, impl), r in rows.items() if impl == "eager")

    # without eager's result there is nothing to compare with: the row says it went unchecked
    monkeypatch.setattr(ops, "LN_CPU", [])
    monkeypatch.setattr(ops, "eager_geglu", out_of_resources)
    monkeypatch.setattr(ops.hbkernels, "geglu", lambda x: torch.randn(x.shape[0], x.shape[1] // 2))
    report = common.Report(device="cpu")
    ops.run(report, torch.device("cpu"), torch.float32, quick=True, timer=lambda fn, args: 1e-3, compile_too=False)
    assert [(r.impl, r.extra) for r in report.rows] == [
        ("eager", {"error": "shared memory"}),
        ("hbkernels", {"unchecked": "eager failed, so this result was not compared"})]


def test_unet_step_keeps_failed_rows_and_names_filtered_runs_apart(monkeypatch, tmp_path, single_thread):
    from bench import unet_step

    report = common.Report(device="cpu")

    calls = []

    def timer(fn):  # eager's row, then hbkernels', which fails
        calls.append(fn)
        if len(calls) == 2:
            raise MemoryError("out of memory")
        return 1e-3

    unet_step.run(report, torch.device("cpu"), torch.float32, [("tiny", "tiny", {}, 1, 2, 8, 8)], False,
                  timer=timer, states=unet_step.STATES[:1])
    assert [(r.impl, r.extra.get("error")) for r in report.rows] == [
        ("eager, channels-last", None), ("hbkernels, channels-last", "MemoryError: out of memory")]

    saved = []
    monkeypatch.setattr(unet_step, "CASES_CPU", [("tiny", "tiny", {}, 1, 2, 8, 8)])
    monkeypatch.setattr(common.Report, "save", lambda self, out, *parts: saved.append(parts))
    monkeypatch.setattr(common, "median_seconds", lambda fn, min_time: 1e-3)
    for impl in ("eager", "hbkernels"):
        unet_step.main(["--no-compile", "--state", "standard", "--impl", impl, "--out", str(tmp_path)])
    assert len(set(saved)) == 2
    with pytest.raises(SystemExit):  # nothing left to time: an error, not an empty report
        unet_step.main(["--no-compile", "--impl", "compile", "--out", str(tmp_path)])


def test_bench_arguments_are_checked_before_running(capsys):
    from bench import pipeline, sweep

    with pytest.raises(SystemExit):
        sweep.main(["--knob", "ONE_PAS"])
    assert "no group_norm setting sets ONE_PAS" in capsys.readouterr().err
    for repeats in ("0", "-1"):
        with pytest.raises(SystemExit):
            pipeline.main(["--repeats", repeats])
        assert "--repeats: must be at least 1" in capsys.readouterr().err


def test_rows_without_a_byte_count_show_no_bandwidth(tmp_path):
    report = common.Report(device="test", copy_gbps=100.0)
    report.add("unet_step", "case", "eager", 2e-3)
    report.add("op", "case", "eager", 1e-3, 10**6)
    report.finish()
    lines = [line for line in report.markdown().splitlines() if line.startswith(("| unet_step", "| op"))]
    assert lines == ["| unet_step | case | eager | 2.000 |  |  | 1.00x |  |",
                     "| op | case | eager | 1.000 | 1.0 | 1 | 1.00x |  |"]


def test_cpu_pipeline_peak_is_said_to_be_the_process_high_water_mark():
    from bench import pipeline

    report = pipeline.PipelineReport(device="cpu")
    report.add("pipeline", "64x64 T4", "hummingbird", 2.0, steps=4, text_encode_s=0.01, denoise_s=1.5, decode_s=0.4,
               ms_per_unet_call=375.0, peak_mib=1000.0, speedup_vs_videocrafter2=5.0, repeats=1, peak=pipeline.CPU_PEAK)
    assert "includes earlier cases" in report.markdown()

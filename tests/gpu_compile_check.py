"""Compile every Triton kernel variant that the ops launch for real GPU targets, on a machine without one.

CI runs the Triton code in its CPU interpreter, which never meets a GPU compiler. This script runs the
launchers on CPU tensors with the launch itself replaced by a recorder, then compiles each distinct
(kernel, argument types, constexprs, warps, stages) ahead of time: to cubin through ptxas for NVIDIA
sm_80 / sm_90, to hsaco for AMD gfx942 (MI300, ROCm) -- the portability check -- and checks each
kernel's shared memory against the target's limit, which a GPU would only report at launch.

    TRITON_INTERPRET=0 python tests/gpu_compile_check.py {sm80,sm90,gfx942}

Each variant is specialised the way Triton's JIT would specialise that launch on a GPU (its own binder:
integer arguments equal to 1 become constants, 16-divisible integers and 16-byte-aligned pointers get
divisibility hints), so what is compiled -- vectorised or scalar loads, register counts -- is what a GPU
would run. Prints one line per compiled variant, with registers per thread, spill stack and programs
resident per SM (NVIDIA) or VGPRs and spills (AMD); exits 1 if any fails.
"""
import itertools
import os
import re
import subprocess
import sys
import tempfile
from unittest import mock

os.environ["TRITON_INTERPRET"] = "0"  # real JITFunctions, before anything imports triton
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/, not installed

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from hbkernels import triton as kernels  # noqa: E402
from hbkernels.triton import group_norm  # noqa: E402

# name -> (target, shared memory per block the hardware allows, bytes)
TARGETS = {
    "sm80": (GPUTarget("cuda", 80, 32), 163 * 1024),
    "sm90": (GPUTarget("cuda", 90, 32), 227 * 1024),
    "gfx942": (GPUTarget("hip", "gfx942", 64), 64 * 1024),
}


def record_launches(pdl: bool) -> list:
    """(kernel, {argument name: value}, launch options) of every launch the primitives make below, with
    GroupNorm's kernels chained by programmatic dependent launch where the target has it (sm_90)."""
    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
        launches.append((self, {**dict(zip(self.arg_names, args)), **kwargs}, options))

    JITFunction.run = run
    group_norm.sm_count = lambda device: 132  # an H100's SMs: launch planning asks the (absent) GPU
    group_norm._pdl = lambda device: pdl
    attention_cases(), group_norm_cases(), elementwise_cases(), unit_size_cases(), bench_cases()
    return launches


def rand(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def attention_cases():
    # T picks the query/key block (16/32/64) and D the head block (64/128/256) for fp16/bf16; fp32 has
    # its own single config per head block. Every block pair in fp16, the corners in bf16/fp32.
    cases = {torch.float16: [(16, 40, False), (26, 64, True), (77, 80, False), (16, 128, False), (64, 160, False),
                             (8, 256, False), (48, 64, False), (100, 64, True), (32, 80, False), (24, 32, False),
                             (48, 16, False), (48, 32, True)],
             torch.bfloat16: [(26, 64, False), (64, 160, False)],
             torch.float32: [(16, 64, False), (26, 64, False), (77, 80, True), (8, 256, False)]}
    for dtype, shapes in cases.items():
        for t, d, causal in shapes:
            q, k, v, do = (rand(2, t, 3, d, dtype=dtype) for _ in range(4))
            out = torch.empty_like(q)
            stats = torch.empty(2, 3, t, kernels.ATTN_ROW_STATS)
            kernels.attn_fwd(q, k, v, out, stats, 0.1, causal)
            dq, dk, dv = (torch.empty_like(q) for _ in range(3))
            kernels.attn_bwd(do, q, k, v, out, stats, dq, dk, dv, 0.1, causal)


def group_norm_cases():
    # NCHW (narrow-C tiles) and channels-last (wide-C tiles); affine + SiLU and neither; fp32 takes the
    # precise-sigmoid path
    for dtype, fmt, silu in [(torch.float16, torch.contiguous_format, True), (torch.float16, torch.channels_last_3d, True),
                             (torch.float16, torch.contiguous_format, False), (torch.bfloat16, torch.channels_last_3d, True),
                             (torch.float32, torch.contiguous_format, True)]:
        x = rand(1, 320, 4, 8, 8, dtype=dtype).contiguous(memory_format=fmt)
        affine = (rand(320, dtype=dtype), rand(320, dtype=dtype)) if silu else (None, None)
        shift = torch.randn(1, 320) if silu else None  # the ResNet block's time embedding
        x4, y4 = x.flatten(3), torch.empty_like(x).flatten(3)
        mean, rstd = torch.empty(1, 32), torch.empty(1, 32)
        kernels.gn_fwd(x4, *affine, shift, y4, mean, rstd, 32, 1e-5, silu)
        dx4 = torch.empty_like(x).flatten(3)
        grads = [torch.empty(320) if p is not None else None for p in affine]
        kernels.gn_bwd(torch.randn_like(x).flatten(3).to(dtype), x4, *affine, shift, mean, rstd, dx4, *grads, 32, silu)
    # the U-Net's level-0 activation (320x512, 16 frames): its real tiling, so the printed registers are
    # the ones that decide how many programs an SM holds there; the apply pass also with its eviction
    # hints switched, the dx pass one channel wide, the launch order switched, and the statistics pass at
    # the sweep's one-tile-per-program points
    from bench import sweep

    evict_first = group_norm.APPLY_EVICT_FIRST
    settings = [{"APPLY_EVICT_FIRST": evict_first}, {"APPLY_EVICT_FIRST": not evict_first},  # the first: defaults
                {"_BWD_APPLY_CHANNELS_NCHW": 1}, {"CHANNEL_BLOCKS_FIRST": not group_norm.CHANNEL_BLOCKS_FIRST}]
    settings += [{"STATS_PROGRAMS_PER_SM": p, "_STATS_TILE": t, "_STATS_TILE_CHANNELS_LAST": t, "STATS_STAGES": st}
                 for p, t, st in sweep.GN_ONE_TILE_POINTS]
    for knobs, fmt in itertools.product(settings, (torch.contiguous_format, torch.channels_last_3d)):
        with mock.patch.multiple(group_norm, **knobs):
            x = rand(1, 320, 16, 40, 64, dtype=torch.float16).contiguous(memory_format=fmt)
            affine = rand(320, dtype=torch.float16), rand(320, dtype=torch.float16)
            mean, rstd = torch.randn(1, 32), torch.rand(1, 32)
            kernels.gn_fwd(x.flatten(3), *affine, None, torch.empty_like(x).flatten(3), mean, rstd, 32, 1e-5, True)
            kernels.gn_bwd(torch.randn_like(x).flatten(3), x.flatten(3), *affine, None, mean, rstd,
                           torch.empty_like(x).flatten(3), torch.empty(320), torch.empty(320), 32, True)
    # the one-pass backward (NCHW only) at level 0, T16 and T26 (4096- and 8192-element tiles), with
    # the time-embedding shift and fp32's precise sigmoid
    group_norm.ONE_PASS = True
    for t, dtype, shift in [(16, torch.float16, None), (26, torch.float16, torch.randn(1, 320)),
                            (16, torch.float32, None)]:
        x = rand(1, 320, t, 40, 64, dtype=dtype)
        affine = rand(320, dtype=dtype), rand(320, dtype=dtype)
        mean, rstd = torch.randn(1, 32), torch.rand(1, 32)
        kernels.gn_bwd(torch.randn_like(x).flatten(3), x.flatten(3), *affine, shift, mean, rstd,
                       torch.empty_like(x).flatten(3), torch.empty(320), torch.empty(320), 32, True)
    group_norm.ONE_PASS = False


def elementwise_cases():
    src = rand(2, 64, 3, 40, dtype=torch.float16)
    kernels.copy_add(src.transpose(1, 3), src.transpose(1, 3), None, torch.empty_like(src).transpose(1, 3))
    kernels.copy_add(src, None, None, torch.empty_like(src))
    kernels.copy_add(src, src.transpose(1, 3).contiguous().transpose(1, 3), torch.randn(64), torch.empty_like(src))
    for dtype in (torch.float16, torch.float32):
        x = rand(100, 2 * 640, dtype=dtype)
        kernels.geglu_fwd(x, torch.empty(100, 640, dtype=dtype))
        kernels.geglu_bwd(rand(100, 640, dtype=dtype), x, torch.empty_like(x))
    # LayerNorm: the U-Net's widths (row tiles of 8 / 2 rows) and the widest one-row tile
    for dtype, c, affine in [(torch.float16, 320, True), (torch.float16, 1280, False), (torch.bfloat16, 640, True),
                             (torch.float32, 320, True), (torch.float16, 16384, True)]:
        x = rand(64, c, dtype=dtype)
        w, b = (rand(c, dtype=dtype), rand(c, dtype=dtype)) if affine else (None, None)
        mean, rstd = torch.empty(64), torch.empty(64)
        kernels.ln_fwd(x, None, w, b, torch.empty_like(x), None, mean, rstd, 1e-5)
        if affine:  # the transformer block's residual add fused in
            kernels.ln_fwd(x, torch.randn_like(x), w, b, torch.empty_like(x), torch.empty_like(x), mean, rstd, 1e-5)
        grads = (torch.empty(c), torch.empty(c)) if affine else (None, None)
        kernels.ln_bwd(torch.randn_like(x), x, w, mean, rstd, torch.empty_like(x), *grads)


def unit_size_cases():
    # sizes and strides of 1, which the JIT turns into constexpr ints (a `.to()` on one fails to compile
    # only there): the test suites' one-channel, one-row, one-frame, one-pixel shapes
    x = rand(5, 1, dtype=torch.float16)
    w, b = rand(1, dtype=torch.float16), rand(1, dtype=torch.float16)
    kernels.ln_fwd(x, x.clone(), w, b, torch.empty_like(x), torch.empty_like(x), torch.empty(5), torch.empty(5), 1e-5)
    kernels.ln_bwd(torch.randn_like(x), x, rand(1, dtype=torch.float16), torch.randn(5), torch.rand(5),
                   torch.empty_like(x), torch.empty(1), torch.empty(1))
    x = rand(1, 32, 1, 1, 1, dtype=torch.float16)
    affine = rand(32, dtype=torch.float16), rand(32, dtype=torch.float16)
    mean, rstd = torch.randn(1, 32), torch.rand(1, 32)
    kernels.gn_fwd(x.flatten(3), *affine, None, torch.empty_like(x).flatten(3), mean, rstd, 32, 1e-5, True)
    kernels.gn_bwd(torch.randn_like(x).flatten(3), x.flatten(3), *affine, None, mean, rstd,
                   torch.empty_like(x).flatten(3), torch.empty(32), torch.empty(32), 32, True)
    group_norm.ONE_PASS = True  # one-element tiles
    kernels.gn_bwd(torch.randn_like(x).flatten(3), x.flatten(3), *affine, None, mean, rstd,
                   torch.empty_like(x).flatten(3), torch.empty(32), torch.empty(32), 32, True)
    group_norm.ONE_PASS = False
    q, k, v, do = (rand(1, 1, 1, 8, dtype=torch.float16) for _ in range(4))
    out, stats = torch.empty_like(q), torch.empty(1, 1, 1, kernels.ATTN_ROW_STATS)
    kernels.attn_fwd(q, k, v, out, stats, 0.1, False)
    kernels.attn_bwd(do, q, k, v, out, stats, *(torch.empty_like(q) for _ in range(3)), 0.1, False)
    src = rand(1, 1, 1, 1, dtype=torch.float16)
    kernels.copy_add(src, src.clone(), torch.randn(1), torch.empty_like(src))
    kernels.geglu_fwd(rand(1, 2, dtype=torch.float16), torch.empty(1, 1, dtype=torch.float16))


def bench_cases():
    """The benchmarks' own kernels: a lent GPU's minutes are not for compile errors."""
    from bench import memory_floor

    x = rand(3 * memory_floor.TILE, dtype=torch.float16)
    y, sums = torch.empty_like(x), torch.empty(3)
    memory_floor.reread(x, y, sums, 2)
    memory_floor.reread(x, y, sums, 2, programs=2, hints=True)
    memory_floor.two_kernels(x, y, sums, reverse=True)
    memory_floor.two_kernels(x, y, sums, reverse=True, hints=True)
    memory_floor.read_only(x, y, sums)


def specialize(fn, args, options, target):
    """(signature, constexprs, attrs, options) of one recorded launch, built by Triton's own JIT binder."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = binder(**args, **options)
    options, signature, constexprs, attrs = fn._pack_args(backend, dict(options), bound, specialization, options)
    return signature, constexprs, attrs, options


def resident_programs(regs: int, warps: int, shared: int, shared_limit: int) -> int:
    """Programs one sm_80/sm_90 SM holds at once: 64K registers allocated per warp in units of 256 (8 per
    thread), at most 64 warps and 32 programs, the SM's shared memory (a program's limit + 1 KiB) less
    1 KiB per program. The loads in flight per SM, so a streaming kernel's bandwidth, scale with it."""
    warps_by_regs = 65536 // (-(-regs * 32 // 256) * 256)
    return min(32, 64 // warps, warps_by_regs // warps, (shared_limit + 1024) // (shared + 1024))


def resources(compiled, target, shared_limit: int):
    """(registers per thread and spill stack (NVIDIA, from cuobjdump) or VGPRs and spills (AMD) as text,
    programs resident per SM or None where unknown)."""
    if target.backend == "cuda":
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
        if not found:
            return "regs=?", None
        regs, warps = int(found[1]), compiled.metadata.num_warps
        resident = resident_programs(regs, warps, compiled.metadata.shared, shared_limit)
        return f"regs={regs} spill_stack={found[2]} resident/SM={resident}", resident
    found = [re.search(rf"\.{key}:\s*(\d+)", compiled.asm["amdgcn"]) for key in ("vgpr_count", "vgpr_spill_count")]
    return f"vgprs={found[0][1] if found[0] else '?'} spills={found[1][1] if found[1] else '?'}", None


# Instructions the one-pass GroupNorm backward's exchange of partial sums between programs relies on (see
# _gn_one_pass_bwd_kernel): the arrival published with release semantics right after a CTA barrier, every
# poll of the counter with acquire semantics, other programs' partials read past the non-coherent L1.
# A compiler that dropped one would still compile and pass every interpreter test, and race on a GPU.
# Entries: a pattern the code must contain, or (anchor, follow): every anchor must be followed by follow.
ONE_PASS_SYNC = {
    "cuda": [r"bar\.sync\s+0;[\s\S]{0,400}?(?:atom|red)\.global\.gpu\.release\.add",
             (r"ld\.global\.gpu\.\w+\.b32", r"ld\.global\.gpu\.acquire"),  # Triton polls with loads
             r"ld\.volatile\.global"],
    # release: a write-back right before the (non-returning) arrival add; acquire: an invalidate of the
    # CU's caches right after each poll, which LLVM emits as an atomic or-0 or as an agent-scope acquire
    # load (sc1 alone; volatile loads carry sc0 sc1). That invalidate is what makes the partials fresh
    # here: Triton 3.9 turns the masked volatile loads into buffer loads without their sc0 sc1 bits.
    "hip": [r"buffer_wbl2 sc1\s+s_waitcnt vmcnt\(0\)\s+global_atomic_add v\d+, v\d+, s\[\d+:\d+\](?: offset:\d+)?\n",
            (r"global_atomic_or |global_load_dword v\d+, v\d+, s\[\d+:\d+\](?: offset:\d+)? sc1\n",
             r"(?:global_atomic_or [^\n]* sc0|global_load_dword [^\n]* sc1)\s+s_waitcnt vmcnt\(0\)\s+buffer_inv sc1")],
}
SYNC_PATTERNS = {"_gn_one_pass_bwd_kernel": ONE_PASS_SYNC}
# Kernels whose programs wait for others that must be resident at the same time
RESIDENT_GROUPS = {"_gn_one_pass_bwd_kernel"}


def missing_sync(name: str, compiled, target) -> list:
    """The SYNC_PATTERNS of kernel ``name`` that its compiled code does not satisfy."""
    checks = SYNC_PATTERNS.get(name, {}).get(target.backend, [])
    code = compiled.asm["ptx" if target.backend == "cuda" else "amdgcn"] if checks else ""
    missing = []
    for check in checks:
        if isinstance(check, tuple):
            anchor, follow = check
            starts = [m.start() for m in re.finditer(anchor, code)]
            ok = bool(starts) and all(re.match(follow, code[i:]) for i in starts)
        else:
            ok = re.search(check, code) is not None
        if not ok:
            missing.append(check)
    return missing


def main(target_name: str) -> int:
    target, shared_limit = TARGETS[target_name]
    seen, failures = set(), 0
    for fn, args, launch_options in record_launches(pdl=target_name == "sm90"):
        sig, constexprs, attrs, options = specialize(fn, args, launch_options, target)
        key = (fn.__name__, tuple(sig.items()), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
               tuple(sorted(launch_options.items())))
        if key in seen:
            continue
        seen.add(key)
        label = f"{fn.__name__} {dict((fn.arg_names[i[0]], v) for i, v in constexprs.items())} {launch_options}"
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                      target=target, options=options.__dict__)
            shared = compiled.metadata.shared
            if shared > shared_limit:
                raise RuntimeError(f"needs {shared} bytes of shared memory, {target_name} has {shared_limit}")
            missing = missing_sync(fn.__name__, compiled, target)
            if missing:
                raise RuntimeError(f"its code lacks the synchronisation {missing}")
            usage, resident = resources(compiled, target, shared_limit)
            if fn.__name__ in RESIDENT_GROUPS and resident is not None and resident < group_norm.ONE_PASS_MIN_RESIDENT:
                # programs waiting for their group: fewer resident per SM than launches that may run at once
                raise RuntimeError(f"{usage}: under ONE_PASS_MIN_RESIDENT = {group_norm.ONE_PASS_MIN_RESIDENT}")
            print(f"ok   {label} shared={shared} {usage}")
        except Exception as err:  # report every failing variant, not just the first
            failures += 1
            print(f"FAIL {label}: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}")
    kernels_seen = sorted({k[0] for k in seen})
    print(f"{target_name}: {len(seen)} variants of {len(kernels_seen)} kernels ({', '.join(kernels_seen)}), "
          f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

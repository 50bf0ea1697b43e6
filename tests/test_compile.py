"""Every Triton kernel of sae_kernels/ compiled for real GPUs, on a machine without one: sm_90 (H100, H200) and
sm_80 (A100).

tests/test_kernels.py runs the kernels in Triton's interpreter, which checks their arithmetic but nothing that only
the compiler checks: the types of loop-carried values, ops a GPU lacks (a tl.dot on blocks smaller than 16 x 16),
register and shared-memory use at the real block sizes, what a newer Triton rejects. Triton compiles ahead of time
for a named target with no GPU and no driver present:

    triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 8, "num_stages": 3})

runs the whole pipeline (Triton IR, LLVM IR, PTX, then the ptxas that ships in the triton wheel) down to a cubin.
This file compiles every @triton.jit kernel of sae_kernels/ that way: with every config its @triton.autotune may try on
a GPU, for every dtype its module supports, for every launch its launchers make (flags, argument dtypes), with the
argument types and alignment Triton's launcher would derive at the paper's shapes. Kernels are discovered, so one
without an entry in LAUNCHES fails the test; @triton.jit helpers are compiled inside the kernels that call them.

A compiled kernel must also fit on the GPU: registers x threads within the 64K registers of a multiprocessor and
shared memory within what one block may have. cuobjdump (also in the wheel) reads the registers and the stack frame
from the cubin; a stack frame is where ptxas spills the registers that do not fit (on a GPU, Triton's n_spills is
that memory in 4-byte words). A spill is a performance bug visible without a GPU: BENCHMARKS.md has the table.

The compiling happens in a child process (this file run as a script): conftest.py has set TRITON_INTERPRET=1 in
the test process, under which @triton.jit makes interpreted functions that cannot be compiled.

    python -m pytest tests/test_compile.py -q                               # sm_90: the suite's default
    E2ESAE_COMPILE_ARCHS=80,90 python -m pytest tests/test_compile.py -q    # the A100 as well
    python tests/test_compile.py --arch 90 80 --table                       # BENCHMARKS.md's register table
"""
import argparse
import ast
import concurrent.futures
import functools
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = [int(a) for a in os.environ.get("E2ESAE_COMPILE_ARCHS", "90").split(",")]
REGISTERS_PER_SM = 65536  # the register file of one multiprocessor, on sm_80 and sm_90 alike
SHARED_PER_BLOCK = {80: 166912, 90: 232448}  # bytes of shared memory one block may use (A100, H100/H200)

# ----------------------------------------------------------------------------------------------------------
# The launches: each kernel's arguments at the paper's shapes, one dict per call its launcher makes.
# A pointer is written as its type ("*bf16": a torch tensor, so 16-byte aligned), a scalar as a typical value
# (Triton specializes on it: see specialize), a constexpr flag as a bool; the config supplies the block sizes.

TOKENS, D_IN, N_DICT, VOCAB = 8192, 768, 46080, 50257  # 8 x 1024 tokens, GPT-2 small, ratio 60, GPT-2's vocabulary
NNZ = 40 * TOKENS + 7  # ReLU's active (token, code) pairs at ~40 per token: no multiple of 16, like most counts
TOPK_NNZ = 32 * TOKENS  # TopK's selected pairs, k = 32 per token: a multiple of 16, which Triton specializes on


def kl_forward_launches(t):
    """KL of (R, V) logits of dtype t: the loss alone (kl_div without a gradient), or writing its gradient too (into
    a fresh tensor for kl_div, over the chunk's new logits for linear_kl_div)."""
    logits = dict(new_ptr=f"*{t}", orig_ptr=f"*{t}", grad_ptr=f"*{t}", kl_ptr="*fp32", grad_scale=1 / TOKENS,
                  vocab=VOCAB, stride_new=VOCAB, stride_orig=VOCAB, stride_grad=VOCAB)
    return {"loss alone": dict(logits, WRITE_GRAD=False), "loss and gradient": dict(logits, WRITE_GRAD=True)}


def relu_count_launches(t):
    return {"relu + count": dict(c_ptr=f"*{t}", count_ptr="*i32", n_dict=N_DICT)}


def compact_launches(t):
    return {"compact": dict(c_ptr=f"*{t}", row_ptr="*i64", col_ptr="*i64", val_ptr=f"*{t}", n_dict=N_DICT)}


def spmm_launches(t):
    """gather_sum in SAEForwardSparse: the decoder, then the gradients (fp32 weights g_pre; fp32 outputs for dD).

    ReLU's pattern and TopK's launch them alike: no argument depends on the number of entries."""
    def launch(val, out, width, has_bias):
        return dict(ptr_ptr="*i64", idx_ptr="*i64", val_ptr=f"*{val}", table_ptr=f"*{t}",
                    bias_ptr=f"*{t if has_bias else out}", out_ptr=f"*{out}", d=width, HAS_BIAS=has_bias)
    return {"x_hat = C D^T + b_dec": launch(t, t, D_IN, True),
            "dx = G_pre W_enc, dW_enc = G_pre^T x": launch("fp32", t, D_IN, False),
            "db_enc = G_pre^T 1 (a table of one column)": launch("fp32", t, 1, False),
            "dD = C^T g": launch(t, "fp32", D_IN, False)}


def sddmm_launches(t):
    """sampled_dots: D_j . g_i at the selected pairs, for ReLU's pattern and for TopK's, whose entry count is a
    multiple of 16."""
    def launch(nnz):
        return dict(row_ptr="*i64", idx_ptr="*i64", left_ptr=f"*{t}", right_ptr=f"*{t}", out_ptr="*fp32", nnz=nnz,
                    d=D_IN)
    return {"ReLU": launch(NNZ), "TopK": launch(TOPK_NNZ)}


LAUNCHES = {"kl._kl_forward_kernel": kl_forward_launches,
            "sae._relu_count_kernel": relu_count_launches, "sae._compact_kernel": compact_launches,
            "sae._spmm_kernel": spmm_launches, "sae._sddmm_kernel": sddmm_launches}


# ----------------------------------------------------------------------------------------------------------
# The child process: discover, specialize, compile, measure


@functools.cache
def discover():
    """{"module.name": (JITFunction, configs, names it calls)} for every @triton.jit function defined in sae_kernels/.

    configs are those @triton.autotune may try on a GPU (one default config for a kernel without autotuning).
    """
    import triton
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, KernelInterface

    import sae_kernels
    assert sae_kernels.backend.AUTOTUNE, "autotuning is off (TRITON_INTERPRET or E2ESAE_AUTOTUNE=0 is set)"
    found = {}
    for info in pkgutil.iter_modules(sae_kernels.__path__):
        module = importlib.import_module(f"sae_kernels.{info.name}")
        for obj in vars(module).values():
            configs = [triton.Config({})]
            while isinstance(obj, KernelInterface) and not isinstance(obj, JITFunction):  # autotune, heuristics
                configs = obj.configs if isinstance(obj, Autotuner) else configs
                obj = obj.fn
            if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__:
                found[f"{info.name}.{obj.__name__}"] = (obj, configs, called_names(obj))
    return found


def called_names(jit):
    """The names of the functions jit's source calls (f(...) or module.f(...))."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(jit.fn)))
    calls = [node.func for node in ast.walk(tree) if isinstance(node, ast.Call)]
    return sorted({f.id if isinstance(f, ast.Name) else f.attr
                   for f in calls if isinstance(f, (ast.Name, ast.Attribute))})


def specialize(jit, args):
    """triton.compile's (signature, constexprs, attrs) for one launch, derived as Triton's launcher derives them.

    args: every argument by name, constexpr parameters (flags, the config's block sizes) included. A pointer keeps
    its type and is 16-byte aligned (torch allocates so); an int is i32 (i64 from 2^31), or a constexpr if it
    equals 1; pointers and ints divisible by 16 get tt.divisibility=16, which lets loads vectorize; a float is fp32.
    """
    aligned = [["tt.divisibility", 16]]
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(jit.arg_names, jit.params)):
        value = args[name]
        if param.is_constexpr or (type(value) is int and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, str):
            signature[name], attrs[(i,)] = value, aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = aligned
    return signature, constexprs, attrs


def config_label(config):
    """BLOCK_V=4096 warps=8 (and stages=..., where not Triton's default 3)."""
    label = " ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f" warps={config.num_warps}"
    return label + (f" stages={config.num_stages}" if config.num_stages != 3 else "")


def cubin_resources(cubin: bytes) -> dict:
    """Registers and stack frame bytes (where ptxas spills registers) per thread of a one-kernel cubin."""
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert found, f"unexpected cuobjdump output:\n{usage}"
    regs, stack, local = map(int, found.groups())
    return dict(regs=regs, stack_bytes=stack + local)


def compile_variant(variant):
    """Compile one (kernel, launch, dtype, config, arch); returns the variant with its resources or its error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit, configs, _ = discover()[variant["kernel"]]
    config = configs[variant["config_index"]]
    args = variant["args"]
    expected = sorted(set(jit.arg_names) - set(config.kwargs))
    if sorted(args) != expected:
        return dict(variant, error=f"LAUNCHES gives arguments {sorted(args)}, the kernel takes {expected}")
    signature, constexprs, attrs = specialize(jit, {**args, **config.kwargs})
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages, num_ctas=config.num_ctas)
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    try:
        compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", variant["arch"], 32), options=options)
    except Exception as e:  # noqa: BLE001 - the error is the result: a compile error, a ptxas failure
        return dict(variant, error=f"{type(e).__name__}: {e}"[:3000])
    return dict(variant, **cubin_resources(compiled.asm["cubin"]), shared=compiled.metadata.shared,
                threads=32 * config.num_warps)


def all_variants(archs):
    """Every (kernel, launch, dtype, config, arch) to compile, for each kernel LAUNCHES knows."""
    import torch
    type_names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    variants = []
    for name, launches_of in LAUNCHES.items():
        if name not in discover():
            continue  # reported by test_every_kernel_has_launches
        jit, configs, _ = discover()[name]
        seen = []
        for dtype in sys.modules[jit.fn.__module__].SUPPORTED_DTYPES:
            for launch, args in launches_of(type_names[dtype]).items():
                if args in seen:  # fp32: several launches coincide
                    continue
                seen.append(args)
                variants += [dict(kernel=name, launch=launch, dtype=type_names[dtype], config=config_label(config),
                                  config_index=i, arch=arch, args=args)
                             for i, config in enumerate(configs) for arch in archs]
    return variants


def compile_everything(archs):
    """The report: the triton version, what discover found, and every variant compiled, on all cores."""
    import triton
    found = discover()
    variants = all_variants(archs)
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
        compiled = list(pool.map(compile_variant, variants, chunksize=1))
    return dict(triton=triton.__version__, archs=archs, kernels={name: calls for name, (_, _, calls) in found.items()},
                variants=compiled)


def print_table(report):
    """Markdown: per kernel and config, registers per thread (the range over dtypes and launches), stack frame and
    shared memory bytes (the largest), for each arch; then every variant with a stack frame, i.e. that spills."""
    rows = {}
    for v in report["variants"]:
        rows.setdefault((v["kernel"], v["config"]), {}).setdefault(v["arch"], []).append(v)
    archs = report["archs"]
    print("| kernel | config | " + " | ".join(f"sm_{a} registers | sm_{a} stack | sm_{a} shared" for a in archs) + " |")
    print("|---|---|" + "---:|---:|---:|" * len(archs))
    for (kernel, config), by_arch in rows.items():
        cells = []
        for arch in archs:
            ok = [v for v in by_arch[arch] if "error" not in v]
            if len(ok) < len(by_arch[arch]):
                cells += ["does not compile", "", ""]
                continue
            regs = sorted({v["regs"] for v in ok})
            cells += [f"{regs[0]}-{regs[-1]}" if len(regs) > 1 else str(regs[0]),
                      str(max(v["stack_bytes"] for v in ok)), str(max(v["shared"] for v in ok))]
        print(f"| {kernel} | {config} | " + " | ".join(cells) + " |")
    for v in report["variants"]:
        if v.get("stack_bytes"):
            print(f"- sm_{v['arch']} {v['kernel']} {v['dtype']} [{v['launch']}] {v['config']}: {v['regs']} registers, "
                  f"{v['stack_bytes']} bytes of stack")


def main(argv):
    parser = argparse.ArgumentParser(description="Compile every kernel of sae_kernels/ for GPUs, without a GPU.")
    parser.add_argument("--arch", type=int, nargs="+", default=ARCHS, help="compute capabilities, e.g. 90 80")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--table", action="store_true", help="print BENCHMARKS.md's table of registers and spills")
    args = parser.parse_args(argv)
    # Compile for real: no interpreter, every autotune config, a fresh cache, Triton's default fp fusion stated
    # (which silences a warning of triton 3.9).
    for name in ("TRITON_INTERPRET", "E2ESAE_AUTOTUNE"):
        os.environ.pop(name, None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        report = compile_everything(args.arch)
    failed = [v for v in report["variants"] if "error" in v]
    print(f"triton {report['triton']}: {len(report['variants']) - len(failed)} of {len(report['variants'])} "
          f"variants compiled for {', '.join(f'sm_{a}' for a in args.arch)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.table:
        print_table(report)


# ----------------------------------------------------------------------------------------------------------
# The tests


def compiled_within(kernels, roots):
    """roots and every @triton.jit function they call, directly or through one another; kernels: name -> calls."""
    covered, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in kernels and name not in covered:
            covered.add(name)
            todo += [other for other in kernels if other.split(".")[-1] in kernels[name]]
    return covered


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Every variant compiled for ARCHS, by this file run as a script."""
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("compile") / "report.json"
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--arch", *map(str, ARCHS), "--json", str(path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"the compile script failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return json.loads(path.read_text())


def test_every_kernel_has_launches(report):
    """A kernel without LAUNCHES would never be compiled here; helpers are covered by the kernels calling them."""
    covered = compiled_within(report["kernels"], LAUNCHES)
    missing = sorted(set(report["kernels"]) - covered)
    stale = sorted(set(LAUNCHES) - set(report["kernels"]))
    assert not missing, (f"kernels without launches in tests/test_compile.py's LAUNCHES: {missing}. Add a function "
                         "giving each launch's arguments at the paper's shapes, one dict per call its launcher makes.")
    assert not stale, f"LAUNCHES names kernels that sae_kernels/ no longer defines: {stale}"


@pytest.mark.parametrize("kernel", sorted(LAUNCHES))
def test_kernel_compiles_and_fits_on_the_gpu(report, kernel):
    """Every config x dtype x launch x arch compiles, within the multiprocessor's registers and shared memory."""
    variants = [v for v in report["variants"] if v["kernel"] == kernel]
    assert variants, f"{kernel}: nothing was compiled"
    problems = []
    for v in variants:
        where = f"{kernel} sm_{v['arch']} {v['dtype']} [{v['launch']}] {v['config']}"
        if "error" in v:
            problems.append(f"{where}: does not compile:\n{v['error']}")
        elif v["regs"] * v["threads"] > REGISTERS_PER_SM:
            problems.append(f"{where}: {v['regs']} registers x {v['threads']} threads > {REGISTERS_PER_SM}")
        elif v["shared"] > SHARED_PER_BLOCK[v["arch"]]:
            problems.append(f"{where}: {v['shared']} bytes of shared memory > {SHARED_PER_BLOCK[v['arch']]}")
    if problems:  # the first in full, then one line for each of the others
        others = "".join(f"\n  {problem.splitlines()[0]}" for problem in problems[1:])
        pytest.fail(f"{len(problems)} of {len(variants)} variants fail with triton {report['triton']}. The first: "
                    f"{problems[0]}" + (f"\nThe others:{others}" if others else ""), pytrace=False)


if __name__ == "__main__":
    main(sys.argv[1:])

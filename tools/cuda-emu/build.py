#!/usr/bin/env python3
"""Builds the emulated CUDA driver (libcuda.so.1) and cuBLAS (libcublas.so.13) into
target/cuda-emu/lib, when missing or when an input changed (a hash of kernels/*.cu, kernels/*.cuh,
tools/cuda-emu/* and the compiler's version).

Each kernels/<f>.cu becomes one object kern_<f>.o: the file itself, compiled as C++17 with
cuda_emu.h force-included and -fsanitize=thread instrumentation (whose hooks the run time
defines), followed by a registration of every `extern "C"` kernel it defines (name, function
pointer, parameter types through template deduction, __launch_bounds__). The kernel names and
bounds are read from the preprocessed file, so macro-generated kernels are found too.

    tools/cuda-emu/build.py [--force] [--quiet]    prints the library folder

Environment: DFPO_EMU_OUT (build folder, default target/cuda-emu), DFPO_EMU_KERNELS (kernels
folder, default kernels/), CXX (default g++).
"""
import hashlib
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
KERNELS = os.environ.get("DFPO_EMU_KERNELS") or os.path.join(ROOT, "kernels")
# DFPO_EMU_OUT: another build folder (mutate.py builds mutants there); DFPO_EMU_KERNELS: another
# kernels folder (a mutated copy).
OUT = os.environ.get("DFPO_EMU_OUT") or os.path.join(ROOT, "target", "cuda-emu")
LIB = os.path.join(OUT, "lib")
CXX = os.environ.get("CXX", "g++")

COMMON = ["-std=c++17", "-O2", "-g", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-pthread"]
KERNEL_FLAGS = COMMON + [
    "-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0",
    # one source access = one instrumented access: no vectorised or merged loads
    "-fno-tree-vectorize", "-fno-tree-slp-vectorize", "-fno-store-merging",
    "-DDFPO_EMU=1", "-include", os.path.join(HERE, "cuda_emu.h"),
    "-I", os.path.join(HERE, "include"), "-I", KERNELS, "-w",
]
RUNTIME_FLAGS = COMMON + ["-Wall", "-Wno-unused-function"]


def sh(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write("cuda-emu build failed: " + " ".join(cmd) + "\n" + r.stdout + r.stderr)
        sys.exit(1)
    return r.stdout


def inputs():
    files = []
    for d, exts in ((KERNELS, (".cu", ".cuh")), (HERE, (".cpp", ".h", ".ld", ".py")),
                    (os.path.join(HERE, "include"), (".h",))):
        for f in sorted(os.listdir(d)):
            if f.endswith(exts):
                files.append(os.path.join(d, f))
    return files


def digest():
    h = hashlib.sha256()
    for f in inputs():
        h.update(f.encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    h.update(sh([CXX, "--version"]).encode())
    return h.hexdigest()


def balanced(s, i):
    """s[i] == '(': returns the index after the matching ')'."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "(":
            depth += 1
        elif s[j] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError("unbalanced parentheses")


def split_top(s):
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def kernels_of(cu):
    """[(name, max_threads expression)] of the extern "C" kernels of a .cu file."""
    pre = sh([CXX, "-E", "-P", "-DEMU_SCAN"] + [f for f in KERNEL_FLAGS if f not in ("-g",)] + ["-x", "c++", cu])
    out = []
    for m in re.finditer(r'extern\s+"C"\s+void\s+', pre):
        i = m.end()
        bound = "1024"
        if pre.startswith("__launch_bounds__", i):
            j = pre.index("(", i)
            k = balanced(pre, j)
            bound = split_top(pre[j + 1:k - 1])[0]
            i = k
            while pre[i].isspace():
                i += 1
        n = re.match(r"(\w+)\s*\(", pre[i:])
        if not n or n.group(1).startswith("emu_"):
            continue
        out.append((n.group(1), bound))
    return out


def build(force=False, quiet=False):
    os.makedirs(LIB, exist_ok=True)
    gen = os.path.join(OUT, "gen")
    obj = os.path.join(OUT, "obj")
    os.makedirs(gen, exist_ok=True)
    os.makedirs(obj, exist_ok=True)
    stamp = os.path.join(OUT, "stamp")
    d = digest()
    libcuda = os.path.join(LIB, "libcuda.so.1")
    libblas = os.path.join(LIB, "libcublas.so.13")
    if not force and os.path.exists(stamp) and open(stamp).read() == d and os.path.exists(libcuda) \
            and os.path.exists(libblas):
        return LIB
    if not quiet:
        print("cuda-emu: building the emulated CUDA driver (kernels/*.cu as C++) ...", file=sys.stderr)
    cus = sorted(f for f in os.listdir(KERNELS) if f.endswith(".cu"))
    jobs = []
    for cu in cus:
        stem = cu[:-3]
        path = os.path.join(KERNELS, cu)
        ks = kernels_of(path)
        if not ks:
            continue
        tu = os.path.join(gen, f"kern_{stem}.cpp")
        with open(tu, "w") as fh:
            fh.write(f'#include "{path}"\n\nnamespace {{\nstruct EmuRegister {{\n    EmuRegister() {{\n')
            for name, bound in ks:
                fh.write(f'        emu_reg::reg("{name}", &{name}, (unsigned)({bound}), "{cu}");\n')
            fh.write("    }\n} emu_register_" + stem + ";\n}  // namespace\n")
        jobs.append([CXX] + KERNEL_FLAGS + ["-c", tu, "-o", os.path.join(obj, f"kern_{stem}.o")])
    for src in ("emu_runtime.cpp", "driver.cpp", "graph.cpp", "cublas.cpp"):
        jobs.append([CXX] + RUNTIME_FLAGS + ["-c", os.path.join(HERE, src),
                                            "-o", os.path.join(obj, src.replace(".cpp", ".o"))])
    # An object is recompiled only when its command, its source or a header changed.
    headers = b"".join(open(os.path.join(dd, f), "rb").read()
                       for dd in (KERNELS, HERE) for f in sorted(os.listdir(dd)) if f.endswith((".cuh", ".h")))

    def compile_one(cmd):
        src, out = cmd[cmd.index("-c") + 1], cmd[cmd.index("-o") + 1]
        h = hashlib.sha256(" ".join(cmd).encode() + open(src, "rb").read() + headers)
        if src.startswith(gen):
            h.update(open(os.path.join(KERNELS, os.path.basename(src)[5:-4] + ".cu"), "rb").read())
        key = out + ".hash"
        if os.path.exists(out) and os.path.exists(key) and open(key).read() == h.hexdigest():
            return
        sh(cmd)
        with open(key, "w") as fh:
            fh.write(h.hexdigest())

    workers = int(os.environ.get("CARGO_BUILD_JOBS", "2") or 2)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        list(ex.map(compile_one, jobs))
    kobjs = [os.path.join(obj, f"kern_{cu[:-3]}.o") for cu in cus if os.path.exists(os.path.join(obj, f"kern_{cu[:-3]}.o"))]
    sh([CXX, "-shared", "-pthread", "-o", libcuda, "-Wl,-soname,libcuda.so.1",
        os.path.join(obj, "emu_runtime.o"), os.path.join(obj, "driver.o"), os.path.join(obj, "graph.o")] + kobjs +
       ["-Wl,-T," + os.path.join(HERE, "emu.ld"), "-Wl,-z,defs"])
    sh([CXX, "-shared", "-pthread", "-o", libblas, "-Wl,-soname,libcublas.so.13",
        os.path.join(obj, "cublas.o"), "-L", LIB, "-l:libcuda.so.1", "-Wl,-rpath,$ORIGIN", "-Wl,-z,defs"])
    for link, target in (("libcuda.so", "libcuda.so.1"), ("libcublas.so", "libcublas.so.13")):
        p = os.path.join(LIB, link)
        if os.path.lexists(p):
            os.remove(p)
        os.symlink(target, p)
    with open(stamp, "w") as fh:
        fh.write(d)
    return LIB


if __name__ == "__main__":
    print(build(force="--force" in sys.argv, quiet="--quiet" in sys.argv))

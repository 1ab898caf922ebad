"""Compile every Triton launch the backend makes for a GPU (sm_90), without a GPU.

Triton's interpreter (how ``test_triton.py`` runs the kernels) accepts programs the compiler
refuses (a loop-carried variable that changes dtype, a scalar argument specialized to the
constant 1 and then used as a tensor), so this script runs the backend's four calls on CPU
tensors with ``_launch`` replaced by a recorder, then compiles each recorded launch to PTX and
a cubin for ``GPUTarget("cuda", 90, 32)`` with the specializations Triton's own launcher
computes for those arguments (its binder for that target: argument types, an int equal to 1
made a constant unless ``do_not_specialize``, and the alignment attributes,
``tt.divisibility = 16`` for pointers and ints divisible by 16). Needs triton (its bundled
ptxas), not a GPU; ``TRITON_INTERPRET`` must be unset.

    PYTHONPATH=src python tests/triton_compile_check.py      # prints one line per compile
"""

from __future__ import annotations

import os
import sys
import time

import torch


def record_launches() -> list[tuple[object, dict[str, object]]]:
    """Run the backend's passes on small CPU tensors, recording (kernel, {param: value})."""
    import syncbn.backends.triton as bt

    seen: list[tuple[object, dict[str, object]]] = []

    def record(kernel, grid, *args, **constexprs):
        values = dict(zip(kernel.arg_names, args))
        values.update(constexprs)
        seen.append((kernel, values))

    def geo(x: torch.Tensor) -> tuple:  # bt.applies without its device check
        flat = bt._flat_strides(x)
        return x.shape[1], x.shape[0] * flat[0], flat[0], flat

    bt._launch = record
    fields = [1, 2, 3, 4, 5, 0]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        param = torch.float64 if dtype == torch.float64 else torch.float32
        for shape, layout, full, policy in (((3, 4, 5, 6), torch.contiguous_format, True, 1),
                                            ((3, 4, 5, 6), torch.channels_last, False, 2),
                                            ((1, 4), torch.contiguous_format, True, 0)):
            x = torch.randn(shape, dtype=dtype).contiguous(memory_format=layout)
            c = shape[1]
            w = torch.ones(c, dtype=param) if full else None
            rm = torch.zeros(c, dtype=param) if full else None
            buf = torch.zeros(2 * 64 + 1 + 12 + 2, dtype=torch.float64)
            status = torch.zeros(1, dtype=torch.int32)
            bt.forward_reduce(geo(x), x, buf, fields)
            _, stats, _ = bt.forward_apply(geo(x), x, buf, 2, fields, w, w, rm, rm, 1e-5, 0.1, policy,
                                           status)
            gdt = param if full else None
            bt.backward_reduce(geo(x), x, x, stats, buf if full else None, fields, gdt, gdt)
            bt.backward_apply(geo(x), x, x, stats, w, buf, 1, fields, status)
    return seen


def specialize(kernel, values: dict[str, object], backend) -> tuple:
    """What Triton's launcher compiles for these arguments on ``backend``'s target: its binder
    and argument packing (types, constants, alignment attributes), as in ``JITFunction.run``."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [values[p.name] for p in kernel.params if not p.is_constexpr]
    constexprs = {p.name: values[p.name] for p in kernel.params if p.is_constexpr}
    bound, specialization, options = binder(*args, **constexprs, enable_fp_fusion=True)
    return kernel._pack_args(backend, {**constexprs, "enable_fp_fusion": True}, bound,
                             specialization, options)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET"):
        print("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    done: set[str] = set()
    aligned = 0
    for kernel, values in record_launches():
        options, types, consts, attrs = specialize(kernel, values, backend)
        key = f"{kernel.__name__} {sorted(types.items())} {sorted(consts.items(), key=str)} {attrs}"
        if key in done:
            continue
        done.add(key)
        here = sum(1 for a in attrs.values() if ["tt.divisibility", 16] in a)
        aligned += here
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(kernel, types, consts, attrs), target=target,
                                  options=options.__dict__)
        pointers = ",".join(t[1:] for n, t in types.items() if t.startswith("*"))
        print(f"{kernel.__name__:9s} ok {time.perf_counter() - start:4.1f} s  "
              f"cubin {len(compiled.asm['cubin']):6d} B  [{pointers}] {here} aligned "
              f"{ {k: v for k, v in consts.items() if not str(k).startswith('BLOCK')} }",
              flush=True)
    if not aligned:
        print("no argument was specialized as aligned: the check no longer mirrors a launch")
        return 1
    print(f"{len(done)} distinct launches compiled for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())

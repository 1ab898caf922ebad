"""Compile every Triton launch the backend makes for a GPU (sm_90), without a GPU.

Triton's interpreter (how ``test_triton.py`` runs the kernels) accepts programs the compiler
refuses (a loop-carried variable that changes dtype, a scalar argument specialized to the
constant 1 and then used as a tensor), so this script runs the backend's four calls on CPU
tensors with ``_launch`` replaced by a recorder, then compiles each recorded launch to PTX and
a cubin for ``GPUTarget("cuda", 90, 32)`` with the same argument types and the integer
specialization Triton applies at launch (an int equal to 1 becomes a constant unless the kernel
says ``do_not_specialize``). Needs triton (its bundled ptxas), not a GPU; ``TRITON_INTERPRET``
must be unset.

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
            bt.forward_reduce(x, buf, fields)
            _, stats, _ = bt.forward_apply(x, buf, 2, fields, w, w, rm, rm, 1e-5, 0.1, policy,
                                           status)
            gdt = param if full else None
            bt.backward_reduce(x, x, stats, buf if full else None, fields, gdt, gdt)
            bt.backward_apply(x, x, stats, w, buf, 1, fields, status)
    return seen


def signature(kernel, values: dict[str, object]) -> tuple[dict[str, str], dict[str, object]]:
    """Triton's launch-time view of the arguments: pointer/scalar types and constants."""
    from triton.runtime.jit import mangle_type

    types: dict[str, str] = {}
    consts: dict[str, object] = {}
    for p in kernel.params:
        value = values[p.name]
        if p.is_constexpr:
            consts[p.name] = value
        elif isinstance(value, torch.Tensor):
            types[p.name] = "*" + mangle_type(value)[1:].lstrip("k")
        elif p.annotation_type:
            types[p.name] = p.annotation_type
        elif isinstance(value, int) and value == 1 and not p.do_not_specialize:
            consts[p.name] = 1  # Triton turns an int argument equal to 1 into a constant
        else:
            types[p.name] = mangle_type(value)
    for name in consts:
        types[name] = "constexpr"
    return types, consts


def main() -> int:
    if os.environ.get("TRITON_INTERPRET"):
        print("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    done: set[str] = set()
    for kernel, values in record_launches():
        types, consts = signature(kernel, values)
        key = f"{kernel.__name__} {sorted(types.items())} {sorted(consts.items(), key=str)}"
        if key in done:
            continue
        done.add(key)
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(kernel, types, consts), target=target,
                                  options={"enable_fp_fusion": True})
        pointers = ",".join(t[1:] for n, t in types.items() if t.startswith("*"))
        print(f"{kernel.__name__:9s} ok {time.perf_counter() - start:4.1f} s  "
              f"cubin {len(compiled.asm['cubin']):6d} B  [{pointers}] "
              f"{ {k: v for k, v in consts.items() if not k.startswith('BLOCK')} }", flush=True)
    print(f"{len(done)} distinct launches compiled for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())

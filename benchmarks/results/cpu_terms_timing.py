"""Before/after timing of the CPU backend's primitives (benchmarks/results/cpu_terms.md).

Calls the backend object directly (no autograd layer), one thread, median (and min) of --repeats,
wall time and process CPU time (the latter robust to other processes preempting this one on a shared
machine):
  per-token: forward + backward;  scalar: forward_with_grad (gradients in the forward).
'classic' is the call of backend contract v1 (coefficients c only); 'zloss+smooth' (contract v2
only) adds the lse and dot terms: coef [3, N] = (c, b, g), dot = ones(V).
Usage: python benchmarks/results/cpu_terms_timing.py [--dtype fp32|bf16] [--repeats K]
"""
import argparse
import inspect
import statistics
import time

import torch

from fused_objectives.backends import resolve_backend
from fused_objectives.options import LogitOptions


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--V", type=int, default=8192)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(a.N, a.H, generator=g).to(dt)
    w = (torch.randn(a.V, a.H, generator=g) / a.H ** 0.5).to(dt)
    t = torch.randint(0, a.V, (a.N,), generator=g)
    valid = torch.ones(a.N, dtype=torch.bool)
    opts = LogitOptions()
    be = resolve_backend("cpu", torch.device("cpu"))
    v2 = "dot" in inspect.signature(be.forward).parameters
    needs = (True, True, False)
    ones = torch.ones(a.V)

    def per_token(terms):
        if terms:
            out = be.forward(h, w, None, t, valid, opts, dot=ones)
            coef = torch.stack([-torch.ones(a.N), 2e-4 * out[3][0], -torch.full((a.N,), 0.1 / a.V)])
            be.backward(h, w, None, t, out[1], coef, opts, needs, dot=ones)
        else:
            out = be.forward(h, w, None, t, valid, opts)
            be.backward(h, w, None, t, out[1], -torch.ones(a.N), opts, needs)

    def scalar(terms):
        if terms:
            def fn(lp, lse, dotz, tt, v):
                c = torch.stack([-torch.ones_like(lp), 2e-4 * lse, torch.full_like(lp, -0.1 / a.V)])
                return (-lp).sum() + (1e-4 * lse * lse).sum() - (0.1 / a.V) * dotz.sum(), v, c
            be.forward_with_grad(h, w, None, t, valid, opts, fn, needs, dot=ones)
        elif v2:
            be.forward_with_grad(h, w, None, t, valid, opts, lambda lp, lse, dz, tt, v: ((-lp).sum(), v, -torch.ones_like(lp)),
                                 needs)
        else:
            be.forward_with_grad(h, w, None, t, valid, opts, lambda lp, v: ((-lp).sum(), v, -torch.ones_like(lp)), needs)

    cases = [("per-token classic", lambda: per_token(False)), ("scalar classic", lambda: scalar(False))]
    if v2:
        cases += [("per-token zloss+smooth", lambda: per_token(True)), ("scalar zloss+smooth", lambda: scalar(True))]
    print(f"N={a.N} H={a.H} V={a.V} {a.dtype} threads=1 contract={'v2' if v2 else 'v1'}")
    for name, fn in cases:
        fn()
        ts, cs = [], []
        for _ in range(a.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            ts.append(time.perf_counter() - t0)
            cs.append(time.process_time() - c0)
        print(f"  {name:24s} wall {1e3 * statistics.median(ts):7.1f} ms (min {1e3 * min(ts):6.1f})   "
              f"process CPU {1e3 * statistics.median(cs):7.1f} ms (min {1e3 * min(cs):6.1f})")


if __name__ == "__main__":
    main()

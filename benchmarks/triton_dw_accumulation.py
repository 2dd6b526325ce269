"""dW accumulation dtype for the token-chunked CUDA path (backends/triton_chunked.py): measured on CPU.

The chunked path adds one ``dz_chunk^T @ X_chunk`` GEMM per token chunk into dW.  For a bf16 weight
the sum can live in an fp32 buffer (``V * H * 4`` bytes extra: 2.1 GB at the llama3-8b head) or in
the bf16 gradient itself (each chunk's GEMM accumulates in fp32 and rounds once when it adds into
bf16: one extra rounding per chunk).  This script measures both against float64, next to eager
PyTorch (one bf16 GEMM over all tokens, i.e. one rounding), with torch's bf16 GEMMs on CPU (fp32
accumulation, like cuBLAS).  Usage: ``python benchmarks/triton_dw_accumulation.py [--chunks 1 4 8 16 64]``.
"""
import argparse

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    a = ap.parse_args()
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    g = torch.Generator().manual_seed(0)
    N, H, V = a.tokens, a.hidden, a.vocab
    x = torch.randn(N, H, generator=g).to(dt)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dt)
    y = torch.randint(0, V, (N,), generator=g)
    # SFT-like: push each token toward its target so p spans (0, 1)
    x = (x.double() + 4 * torch.rand(N, 1, generator=g, dtype=torch.float64) * w.double()[y] * H**0.5).to(dt)
    z = x.double() @ w.double().T
    p = torch.softmax(z, -1)
    dz64 = -p
    dz64[torch.arange(N), y] += 1.0
    dz64 /= N  # mean reduction
    truth = dz64.T @ x.double()
    dz = dz64.to(dt)  # the gradient as the chunked path writes it (input dtype)
    tn = truth.norm().item()
    eager = (dz.T @ x).double()
    print(f"N={N} H={H} V={V} {a.dtype}; normwise relative error of dW against float64 "
          f"(max-abs relative in brackets)")
    rel = lambda d: f"{(d - truth).norm().item() / tn:.3e} [{(d - truth).abs().max().item() / truth.abs().max().item():.3e}]"
    print(f"eager (one GEMM)           : {rel(eager)}")
    for k in a.chunks:
        rows = (N + k - 1) // k
        dw_lp = torch.zeros(V, H, dtype=dt)
        dw32 = torch.zeros(V, H, dtype=torch.float32)
        for s in range(0, N, rows):
            dw_lp.addmm_(dz[s:s + rows].T, x[s:s + rows])
            dw32.addmm_(dz[s:s + rows].T.float(), x[s:s + rows].float())
        print(f"{k:3d} chunks: in-place {a.dtype}: {rel(dw_lp.double())}   fp32 buffer -> {a.dtype}: {rel(dw32.to(dt).double())}")


if __name__ == "__main__":
    main()

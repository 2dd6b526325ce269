"""Quickstart: the README's before/after, runnable on CPU or GPU.

Computes NLL the unfused way (full logits + F.cross_entropy) and the fused way, checks they agree,
then trains a toy LM head with a probability-based objective of arXiv 2510.00526.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

import fused_objectives as fo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--objective", default="neg_p")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    N, H, V = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(N, H, device=device, requires_grad=True)
    W = (torch.randn(V, H, device=device) / H**0.5).requires_grad_()
    y = torch.randint(0, V, (N,), device=device)
    y[: N // 4] = -100  # a prompt: ignored tokens

    # before: the [N, V] logits exist in memory
    before = F.cross_entropy(hidden @ W.T, y)
    # after: fused, same number for objective="nll"
    after = fo.linear_objective_loss(hidden, W, y, objective="nll")
    print(f"device {device}, backend auto; NLL unfused {before.item():.6f}, fused {after.item():.6f}")
    if not torch.allclose(before, after, rtol=1e-4, atol=1e-5):
        raise SystemExit("fused NLL disagrees with F.cross_entropy")

    # train a toy LM head on a fixed hidden state with a probability-based objective
    x = hidden.detach()
    head = W.detach().clone().requires_grad_()
    opt = torch.optim.AdamW([head], lr=5e-2)
    for step in range(args.steps):
        loss, stats = fo.linear_objective_loss(x, head, y, objective=args.objective, return_stats=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:3d}  {args.objective} loss {loss.item():.4f}  "
                  f"mean p {stats.mean_p.item():.4f}  accuracy {stats.accuracy.item():.3f}")


if __name__ == "__main__":
    # bad arguments or data: one line, no traceback
    try:
        main()
    except (ValueError, TypeError, OSError, fo.integrations.hf.UnsupportedModelError) as exc:
        raise SystemExit(f"{sys.argv[0]}: error: {exc}") from None

"""Register your own objective and train with it: a focal-style weight on -log p.

Every objective here is a per-token function of the target log-probability ``l = log p``; the fused
kernels only need its derivative, which autograd takes from your function.  So a new objective is
one ``fo.register_objective`` call, after which its name works everywhere a spec string does
(``fo.linear_objective_loss``, ``fo.LinearObjectiveLoss``, ``fo.patch_model``, ``examples/sft.py``).

Focal loss (Lin et al., 2017) down-weights tokens the model already predicts well:
``loss = -(1 - p)^gamma * log p``; gamma = 0 is NLL.  Registered with a parameter, it is used as
``"focal:2"``.  The script checks that the fused loss and gradients equal the same objective on
materialised logits, then trains a tiny language model with it (and with ``--compare`` objectives).

    python examples/custom_objective.py                       # focal:2 against nll
    python examples/custom_objective.py --steps 300 --compare nll neg_p
"""
import argparse
import sys
import time

import torch

import fused_objectives as fo


def focal(logp: torch.Tensor, gamma: float) -> torch.Tensor:
    """-(1 - p)^gamma * log p, from l = log p (float32); differentiable torch ops only."""
    return -(1.0 - logp.exp()).clamp(min=0.0) ** gamma * logp


def register():
    fo.register_objective("focal", focal, takes_param=True, overwrite=True,
                          formula="loss -(1 - p)^gamma log p (focal); gamma = 0 is nll")


def check_against_full_logits(objective: str, seed: int = 0) -> float:
    """The fused objective equals the same function applied to log_softmax of full logits (float64)."""
    torch.manual_seed(seed)
    N, H, V = 37, 24, 101
    x = torch.randn(N, H, dtype=torch.float64)
    W = torch.randn(V, H, dtype=torch.float64) / H**0.5
    y = torch.randint(0, V, (N,))
    y[:5] = -100
    spec = fo.get_objective(objective)

    xs, Ws = x.clone().requires_grad_(), W.clone().requires_grad_()
    logp = torch.log_softmax(xs @ Ws.T, dim=-1).gather(-1, y.clamp(min=0)[:, None])[:, 0]
    valid = y != -100
    full = spec.per_token(logp, valid)[0].sum() / valid.sum()
    full.backward()

    xf, Wf = x.float().requires_grad_(), W.float().requires_grad_()
    fused = fo.linear_objective_loss(xf, Wf, y, objective=objective)
    fused.backward()
    err = max(float((fused.detach().double() - full.detach()).abs()),
              float((xf.grad.double() - xs.grad).abs().max()),
              float((Wf.grad.double() - Ws.grad).abs().max()))
    if err > 1e-4:
        raise SystemExit(f"{objective}: fused and full-logits results differ by {err:.3g}")
    return err


class TinyLM(torch.nn.Module):
    """Embedding -> two residual MLP blocks -> hidden states; the LM head weight is read by the loss."""

    def __init__(self, vocab: int, hidden: int, context: int = 2):
        super().__init__()
        self.context = context
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mix = torch.nn.Linear(context * hidden, hidden)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, 2 * hidden),
                                                              torch.nn.GELU(), torch.nn.Linear(2 * hidden, hidden))
                                          for _ in range(2))
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed(ids)  # [B, T, H]
        # each position sees itself and the previous context-1 tokens (causal)
        shifted = [torch.nn.functional.pad(e, (0, 0, k, 0))[:, : e.shape[1]] for k in range(self.context)]
        h = self.mix(torch.cat(shifted, dim=-1))
        for block in self.blocks:
            h = h + block(h)
        return h


def make_data(vocab: int, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences where token t+1 = (token t + token t-1) mod vocab: learnable, not trivial."""
    ids = torch.empty(batch, seq, dtype=torch.long)
    ids[:, :2] = torch.randint(0, vocab, (batch, 2), generator=generator)
    for t in range(2, seq):
        ids[:, t] = (ids[:, t - 1] + ids[:, t - 2]) % vocab
    return ids


def train(objective: str, args) -> dict:
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = TinyLM(args.vocab, args.hidden).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        ids = make_data(args.vocab, args.batch, args.seq, gen).to(device)
        labels = ids.clone()
        labels[:, :2] = -100  # the first two tokens cannot be predicted: like a prompt
        hidden = model(ids)
        loss, stats = fo.linear_objective_loss(hidden, model.lm_head.weight, labels, objective=objective,
                                               shift=True, return_stats=True)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"  [{objective:>8}] step {step:4d}  loss {loss.item():.4f}  mean p {stats.mean_p.item():.3f}  "
                  f"accuracy {stats.accuracy.item():.3f}")
    # held-out evaluation with the same metric for every objective
    with torch.no_grad():
        ids = make_data(args.vocab, 64, args.seq, torch.Generator().manual_seed(10_000 + args.seed)).to(device)
        labels = ids.clone()
        labels[:, :2] = -100
        _, stats = fo.linear_objective_loss(model(ids), model.lm_head.weight, labels, shift=True, return_stats=True)
    return {"objective": objective, "eval_mean_p": stats.mean_p.item(), "eval_accuracy": stats.accuracy.item(),
            "seconds": time.perf_counter() - start}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objective", default="focal:2", help="objective to train with (default focal:2)")
    parser.add_argument("--compare", nargs="*", default=["nll"], help="also train with these (default nll)")
    parser.add_argument("--vocab", type=int, default=97)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    register()
    print(f"registered: {fo.get_objective(args.objective)!r}")
    err = check_against_full_logits(args.objective)
    print(f"fused == full-logits PyTorch for {args.objective} (loss and gradients, max |diff| {err:.2e})")
    results = [train(obj, args) for obj in [args.objective] + [c for c in args.compare if c != args.objective]]
    print(f"\n{'objective':>10} | {'held-out mean p':>15} | {'held-out accuracy':>17} | {'seconds':>7}")
    for r in results:
        print(f"{r['objective']:>10} | {r['eval_mean_p']:15.3f} | {r['eval_accuracy']:17.3f} | {r['seconds']:7.1f}")
    return results


if __name__ == "__main__":
    # bad arguments or data: one line, no traceback
    try:
        main()
    except (ValueError, TypeError, OSError, fo.integrations.hf.UnsupportedModelError) as exc:
        raise SystemExit(f"{sys.argv[0]}: error: {exc}") from None

"""The same tiny SFT run under a distributed engine, checked against a single-process run.

A tiny Llama (built locally, nothing downloaded) is patched with `fo.patch_model` and trained for a
few steps on one fixed synthetic SFT batch (prompt tokens masked with -100, right padding) under one
engine; every step's global loss is printed next to the same step of a single-process run of the
unpatched, unsharded model (its logits materialised, the objective applied to their log-softmax), and
the script exits with status 1 if any step differs by more than --rtol.  Each rank also checks that
the engine called the patched forward (a patched training call returns `logits=None`) and fails if
not; the default objective, power:0.5, is one whose loss an unpatched model (NLL from the labels)
would not reproduce.

    # 2 gloo ranks on this machine's CPU (the script re-runs itself under torchrun)
    python examples/distributed.py --engine ddp --nproc 2
    python examples/distributed.py --engine fsdp2 --nproc 2
    python examples/distributed.py --engine zero3 --nproc 2     # pip install deepspeed
    python examples/distributed.py --engine tp --nproc 2
    # or under torchrun yourself (CUDA ranks with NCCL when there is a GPU per rank)
    torchrun --nproc-per-node 2 examples/distributed.py --engine fsdp2

Engines: `ddp` (DistributedDataParallel), `fsdp2` (`fully_shard` on every decoder layer, the LM head
and the root), `zero3` (DeepSpeed ZeRO-3, every parameter partitioned; `DS_ACCELERATOR=cpu` on a
machine without a GPU) and `tp` (tensor parallelism on the LM head: torchtitan's layout,
`ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)`, each rank holds a slice of the
vocabulary and the fused loss combines the slices' statistics; the rest of the model replicated).
With ddp, fsdp2 and zero3 each rank trains on its share of the batch's rows, its loss is the sum over
its tokens divided by the global count of scored tokens (`num_items_in_batch`), and the engine
averages the gradients over the ranks; with tp every rank sees the whole batch.  Plain SGD: Adam would hide a gradient that is off by a
constant factor (its update is invariant to the gradient's scale), SGD shows it in the next loss.
"""
import argparse
import os
import subprocess
import sys

import torch

ENGINES = ("ddp", "fsdp2", "zero3", "tp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=ENGINES, required=True)
    p.add_argument("--nproc", type=int, default=None,
                   help="start this many ranks on this machine (torchrun --standalone); without it, run as one "
                        "rank of a torchrun launch")
    p.add_argument("--objective", default="power:0.5",
                   help="fused objective (default: power:0.5, whose loss an unpatched model, which computes NLL from "
                        "the labels, cannot reproduce; its gradient is sqrt(p) times NLL's, and -p's is p times, "
                        "~1/vocab on a random model, so a few steps of neg_p barely move its loss)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.5, help="SGD step size")
    p.add_argument("--rows", type=int, default=4, help="rows of the global batch (a multiple of the ranks)")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--rtol", type=float, default=1e-5,
                   help="largest relative difference of a step's loss from the single-process run")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even where CUDA is available")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rows < 1 or args.seq < 4:
        p.error("--steps and --rows must be >= 1 and --seq >= 4")
    if args.nproc is not None and args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    return args


# ----------------------------------------------------------------------------- model and data
def build_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=args.hidden // 4, vocab_size=args.vocab, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def batch(args):
    """The global batch: input ids, attention mask, labels (prompt and padding -100)."""
    g = torch.Generator().manual_seed(1000)
    ids = torch.randint(3, args.vocab, (args.rows, args.seq), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for r in range(args.rows):
        prompt = int(torch.randint(2, args.seq // 2, (), generator=g))
        labels[r, :prompt] = -100
        if r % 2 == 1:  # right padding on every other row
            pad = int(torch.randint(1, args.seq // 4 + 1, (), generator=g))
            ids[r, -pad:] = 0
            mask[r, -pad:] = 0
            labels[r, -pad:] = -100
    return ids, mask, labels


def scored_tokens(labels):
    return int((labels[:, 1:] != -100).sum())


# ----------------------------------------------------------------------------- the single-process run
def single_process_losses(args):
    """The unpatched, unsharded model on the whole batch, with the objective computed from its logits."""
    import fused_objectives as fo

    objective = fo.get_objective(args.objective)
    model = build_model(args)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        ids, mask, labels = batch(args)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        valid = target != -100
        logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        per_token, _ = objective.per_token(logp.reshape(-1), valid.reshape(-1))  # 0 where not kept
        loss = per_token.sum() / scored_tokens(labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- one rank
def _setup(args):
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and not args.cpu
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    if args.engine == "zero3" and not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def _wrap(args, model, device, world):
    """The engine around the patched model: (module to call, backward(loss), step(), zero_grad())."""
    model.to(device)
    if args.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        return ddp, lambda loss: (loss * world).backward(), opt.step, opt.zero_grad
    if args.engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        return model, lambda loss: (loss * world).backward(), opt.step, opt.zero_grad
    if args.engine == "tp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = init_device_mesh(device.type, (world,))
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        return model, lambda loss: loss.backward(), opt.step, opt.zero_grad
    import deepspeed

    # every parameter partitioned (the default keeps those under 1e5 elements whole), no clipping (the
    # default clips the gradient norm at 1.0, which a plain torch loop does not)
    config = {"train_micro_batch_size_per_gpu": args.rows // world, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=args.lr),
                                      config=config)
    return engine, lambda loss: engine.backward(loss * world), engine.step, lambda: None


def train(args, device, rank, world):
    """Train on this rank; returns the global loss of every step (on every rank)."""
    import torch.distributed as dist

    import fused_objectives as fo

    data_parallel = args.engine != "tp"
    if data_parallel and args.rows % world:
        raise ValueError(f"--rows {args.rows} is not a multiple of the {world} ranks")
    model = build_model(args)
    fo.patch_model(model, objective=args.objective)
    module, backward, step, zero_grad = _wrap(args, model, device, world)
    mine = slice(rank * args.rows // world, (rank + 1) * args.rows // world) if data_parallel else slice(None)
    ids, mask, labels = batch(args)
    losses = []
    for _ in range(args.steps):
        zero_grad()
        out = module(input_ids=ids[mine].to(device), attention_mask=mask[mine].to(device),
                     labels=labels[mine].to(device), num_items_in_batch=scored_tokens(labels))
        if out.logits is not None:  # the patched training call returns no [tokens, vocab] logits
            raise RuntimeError(f"engine {args.engine}: the model returned logits, so its forward was not the "
                               "patched one (the engine bypassed fo.patch_model)")
        loss = out.loss
        backward(loss)  # data parallel: the engines average the ranks' gradients, backward scales by `world`
        step()
        total = loss.detach().float().clone()
        if data_parallel:  # the ranks' shares of the global loss
            dist.all_reduce(total)
        losses.append(total.item())
    return losses


def run_rank(args):
    """One rank: set up, train, tear down; returns (losses, world size, device)."""
    import gc

    import torch.distributed as dist

    device = _setup(args)
    try:
        world = dist.get_world_size()
        losses = train(args, device, dist.get_rank(), world)
        # the engine's objects hold the process group: free them first, so that the group is really
        # destroyed below and not at interpreter exit (where gloo's worker threads can abort the process)
        gc.collect()
        dist.barrier()  # no rank tears the group down while another is still in a collective
        return losses, world, device
    finally:
        if args.engine == "zero3":  # DeepSpeed keeps references to its groups, which its destroy releases
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()
        else:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- report
def report(args, losses, world, device):
    """Prints each step's loss against the single-process run's; returns the number of mismatches."""
    want = single_process_losses(args)
    print(f"engine {args.engine}: {world} ranks ({device.type}), objective {args.objective}, {args.steps} SGD steps")
    bad = 0
    for s, (got, ref) in enumerate(zip(losses, want)):
        rel = abs(got - ref) / max(abs(ref), 1e-12)
        ok = rel <= args.rtol
        bad += not ok
        print(f"step {s:3d}  loss {got:.6f}  single process {ref:.6f}  rel diff {rel:.1e}"
              f"{'' if ok else '  MISMATCH'}")
    if bad:
        print(f"MISMATCH: {bad} of {args.steps} steps differ from the single-process run by more than rtol {args.rtol}")
    else:
        print(f"OK: every step's loss equals the single-process run's within rtol {args.rtol}")
    return bad


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.nproc is not None and "RANK" not in os.environ:
        # start the ranks: this script again, under torchrun, on a free local port
        rest = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")
                and not a.startswith("--nproc=")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               os.path.abspath(__file__), *rest]
        return subprocess.call(cmd)
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun (torchrun --nproc-per-node 2 examples/distributed.py --engine ddp) "
                         "or pass --nproc N")
    losses, world, device = run_rank(args)
    if int(os.environ["RANK"]) == 0:
        return 1 if report(args, losses, world, device) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

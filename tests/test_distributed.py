"""Real distributed engines, 2 gloo ranks on CPU, around a patched tiny Llama (``fo.patch_model``).

Each engine trains one step on its rank's half of a fixed global batch (the loss on a rank is its
tokens' sum over the global valid-token count, ``num_items_in_batch``) and the test compares, in the
parent process, the global loss, every parameter's full gradient and (where the engine steps) every
updated parameter with the same step of the unsharded, unpatched model in float64 on the whole
batch, its objective computed from its logits by the test's own truth (``tests/truth.py``).

The engines: DDP; FSDP2 ``fully_shard`` on every decoder layer, the head and the root; DeepSpeed
ZeRO-3 (``DS_ACCELERATOR=cpu``), the raw engine and ``transformers.Trainer`` with a ZeRO-3 config.
The tests check that the sharding really happened (the head's weight is a ``Shard(0)`` DTensor, or
ZeRO-3's empty placeholder outside the head's call), so a setup that silently fell back to
replicated weights cannot pass.

Every case also checks that the engine ran the patched forward: each rank counts the calls into the
fused loss (``linear_objective_loss`` as the patched training call sees it) and asserts the model
returned ``logits=None``; and the objectives are not NLL (``neg_p``, ``power:0.5``), whose values an
unpatched model (which computes NLL from ``labels``) cannot reproduce.
"""
import datetime
import faulthandler
import gc
import importlib.util
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import truth  # noqa: E402  (tests/truth.py: float64 objectives from their definitions)

WORLD = 2
VOCAB = 64
ROWS, SEQ = 4, 8  # the global batch: each rank takes ROWS // WORLD rows
LR = 0.5


def _tiny(tied=False):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=VOCAB,
                               tie_word_embeddings=tied)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (ROWS, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    labels[1, 5] = -100
    labels[2, 6:] = -100
    return ids, labels


def _n_items(labels):
    return int((labels[:, 1:] != -100).sum())


def _truth(objective, steps=1, tied=False):
    """The unsharded, unpatched model in float64 on the whole batch, trained with SGD (step size LR):
    the loss before each step, the first step's gradients, and the parameters after the last step."""
    ref = _tiny(tied).double()
    ids, labels = _batch()
    target = truth.shifted(labels, -100)
    valid = target != -100
    losses = []
    for step in range(steps):
        ref.zero_grad(set_to_none=True)
        logits = ref(input_ids=ids).logits
        lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        per, _ = truth.per_token(objective, lp.reshape(-1), valid.reshape(-1))
        loss = per.sum() / _n_items(labels)
        loss.backward()
        losses.append(loss.detach())
        if step == 0:
            grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        with torch.no_grad():
            for p in ref.parameters():
                p -= LR * p.grad
    params = {n: p.detach().clone() for n, p in ref.named_parameters()}
    return {"loss": losses[0], "losses": torch.stack(losses), "grads": grads, "params": params}


# --- the ranks ---------------------------------------------------------------------------------

def _local_batch(rank):
    ids, labels = _batch()
    mine = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
    return ids[mine], labels[mine], _n_items(labels)


def _count_fused_calls():
    """Wraps the fused loss where the patched training call looks it up; returns the call counter."""
    from fused_objectives.integrations.hf import training_call

    calls = [0]
    inner = training_call.linear_objective_loss

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    training_call.linear_objective_loss = counted  # this rank's process only
    return calls


def _assert_patched_call(out, calls, want):
    """The engine's forward went through the patch: ``want`` fused loss calls so far, no [N, V] logits."""
    assert out.logits is None, "the engine's forward returned logits: the patched training call did not run"
    assert calls[0] == want, f"{calls[0]} fused loss calls, want {want}"


def _global_loss(loss):
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total


def _case_ddp(rank, objective):
    from torch.nn.parallel import DistributedDataParallel

    import fused_objectives as fo

    m = _tiny()
    fo.patch_model(m, objective=objective)
    ddp = DistributedDataParallel(m)
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    calls = _count_fused_calls()
    ids, labels, n = _local_batch(rank)
    out = ddp(input_ids=ids, labels=labels, num_items_in_batch=n)
    _assert_patched_call(out, calls, 1)
    loss = out.loss
    (loss * WORLD).backward()  # DDP averages the ranks' gradients
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    opt.step()
    return {"loss": _global_loss(loss), "grads": grads, "fused_calls": calls[0],
            "params": {k: p.detach().clone() for k, p in m.named_parameters()}}


def _case_fsdp2(rank, objective, tied=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    import fused_objectives as fo

    m = _tiny(tied)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh)
    if not tied:  # a head tied to the embedding stays in the root's unit, which gathers it for the forward
        fully_shard(m.lm_head, mesh=mesh)
    fully_shard(m, mesh=mesh)
    w = m.lm_head.weight
    assert isinstance(w, DTensor) and w.placements == (Shard(0),) and w.to_local().shape[0] == VOCAB // WORLD
    assert (w is m.model.embed_tokens.weight) == tied
    fo.patch_model(m, objective=objective)
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    calls = _count_fused_calls()
    ids, labels, n = _local_batch(rank)
    out = m(input_ids=ids, labels=labels, num_items_in_batch=n)
    _assert_patched_call(out, calls, 1)
    loss = out.loss
    (loss * WORLD).backward()  # FSDP averages the ranks' gradients
    grads = {k: p.grad.full_tensor() for k, p in m.named_parameters()}
    opt.step()
    return {"loss": _global_loss(loss), "grads": grads, "fused_calls": calls[0],
            "params": {k: p.full_tensor().detach() for k, p in m.named_parameters()}}


def _ds_config(**extra):
    # every parameter partitioned (the default keeps parameters under 1e5 elements whole: all of a
    # tiny model), plain fp32, the client's torch optimizer, no clipping (DeepSpeed's default clips
    # the gradient norm at 1.0)
    return {"train_micro_batch_size_per_gpu": ROWS // WORLD, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False,
            **extra}


def _case_zero3(rank, objective):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    import fused_objectives as fo

    m = _tiny()
    fo.patch_model(m, objective=objective)
    engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=LR),
                                      config=_ds_config())
    w = m.lm_head.weight
    assert w.numel() == 0 and w.ds_tensor.numel() == VOCAB * 32 // WORLD  # partitioned outside its call
    calls = _count_fused_calls()
    ids, labels, n = _local_batch(rank)
    out = engine(input_ids=ids, labels=labels, num_items_in_batch=n)
    _assert_patched_call(out, calls, 1)
    loss = out.loss
    engine.backward(loss * WORLD)  # ZeRO averages the ranks' gradients
    grads = {k: safe_get_full_grad(p).clone() for k, p in m.named_parameters()}
    engine.step()
    with deepspeed.zero.GatheredParameters(list(m.parameters())):
        params = {k: p.detach().clone() for k, p in m.named_parameters()}
    return {"loss": _global_loss(loss), "grads": grads, "params": params, "fused_calls": calls[0]}


def _case_trainer_zero3(rank, objective, outdir, steps):
    import deepspeed
    from transformers import Trainer, TrainingArguments

    import fused_objectives as fo

    ids, labels = _batch()
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(ROWS)]
    # one step per epoch is the whole data set (ROWS // WORLD rows on each of the ranks), so the
    # sampler's order cannot change a step's sum; plain SGD, no clipping, a constant rate
    config = _ds_config(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto",
                        train_batch_size="auto", gradient_clipping="auto")
    m = _tiny()  # before the arguments, so from_config does not build it under deepspeed.zero.Init
    fo.patch_model(m, objective=objective)
    args = TrainingArguments(output_dir=outdir, per_device_train_batch_size=ROWS // WORLD, max_steps=steps,
                             learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                             max_grad_norm=0.0, warmup_steps=0, logging_steps=1, report_to=[], save_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0, deepspeed=config, seed=0, use_cpu=True)
    trainer = Trainer(model=m, args=args, train_dataset=data)
    calls = _count_fused_calls()
    logits = []  # each training call's output logits (None from the patched forward)
    m.register_forward_hook(lambda module, args, out: logits.append(out.logits))
    trainer.train()
    assert calls[0] == steps, f"{calls[0]} fused loss calls in {steps} training steps"
    assert len(logits) == steps and all(x is None for x in logits), "the model returned logits: not patched"
    w = m.lm_head.weight
    assert w.numel() == 0 and w.ds_tensor.numel() == VOCAB * 32 // WORLD  # ZeRO-3 partitioned the head
    losses = torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h], dtype=torch.float64)
    with deepspeed.zero.GatheredParameters(list(m.parameters())):
        params = {k: p.detach().clone() for k, p in m.named_parameters()}
    return {"losses": losses, "params": params, "fused_calls": calls[0]}


_CASES = {"ddp": _case_ddp, "fsdp2": _case_fsdp2, "zero3": _case_zero3, "trainer_zero3": _case_trainer_zero3}


def _worker(rank, case, store, out, kwargs):
    # a file store for the rendezvous: no TCP port to pick (and lose to another process) in between
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu")
    faulthandler.enable()  # a rank that aborts in native code prints where it was
    torch.set_num_threads(1)
    # a collective that waits for a dead rank fails in 5 minutes, not gloo's default 30
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(minutes=5))
    try:
        result = _CASES[case](rank, **kwargs)
        if rank == 0:
            torch.save(result, out)
        gc.collect()  # the engines' objects (and any work they hold) go before the group does
        dist.barrier()  # no rank tears the group down while another is still in a collective
    finally:
        _destroy_group()


def _destroy_group():
    """Destroys the process group now, not at interpreter exit (where gloo's worker threads can abort
    a finished rank): DeepSpeed keeps references to its groups, which its own destroy releases."""
    if "deepspeed" in sys.modules:
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
            return
    dist.destroy_process_group()


def _spawn(case, tmp_path, **kwargs):
    import torch.multiprocessing as mp

    out = str(tmp_path / f"{case}.pt")
    mp.spawn(_worker, args=(case, str(tmp_path / f"{case}.store"), out, kwargs), nprocs=WORLD, join=True)
    return torch.load(out)


def _assert_matches_truth(got, want, what):
    assert got["fused_calls"] == 1, f"{what}: {got['fused_calls']} fused loss calls on rank 0"
    # float32 engines against float64 truth: fp32 rounding of a few thousand-term sums
    torch.testing.assert_close(got["loss"].double(), want["loss"], rtol=1e-5, atol=1e-6, msg=f"{what}: loss")
    assert got["grads"].keys() == want["grads"].keys()
    for k, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][k].double(), g, rtol=1e-4, atol=2e-6, msg=f"{what}: grad of {k}")
    for k, p in want["params"].items():
        torch.testing.assert_close(got["params"][k].double(), p, rtol=1e-5, atol=2e-6, msg=f"{what}: updated {k}")


# not NLL: an unpatched model computes NLL from the labels, so these values show that the patch ran
@pytest.mark.parametrize("case,objective", [("ddp", "power:0.5"), ("fsdp2", "neg_p")])
def test_engine_matches_unsharded_truth(case, objective, tmp_path):
    got = _spawn(case, tmp_path, objective=objective)
    _assert_matches_truth(got, _truth(objective), case)


def test_fsdp2_tied_embedding_head(tmp_path):
    # the head's weight is the embedding's: sharded with the root, one gradient for both uses
    got = _spawn("fsdp2", tmp_path, objective="power:0.5", tied=True)
    _assert_matches_truth(got, _truth("power:0.5", tied=True), "fsdp2, tied head")


def _need_deepspeed():
    # looked up, not imported: DeepSpeed is imported only in the ranks, with DS_ACCELERATOR=cpu set
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install -e '.[dev]' installs it)")


@pytest.mark.slow
def test_deepspeed_zero3_engine(tmp_path):
    _need_deepspeed()
    got = _spawn("zero3", tmp_path, objective="power:0.5")
    _assert_matches_truth(got, _truth("power:0.5"), "zero3")


@pytest.mark.slow
def test_hf_trainer_deepspeed_zero3(tmp_path):
    _need_deepspeed()
    steps = 2
    got = _spawn("trainer_zero3", tmp_path, objective="power:0.5", outdir=str(tmp_path / "out"), steps=steps)
    want = _truth("power:0.5", steps=steps)
    assert got["fused_calls"] == steps
    # the logged losses are the global losses before each step; the parameters after both steps
    torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-5, atol=1e-6)
    for k, p in want["params"].items():
        torch.testing.assert_close(got["params"][k].double(), p, rtol=1e-5, atol=2e-6, msg=f"updated {k}")

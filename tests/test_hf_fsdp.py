"""FSDP2 (fully_shard, gloo on CPU, 2 ranks) shards lm_head: the patched model's loss and gradients still
equal the unsharded unpatched model's (the objective computed from its logits in float64), because the
fused loss runs inside the head's own call."""
import os
import socket

import pytest
import torch

pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:
    pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available", allow_module_level=True)

WORLD = 2


def _tiny():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
                               tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {o: _one(rank, o) for o in ("nll", "neg_p")}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _one(rank, objective):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import fused_objectives as fo

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (WORLD, 8), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 6] = -100
    n_items = (labels[:, 1:] != -100).sum()
    # the reference: the unpatched, unsharded model on the whole batch, the objective computed from
    # its own logits in float64 (independent of the patch)
    ref = _tiny()
    logits = ref(input_ids=ids).logits
    target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    valid = target != -100
    lp = torch.log_softmax(logits.double(), -1).gather(-1, target.clamp(min=0)[..., None])[..., 0][valid]
    per = {"nll": -lp, "neg_p": -torch.expm1(lp)}[objective]
    ref_loss = per.sum() / n_items
    ref_loss.backward()
    ref_loss = ref_loss.float()

    m = _tiny()
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(m.lm_head, mesh=mesh)
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    fo.patch_model(m, objective=objective)
    mine = slice(rank, rank + 1)
    loss = m(input_ids=ids[mine], labels=labels[mine], num_items_in_batch=n_items).loss
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grad = m.lm_head.weight.grad.full_tensor() * WORLD  # FSDP averages gradients over ranks
    return {"loss": total, "ref_loss": ref_loss.detach(), "grad": grad, "ref_grad": ref.lm_head.weight.grad}


def test_fsdp2_sharded_head_matches_unsharded(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(port, out), nprocs=WORLD, join=True)
    for objective, r in torch.load(out).items():
        torch.testing.assert_close(r["loss"], r["ref_loss"], rtol=1e-5, atol=1e-6, msg=objective)
        torch.testing.assert_close(r["grad"], r["ref_grad"], rtol=1e-4, atol=1e-6, msg=objective)

"""Patched models under gradient accumulation, transformers.Trainer, TRL's SFTTrainer and PEFT LoRA (CPU)."""
import math
import warnings

import pytest
import torch

import fused_objectives as fo

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

V, T = 48, 10


def tiny(**overrides):
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, vocab_size=V, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg)).train()


def examples(n=4, seed=3):
    """n same-length sequences with different masked prompt lengths (so micro-batches differ in token counts)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, T), generator=g)
    labels = ids.clone()
    for i in range(n):
        labels[i, : 2 + 2 * i] = -100
    return ids, labels


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(g0, g1, rtol=1e-5):
    assert set(g0) == set(g1) and g0
    scale = max(g.abs().max().item() for g in g0.values())
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=0, atol=rtol * scale, msg=k)


def objective_from_logits(model, batch, objective):
    """The objective computed independently of the patch: the model's own logits (a call without
    labels runs the original forward), float64 log-softmax, mean over valid shifted labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    labels = batch["labels"]
    target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    valid = target != -100
    lp = torch.log_softmax(logits.double(), -1).gather(-1, target.clamp(min=0)[..., None])[..., 0][valid]
    per = {"nll": -lp, "neg_p": -torch.expm1(lp)}[objective]
    return per.mean()


@pytest.mark.parametrize("objective", ["nll", "neg_p"])
def test_gradient_accumulation_matches_one_batch(objective):
    ids, labels = examples()
    m = tiny()
    fo.patch_model(m, objective=objective)
    full = m(input_ids=ids, labels=labels).loss
    full.backward()
    g_full = grads(m)
    m.zero_grad(set_to_none=True)
    n_items = (labels[:, 1:] != -100).sum()
    total = 0.0
    for i in range(4):
        loss = m(input_ids=ids[i:i + 1], labels=labels[i:i + 1], num_items_in_batch=n_items).loss
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-6, atol=1e-6)
    assert_grads_close(g_full, grads(m))
    if objective == "nll":  # and equal to the unpatched model's
        fo.unpatch_model(m)
        m.zero_grad(set_to_none=True)
        ref = m(input_ids=ids, labels=labels).loss
        ref.backward()
        torch.testing.assert_close(full, ref, rtol=1e-6, atol=1e-6)
        assert_grads_close(grads(m), g_full)


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i], "attention_mask": torch.ones_like(self.ids[i])}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=1, per_device_eval_batch_size=4,
                gradient_accumulation_steps=4, max_steps=1, learning_rate=0.5, optim="sgd",
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, report_to=[],
                save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0, seed=0,
                disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_trainer_gradient_accumulation_and_eval(tmp_path):
    ids, labels = examples()
    # expected update: one SGD step on the gradient of the whole batch of 4
    ref = tiny()
    fo.patch_model(ref, objective="neg_p")
    ref(input_ids=ids, labels=labels).loss.backward()
    expected = {n: p.detach() - 0.5 * p.grad for n, p in ref.named_parameters()}

    m = tiny()
    fo.patch_model(m, objective="neg_p")
    trainer = transformers.Trainer(model=m, args=_args(tmp_path), train_dataset=_ListDataset(ids, labels),
                                   eval_dataset=_ListDataset(ids, labels))
    assert trainer.model_accepts_loss_kwargs  # so Trainer passes num_items_in_batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-6, msg=n)
    # evaluation runs the patched forward without grad (eval_objective None: the training objective)
    metrics = trainer.evaluate()
    with torch.no_grad():
        m.eval()
        want = m(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids)).loss
    assert metrics["eval_loss"] == pytest.approx(want.item(), rel=1e-5)


def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(V - 4)]
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _sft_dataset(n=16, seed=0):
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(2, 5, (1,), generator=g))
        prompt = " ".join(f"w{int(x)}" for x in torch.randint(0, V - 4, (k,), generator=g))
        completion = " " + " ".join(f"w{int(x)}" for x in torch.randint(0, V - 4, (4,), generator=g))
        rows.append({"prompt": prompt, "completion": completion})
    return datasets.Dataset.from_list(rows)


@pytest.fixture
def patch_how(request):
    """Patch a model as an instance or through its class; undo the class patch afterwards."""
    how = request.param
    yield how
    if how == "class" and "_fused_objectives_patch" in transformers.LlamaForCausalLM.__dict__:
        fo.unpatch_model(transformers.LlamaForCausalLM)


@pytest.mark.parametrize("patch_how", ["instance", "class"], indirect=True)
def test_trl_sft_trainer_trains_with_the_objective(tmp_path, patch_how):
    trl = pytest.importorskip("trl")
    tok = _tokenizer()
    m = tiny()
    if patch_how == "instance":
        fo.patch_model(m, objective="neg_p")
    else:
        fo.patch_model(type(m), objective="neg_p")
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, max_length=32,
                         dataloader_num_workers=0, disable_tqdm=True, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=m, args=args, train_dataset=_sft_dataset(), processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        batch = {k: v for k, v in batch.items()}
        m.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        g_trl = grads(m)
        # the loss SFTTrainer trains on (TRL's fused_lm_head protocol) is neg_p computed from the
        # model's own logits, not TRL's NLL, and so are its gradients
        plain = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        m.zero_grad(set_to_none=True)
        negp = objective_from_logits(m, plain, "neg_p")
        negp.backward()
        g_want = grads(m)
        m.zero_grad(set_to_none=True)
        nll = objective_from_logits(m, plain, "nll").detach()
        torch.testing.assert_close(loss.detach().double(), negp.detach(), rtol=1e-5, atol=1e-7)
        assert abs(negp.item() - nll.item()) > 1e-2
        assert_grads_close(g_want, g_trl, rtol=1e-4)
        before = m.lm_head.weight.detach().clone()
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(0.0 <= x <= 1.0 for x in losses)  # 1 - p lies in [0, 1]
    # TRL's entropy metric is the softmax entropy from the fused pass: finite, within (0, log V]
    entropies = [h["entropy"] for h in trainer.state.log_history if "entropy" in h]
    assert len(entropies) == 4 and all(0.0 < e <= math.log(V) + 1e-6 for e in entropies), entropies
    assert not torch.equal(before, m.lm_head.weight)


@pytest.mark.parametrize("where", ["attention", "lm_head", "modules_to_save"])
def test_peft_lora_patched_matches_unpatched_and_trains(where):
    peft = pytest.importorskip("peft")
    ids, labels = examples()
    base = tiny()
    kw = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    if where == "lm_head":
        kw["target_modules"] = ["q_proj", "v_proj", "lm_head"]
    if where == "modules_to_save":
        kw["modules_to_save"] = ["lm_head"]
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    if where == "lm_head":  # a non-zero B so the head's adapter changes the logits
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lm_head.lora_B" in n:
                    p.normal_(0, 0.1)
    model.train()
    out0 = model(input_ids=ids, labels=labels)
    out0.loss.backward()
    g0 = grads(model)
    model.zero_grad(set_to_none=True)
    assert fo.patch_model(model, objective="nll") is model
    out1 = model(input_ids=ids, labels=labels)
    assert out1.logits is None
    out1.loss.backward()
    torch.testing.assert_close(out1.loss, out0.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g0, grads(model), rtol=1e-4)
    # a few SGD steps with another objective lower it
    fo.set_objective(model, "neg_p")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    first = None
    for _ in range(5):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert model(input_ids=ids, labels=labels).loss.item() < first
    fo.unpatch_model(model)
    assert model(input_ids=ids, labels=labels).logits is not None


def test_trl_wrapping_a_patched_model_in_peft_itself_still_trains_on_the_objective(tmp_path):
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    m = tiny()
    fo.patch_model(m, objective="neg_p")
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                         save_strategy="no", use_cpu=True, max_length=32, dataloader_num_workers=0,
                         disable_tqdm=True, logging_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=m, args=args, train_dataset=_sft_dataset(), processing_class=_tokenizer(),
                                 peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        batch = next(iter(trainer.get_train_dataloader()))
        loss = trainer.compute_loss(trainer.model, dict(batch))
        plain = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        with torch.no_grad():
            want = objective_from_logits(trainer.model, plain, "neg_p")
        torch.testing.assert_close(loss.detach().double(), want, rtol=1e-5, atol=1e-7)
        trainer.train()
    assert all(0.0 <= h["loss"] <= 1.0 for h in trainer.state.log_history if "loss" in h)


# ----------------------------------------------------------------------------- trainers that bypass the patch
def test_trainer_label_smoothing_factor_is_refused_not_silently_trained(tmp_path):
    """Trainer(label_smoothing_factor) pops the labels and smooths a cross-entropy of the full logits: on a
    patched model that would train smoothed NLL instead of neg_p; the patched forward refuses, naming the fix."""
    ids, labels = examples()
    m = tiny()
    fo.patch_model(m, objective="neg_p")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainer = transformers.Trainer(model=m, args=_args(tmp_path, label_smoothing_factor=0.1),
                                   train_dataset=_ListDataset(ids, labels), eval_dataset=_ListDataset(ids, labels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"label_smoothing_factor=0 .*patch_model\(model, objective=\.\.\., "
                                             r"label_smoothing=0\.1\)"):
            trainer.train()
        with pytest.raises(ValueError, match="label_smoothing_factor"):
            trainer.evaluate()
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), n
    # without the Trainer's smoother the same model trains (the call without labels is refused only there)
    fo.unpatch_model(m)
    assert m(input_ids=ids).logits is not None


def test_trainer_compute_loss_func_warns_once(tmp_path):
    ids, labels = examples()
    m = tiny()
    fo.patch_model(m, objective="neg_p")

    def my_loss(outputs, labels, num_items_in_batch=None):
        return outputs.logits.float().logsumexp(-1).mean()

    trainer = transformers.Trainer(model=m, args=_args(tmp_path, max_steps=2), train_dataset=_ListDataset(ids, labels),
                                   compute_loss_func=my_loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in caught if "compute_loss_func" in str(w.message) and "neg_p" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]


def _accuracy(eval_pred):
    """Next-token accuracy from logits [B, T, V] or argmax ids [B, T] (position t predicts label t + 1)."""
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    if preds.ndim == 3:
        preds = preds.argmax(-1)
    preds, labels = preds[:, :-1], labels[:, 1:]
    mask = labels != -100
    return {"accuracy": float((preds[mask] == labels[mask]).mean()), "n": int(mask.sum())}


@pytest.mark.parametrize("how", ["logits", "ids", "logits+preprocess"])
def test_trainer_evaluate_gives_compute_metrics_predictions(tmp_path, how):
    """trainer.evaluate() with compute_metrics: the patched model's predictions give the unpatched model's
    accuracy (the logits by default; argmax ids with eval_predictions='ids', no [N, V] tensor)."""
    ids, labels = examples()
    g = torch.Generator().manual_seed(5)
    for t in range(1, T):  # about half the next tokens repeat the current one
        ids[:, t] = torch.where(torch.rand(len(ids), generator=g) < 0.5, ids[:, t - 1], ids[:, t])
    labels = torch.where(labels == -100, labels, ids)
    m = tiny()
    with torch.no_grad():  # a model that predicts some of them: the logits favour the input token
        m.lm_head.weight.add_(2.0 * m.model.embed_tokens.weight)
    kw = {}
    if how == "logits+preprocess":
        kw["preprocess_logits_for_metrics"] = lambda logits, labels: logits.argmax(-1)
    args = _args(tmp_path)
    ref = transformers.Trainer(model=m, args=args, eval_dataset=_ListDataset(ids, labels), compute_metrics=_accuracy,
                               **kw).evaluate()
    fo.patch_model(m, objective="nll", **({"eval_predictions": "ids"} if how == "ids" else {}))
    got = transformers.Trainer(model=m, args=args, eval_dataset=_ListDataset(ids, labels), compute_metrics=_accuracy,
                               **kw).evaluate()
    # the truth, from the model's own float64 logits
    m.eval()
    with torch.no_grad():
        fo.unpatch_model(m)
        logits = m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.double()
    target = labels[:, 1:]
    mask = target != -100
    want = float((logits[:, :-1].argmax(-1)[mask] == target[mask]).double().mean())
    assert 0.0 < want < 1.0
    assert got["eval_n"] == ref["eval_n"] == int(mask.sum())
    assert got["eval_accuracy"] == pytest.approx(want) and ref["eval_accuracy"] == pytest.approx(want)
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)


def test_trainer_evaluate_loss_only_builds_no_logits(tmp_path, monkeypatch):
    """Without compute_metrics Trainer evaluates with prediction_loss_only: the patched head builds no logits."""
    ids, labels = examples()
    m = tiny()
    fo.patch_model(m, objective="neg_p")
    widths = []
    linear_forward = torch.nn.Linear.forward

    def counting(self, x):
        widths.append(self.out_features)
        return linear_forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting)
    trainer = transformers.Trainer(model=m, args=_args(tmp_path), eval_dataset=_ListDataset(ids, labels))
    metrics = trainer.evaluate()
    assert widths and V not in widths
    m.eval()
    with torch.no_grad():
        out = m(input_ids=ids, labels=labels)  # outside a Trainer: eval_predictions="logits" builds them
    assert V in widths and out.logits.shape == (*ids.shape, V)
    assert metrics["eval_loss"] == pytest.approx(out.loss.item(), rel=1e-6)


def test_trl_loss_types_that_transform_log_probs_are_refused(tmp_path):
    """TRL loss_type='dft' reweights TRL's log_probs by exp(log_probs): with a patched neg_p (log_probs = p - 1)
    it would train neither DFT nor neg_p; refused. TRL's label smoothing (full logits) is refused as Trainer's."""
    trl = pytest.importorskip("trl")
    m = tiny()
    fo.patch_model(m, objective="neg_p")
    common = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                  save_strategy="no", use_cpu=True, max_length=32, dataloader_num_workers=0, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for extra, match in ((dict(loss_type="dft"), r"loss_type='dft'.*objective 'neg_p'.*loss_type='nll'"),
                             (dict(label_smoothing_factor=0.1), r"label_smoothing_factor=0 ")):
            trainer = trl.SFTTrainer(model=m, args=trl.SFTConfig(**common, **extra), train_dataset=_sft_dataset(),
                                     processing_class=_tokenizer())
            batch = next(iter(trainer.get_train_dataloader()))
            with pytest.raises(ValueError, match=match):
                trainer.compute_loss(trainer.model, dict(batch))
        # DFT on a plain NLL patch: log_probs are the log-probabilities, so TRL's DFT is right
        fo.patch_model(m, objective="nll")
        trainer = trl.SFTTrainer(model=m, args=trl.SFTConfig(**common, loss_type="dft"), train_dataset=_sft_dataset(),
                                 processing_class=_tokenizer())
        batch = next(iter(trainer.get_train_dataloader()))
        loss = trainer.compute_loss(trainer.model, dict(batch))
    plain = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        logits = m(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits.double()
    target = torch.cat([plain["labels"][:, 1:], torch.full_like(plain["labels"][:, :1], -100)], 1)
    valid = target != -100
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0][valid]
    torch.testing.assert_close(loss.detach().double(), (-lp * lp.exp()).mean(), rtol=1e-5, atol=1e-7)


def test_patch_label_smoothing_trains_like_trainer_label_smoothing_factor(tmp_path):
    """The fix the refusal names: patch_model(nll, label_smoothing=eps) with label_smoothing_factor=0 takes the
    same SGD step (4 accumulated micro-batches, num_items_in_batch) as the unpatched Trainer's label smoother."""
    ids, labels = examples()
    runs = {}
    for how in ("trainer", "patch"):
        m = tiny()
        if how == "patch":
            fo.patch_model(m, objective="nll", label_smoothing=0.1)
        args = _args(tmp_path, label_smoothing_factor=0.1 if how == "trainer" else 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformers.Trainer(model=m, args=args, train_dataset=_ListDataset(ids, labels)).train()
        runs[how] = {n: p.detach().clone() for n, p in m.named_parameters()}
    moved = 0.0
    start = {n: p.detach() for n, p in tiny().named_parameters()}
    for n in runs["trainer"]:
        torch.testing.assert_close(runs["patch"][n], runs["trainer"][n], rtol=1e-5, atol=1e-6, msg=n)
        moved = max(moved, (runs["trainer"][n] - start[n]).abs().max().item())
    assert moved > 1e-3


def test_trainer_subclass_training_on_the_logits_warns_once(tmp_path):
    """A compute_loss of its own that calls the patched model without labels in training (as preference or RL
    trainers do) trains on the logits, not the patched objective: one warning naming it."""
    ids, labels = examples()

    class OwnLoss(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            logits = model(**inputs).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    m = tiny()
    fo.patch_model(m, objective="neg_p")
    trainer = OwnLoss(model=m, args=_args(tmp_path, max_steps=2), train_dataset=_ListDataset(ids, labels))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in caught if "OwnLoss.compute_loss calls the model without labels" in str(w.message)]
    assert len(ours) == 1 and "'neg_p'" in str(ours[0].message), [str(w.message) for w in caught]


def test_trl_rl_trainer_log_probs_are_refused_unless_the_patch_is_plain_nll(tmp_path):
    """TRL's RLOO / GRPO / DPO / KTO trainers call model(..., labels=..., fused_lm_head=True) and use log_probs as
    true log-probabilities (ratios, KL); RLOOConfig has no loss_type. A neg_p patch (log_probs = p - 1) is refused
    with a fix that is not SFT's loss_type; a plain nll patch gives the exact log-probabilities."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    m = tiny()
    fo.patch_model(m, objective="neg_p")
    args = trl.RLOOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=4, beta=0.0, use_cpu=True, report_to=[], save_strategy="no",
                          disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.RLOOTrainer(model=m, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                                  train_dataset=datasets.Dataset.from_list([{"prompt": "w1 w2 w3"}] * 8),
                                  processing_class=_tokenizer())
    assert not hasattr(trainer.args, "loss_type")
    ids = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with pytest.raises(ValueError, match=r"RLOOTrainer calls the model with fused_lm_head=True.*objective "
                                         r"'neg_p'.*objective='nll'") as err:
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 4)
    assert "loss_type" not in str(err.value)
    fo.patch_model(m, objective="nll", z_loss=1e-3)  # a loss term: log_probs are not log p either
    with pytest.raises(ValueError, match=r"objective 'nll' with z_loss=0\.001"):
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 4)
    fo.patch_model(m, objective="nll")
    got = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 4)[0]
    fo.unpatch_model(m)
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask).logits[:, -5:-1].double()
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, -4:, None])[..., 0]
    torch.testing.assert_close(got.detach().double(), want, rtol=0, atol=1e-3)


def test_trainer_checks_run_under_torch_compile(tmp_path):
    """Trainer(torch_compile=True) compiles the patched forward: the trainer checks still run (eagerly, a graph
    break only on the call without labels), so label_smoothing_factor is refused, not trained silently."""
    ids, labels = examples()
    m = tiny()
    fo.patch_model(m, objective="neg_p")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    args = _args(tmp_path, label_smoothing_factor=0.1, torch_compile=True, torch_compile_backend="aot_eager",
                 gradient_accumulation_steps=1, per_device_train_batch_size=4)
    trainer = transformers.Trainer(model=m, args=args, train_dataset=_ListDataset(ids, labels))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match=r"label_smoothing_factor=0 "):
                trainer.train()
    finally:
        torch._dynamo.reset()
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), n

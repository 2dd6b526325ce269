"""Verify ``patch_model`` on every causal-LM family of the installed transformers.

For each model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` it builds a tiny random model from the
default config (no download; shrunk by ``TINY``, plus the per-family settings of ``FAMILY_CONFIGS``
where a generic shrink cannot work), runs the unpatched training forward and backward, then checks:

1. patched ``nll``: loss and every parameter gradient equal the unpatched ones (fp32), logits None;
2. patched ``neg_p``: loss equals ``mean(1 - p)`` computed from the unpatched logits, plus the
   model's own auxiliary loss (unpatched loss minus the NLL of its logits);
3. ``unpatch_model`` restores the original forward and its loss.

Outcomes: ``exact`` (all three hold), ``refused`` (the patched forward raised
``UnsupportedModelError``: the family does something the generic path cannot reproduce; families in
``hf.refusals.KNOWN_REFUSALS`` must also be refused by ``patch_model`` itself, and must still be
refused by the generic path, else the check FAILS),
``skipped`` (no tiny model could be built, or its unpatched training forward fails on CPU) and
``FAILED`` (a different number: a bug).  ``python -m fused_objectives.integrations.hf_verify``
prints the table for the installed transformers; the tests and ``scripts/gen_supported_models.py``
run the same ``check_family``.
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from typing import List, Optional

import torch

from .hf import UnsupportedModelError, patch_model, set_objective, unpatch_model
from .hf.refusals import known_refusal

# Attribute -> tiny value, set where the config has the attribute (aliases resolve via attribute_map)
TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=128, max_position_embeddings=128, n_positions=128, n_ctx=128,
    # MoE
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_topk=2, moe_k=2, top_k=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
    n_shared_experts=1, num_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
    router_aux_loss_coef=0.01, router_jitter_noise=0.0, input_jitter_noise=0.0, moe_layer_freq=1,
    # MLA and friends
    kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, qk_head_dim=16,
    # state-space / linear attention
    state_size=8, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_n_heads=4, mamba_head_dim=16,
    mamba_d_head=16, mamba_n_groups=1, ssm_state_size=8, n_groups=1, time_step_rank=4,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    # encoder-decoder style configs used as decoders
    encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=4,
    decoder_attention_heads=4, d_ff=64, d_kv=8, lru_width=32, shape_vocab_size=16, pronunciation_vocab_size=16,
    # misc
    num_key_value_groups=2, rotary_dim=8, sliding_window=16, attention_chunk_size=16,
    num_local_heads=2, embedding_size=32, max_window_layers=2, layer_norm_eps=1e-5,
)
# Attributes a default config may leave None (derived from others at full size) that tiny shapes need set
FILL_IF_NONE = ("head_dim", "num_key_value_heads", "num_experts_per_tok")
# Per-family settings the generic shrink cannot guess (layer patterns that must keep an attention layer,
# state-space sizes derived from others), so every family that can run on CPU is checked
FAMILY_CONFIGS = {
    "falcon_h1": dict(mamba_d_ssm=64, mamba_chunk_size=8),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_dt_rank=4, use_mamba_kernels=False),
    "bamba": dict(attn_layer_indices=[1], mamba_chunk_size=8),
    "deepseek_v2": dict(num_experts_per_tok=2, topk_group=1),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"], mamba_chunk_size=8),
    "nemotron_h": dict(layers_block_type=["linear_attention", "full_attention"], mamba_num_heads=4, mamba_head_dim=16,
                       ssm_state_size=8, chunk_size=8, use_mamba_kernels=False),
    "mamba2": dict(num_heads=8, head_dim=8, chunk_size=8),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "dots1": dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2),
    "flint": dict(mlp_only_layers=[0]),
    **{mt: dict(vocab_size_per_layer_input=128, hidden_size_per_layer_input=8)
       for mt in ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")},
    **{mt: dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8,
                indexer_compress_ratio=2) for mt in ("qwen4_exp", "qwen4_exp_text")},
    "xmod": dict(default_language="en_XX", is_decoder=True),
    "zamba2": dict(attention_hidden_size=64, attention_head_dim=16, mamba_headdim=8, kv_channels=8, num_query_groups=4,
                   hybrid_layer_ids=[1], chunk_size=8, use_mamba_kernels=False, adapter_rank=8),
    "cohere_compass_text": dict(rope_parameters={t: {"rope_type": "default", "rope_theta": 10000.0}
                                                 for t in ("full_attention", "sliding_attention")}),
    "reformer": dict(is_decoder=True, axial_pos_embds=False),
    "marian": dict(decoder_vocab_size=128),
}
MAX_PARAMS = 8_000_000  # a tiny model's forward + backward stays in milliseconds
SEQ, BATCH = 8, 2


@dataclass
class FamilyResult:
    model_type: str
    class_name: str
    status: str            # exact | refused | skipped | FAILED
    reason: str = ""
    loss_err: float = float("nan")
    grad_err: float = float("nan")


_LAYER_PATTERNS = ("layer_types", "layers_block_type", "block_types", "layer_block_types", "mlp_layer_types",
                   "hybrid_override_pattern")


def _two_kinds(pattern):
    """The first 2 entries of a per-layer pattern, keeping a second kind (e.g. attention) when there is one."""
    items = list(pattern)
    other = next((x for x in items if x != items[0]), items[1])
    picked = [items[0], other]
    return "".join(picked) if isinstance(pattern, str) else type(pattern)(picked)


def _present(cfg, name: str) -> bool:
    """The config has ``name`` set (aliases included); per-layer attributes of heterogeneous configs, which
    refuse a global read, count by their stored value."""
    try:
        return getattr(cfg, name, None) is not None
    except Exception:
        return vars(cfg).get(name) is not None


def _shrink(cfg, depth=0):
    from transformers import PretrainedConfig

    n_layers = TINY["num_hidden_layers"]
    if hasattr(type(cfg), "allow_global_per_layer_attribute_access") or "per_layer_config" in vars(cfg):
        # heterogeneous (per-layer) configs: the tiny values below are set globally, for every layer
        cfg.allow_global_per_layer_attribute_access = True
    for name, value in TINY.items():
        if _present(cfg, name) and name not in ("layer_norm_eps",):
            try:
                setattr(cfg, name, value)
            except Exception:
                pass
    for name in FILL_IF_NONE:
        if name in vars(cfg) and vars(cfg)[name] is None:
            setattr(cfg, name, TINY[name])
    for name in ("q_lora_rank",):
        if getattr(cfg, name, None) is not None:
            setattr(cfg, name, 16)
    for name in list(vars(cfg)):
        value = getattr(cfg, name, None)
        low = name.lower()
        if isinstance(value, float) and any(k in low for k in ("dropout", "jitter", "pdrop", "drop_rate")):
            setattr(cfg, name, 0.0)
        elif isinstance(value, (list, tuple, str)) and name in _LAYER_PATTERNS and len(value) >= n_layers:
            setattr(cfg, name, _two_kinds(value))
        elif isinstance(value, PretrainedConfig) and depth < 2:
            _shrink(value, depth + 1)
    if getattr(cfg, "kv_lora_rank", None) is not None and hasattr(cfg, "num_key_value_heads"):
        cfg.num_key_value_heads = cfg.num_attention_heads  # multi-head latent attention: no KV groups
    if hasattr(cfg, "output_router_logits"):
        cfg.output_router_logits = True
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(vocab, int):
        for k, name in enumerate(("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
                                  "sep_token_id")):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value >= vocab:
                # distinct ids inside the vocabulary (strict configs reject None for some of them)
                setattr(cfg, name, vocab - 1 - k)
            elif isinstance(value, list):
                setattr(cfg, name, [v for v in value if v < vocab] or None)
    return cfg


def _special_ids(cfg) -> set:
    ids = set()
    for name in dir(cfg):
        if name.endswith(("_token_id", "_token_index", "_id")) and not name.startswith("_"):
            try:
                value = getattr(cfg, name)
            except Exception:
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                ids.add(value)
    return ids


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:200]


def build_tiny(model_type: str):
    """``(model, inputs)`` for a tiny random fp32 model of ``model_type``, or raise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = _shrink(AutoConfig.for_model(model_type))
    for name, value in FAMILY_CONFIGS.get(model_type, {}).items():
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        setattr(text if name in vars(text) and name not in vars(cfg) else cfg, name, value)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMS:
        raise _Skip(f"default config does not shrink generically ({n / 1e6:.1f}M parameters)")
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    except Exception:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.train()
    tc = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 2
    in_vocab = getattr(tc, "vocab_size", vocab) or vocab
    special = _special_ids(cfg) | _special_ids(tc)
    allowed = torch.tensor([i for i in range(min(vocab, in_vocab)) if i not in special][:1000])
    g = torch.Generator().manual_seed(1)
    ids = allowed[torch.randint(0, len(allowed), (BATCH, SEQ), generator=g)]
    labels = ids.clone()
    labels[0, :3] = -100  # a masked prompt
    labels[1, 5] = -100
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    return model, inputs


class _Skip(Exception):
    pass


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_family(model_type: str, class_name: str = "") -> FamilyResult:
    res = FamilyResult(model_type, class_name, "skipped")
    try:
        model, inputs = build_tiny(model_type)
    except _Skip as e:
        res.reason = str(e)
        return res
    except Exception as e:
        res.reason = f"cannot build a tiny model from the default config ({_first_line(e)})"
        return res
    res.class_name = type(model).__name__
    try:
        out0 = model(**inputs)
        loss0 = out0.loss
        if loss0 is None or out0.logits is None:
            res.reason = "unpatched forward returns no loss or no logits"
            return res
        loss0.backward()
    except Exception as e:
        res.reason = f"unpatched training forward fails on CPU ({_first_line(e)})"
        return res
    if not torch.isfinite(loss0):
        res.reason = "unpatched loss is not finite"
        return res
    g0 = _grads(model)
    model.zero_grad(set_to_none=True)
    logits0 = out0.logits.detach().float()
    labels = inputs["labels"]
    cfg = model.config
    known = known_refusal(cfg.model_type, cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg)
    if known is not None:
        try:
            patch_model(model, objective="nll")
        except UnsupportedModelError:
            pass
        else:
            _safe_unpatch(model)
            res.status, res.reason = "FAILED", "listed in KNOWN_REFUSALS but patch_model accepted it"
            return res
    try:
        _patch_without_known_refusals(model, "nll")
        out1 = model(**inputs)
        out1.loss.backward()
    except UnsupportedModelError as e:
        runtime = str(e).split(": ", 1)[-1].split(". The fused loss")[0]
        res.status = "refused"
        res.reason = known if known is not None else f"at the first training call: {runtime}"
        _safe_unpatch(model)
        return res
    except Exception as e:
        res.status, res.reason = "FAILED", f"patched forward raised {_first_line(e)}"
        res.reason += " | " + traceback.format_exc(limit=-3).replace("\n", " ")[-300:]
        _safe_unpatch(model)
        return res
    try:
        problems = _compare(model, inputs, res, out1, loss0, g0, logits0, labels)
    except Exception as e:  # after a successful build, any exception is a failure of the patch
        problems = [f"raised {_first_line(e)} | " + traceback.format_exc(limit=-3).replace("\n", " ")[-300:]]
        _safe_unpatch(model)
    if known is not None:
        problems.append("listed in KNOWN_REFUSALS (refused by patch_model) but the generic patch runs: "
                        + ("; ".join(problems) if problems else "exactly") + "; remove it from the list")
        problems = problems[-1:]
    if problems:
        res.status, res.reason = "FAILED", "; ".join(problems)
    else:
        res.status, res.reason = "exact", ""
    return res


def _compare(model, inputs, res, out1, loss0, g0, logits0, labels) -> List[str]:
    """The patched nll result against the unpatched one, patched neg_p against the unpatched logits,
    then unpatch: the problems found (empty when exact)."""
    g1 = _grads(model)
    model.zero_grad(set_to_none=True)
    res.loss_err = abs(out1.loss.item() - loss0.item())
    scale = max(1.0, max((v.abs().max().item() for v in g0.values()), default=1.0))
    missing = set(g0) ^ set(g1)
    res.grad_err = max(((g0[k] - g1[k]).abs().max().item() for k in g0 if k in g1), default=0.0)
    problems = []
    if out1.logits is not None:
        problems.append("patched output has logits")
    if missing:
        problems.append(f"gradients missing for {sorted(missing)[:3]}")
    if not res.loss_err <= 1e-5 * (1 + abs(loss0.item())):
        problems.append(f"nll loss differs by {res.loss_err:.3g}")
    if not res.grad_err <= 1e-5 * scale:
        problems.append(f"gradients differ by {res.grad_err:.3g}")
    # another objective against the unpatched logits (+ the model's own auxiliary loss)
    if logits0.shape[:-1] == labels.shape:
        target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        valid = target != -100
        lp = torch.log_softmax(logits0, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        nll = -(lp[valid]).mean()
        aux = loss0.detach() - nll
        expected = (1 - lp[valid].exp()).mean() + aux
        set_objective(model, "neg_p")
        with torch.no_grad():
            got = model(**inputs).loss
        if not abs(got.item() - expected.item()) <= 1e-5 * (1 + abs(expected.item())):
            problems.append(f"neg_p loss {got.item():.7g} != {expected.item():.7g} from the unpatched logits")
    else:
        problems.append(f"unpatched logits {tuple(logits0.shape)} do not align with labels")
    unpatch_model(model)
    if "forward" in model.__dict__:
        problems.append("unpatch left an instance forward")
    with torch.no_grad():
        out2 = model(**inputs)
    if out2.logits is None or abs(out2.loss.item() - loss0.item()) > 1e-6 * (1 + abs(loss0.item())):
        problems.append("unpatched model does not give its original output back")
    return problems


def _patch_without_known_refusals(model, objective: str) -> None:
    """patch_model minus its KNOWN_REFUSALS check: the run-time refusal is what the list is checked against."""
    from .hf.options import _make_options
    from .hf.patch import _install, _resolve

    kind, obj, outer = _resolve(model)
    _install(kind, obj, outer, _make_options(objective, {}), model)


def _safe_unpatch(model):
    try:
        unpatch_model(model)
    except ValueError:
        pass


def causal_lm_types() -> List[tuple]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


def check_all(model_types: Optional[List[str]] = None, log=None) -> List[FamilyResult]:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    results = []
    for mt, cls in causal_lm_types():
        if model_types is not None and mt not in model_types:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = check_family(mt, cls)
        if log:
            log(f"{r.status:8s} {mt:28s} {r.reason[:150]}")
        results.append(r)
    return results


def markdown_table(results: List[FamilyResult], transformers_version: str) -> str:
    order = {"exact": 0, "refused": 1, "FAILED": 2, "skipped": 3}
    counts = {s: sum(r.status == s for r in results) for s in order}
    lines = [
        "# Supported Hugging Face causal-LM families",
        "",
        "Generated by `scripts/gen_supported_models.py` from the checks `tests/test_hf_families.py` runs",
        f"(`fused_objectives.integrations.hf_verify.check_family`), on transformers {transformers_version}, CPU, fp32.",
        "Do not edit by hand. For every causal-LM model type the installed transformers maps, a tiny random",
        "model is built from its default config (shrunk generically, plus the few per-family settings in",
        "`hf_verify.FAMILY_CONFIGS`) and: the patched `nll` loss and every parameter gradient must",
        "equal the unpatched ones (relative 1e-5), logits must be `None`; the patched `neg_p` loss must equal",
        "`mean(1 - p)` from the unpatched logits plus the model's own auxiliary loss; `unpatch_model` must",
        "give the original output back.",
        "",
        f"**{counts['exact']} exact**, {counts['refused']} refused (`patch_model()` raises `UnsupportedModelError` "
        "with the reason below for the families in `integrations/hf/refusals.py`'s `KNOWN_REFUSALS`, and the "
        "check confirms the generic patch would refuse them too; a reason starting \"at the first training call\" "
        f"is a refusal only the training forward detects), {counts['FAILED']} failed, {counts['skipped']} skipped: "
        "untested, because no tiny model could be built generically from the default config or its unpatched "
        "training forward fails with that config on CPU (a limit of this check, not a refusal: patching such a "
        "model still either equals its own loss or raises).",
        "",
        "| model type | class | status | max loss diff | max grad diff | reason |",
        "|---|---|---|---|---|---|",
    ]

    def fmt(x):
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1e}"

    for r in sorted(results, key=lambda r: (order.get(r.status, 9), r.model_type)):
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{r.model_type}` | {r.class_name} | {r.status} | {fmt(r.loss_err)} | {fmt(r.grad_err)} | "
                     f"{reason} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fused_objectives.integrations.hf_verify``: the family table for the installed
    transformers; 1 when a family FAILED."""
    import argparse
    import time

    parser = argparse.ArgumentParser(
        prog="python -m fused_objectives.integrations.hf_verify",
        description="Check fo.patch_model on every causal-LM family of the installed transformers: a tiny random "
                    "model per family (no download), patched loss and gradients against the unpatched model's. "
                    "Takes a few minutes on CPU for all families.")
    parser.add_argument("model_types", nargs="*", metavar="MODEL_TYPE",
                        help="only these model types (e.g. llama gemma2); default: every family")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as Markdown to PATH")
    parser.add_argument("--no-progress", action="store_true", help="print only the summary and table")
    args = parser.parse_args(argv)
    from ..cli import Status, silence_progress

    if args.no_progress:
        silence_progress()
    status = Status("hf_verify")
    status("loading transformers ...")
    import transformers

    known = [mt for mt, _ in causal_lm_types()]
    unknown = [mt for mt in args.model_types if mt not in known]
    if unknown:
        parser.error(f"not a causal-LM model type of transformers {transformers.__version__}: "
                     f"{', '.join(unknown)} (e.g. {', '.join(known[:5])})")
    todo = args.model_types or known
    t0 = time.monotonic()
    done = [0]

    def log(line: str) -> None:
        done[0] += 1
        left = (time.monotonic() - t0) / done[0] * (len(todo) - done[0])
        status(f"[{done[0]}/{len(todo)}, ~{left:.0f}s left] {line}")

    results = check_all(args.model_types or None, log=log)
    text = markdown_table(results, transformers.__version__)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
        print(f"wrote {args.markdown}")
    else:
        print(text)
    counts = {s: sum(r.status == s for r in results) for s in ("exact", "refused", "FAILED", "skipped")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return 1 if counts["FAILED"] else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

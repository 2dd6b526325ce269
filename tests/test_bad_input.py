"""Bad input gets a clear ValueError/TypeError naming the argument, never a crash or a silent result."""
import pytest
import torch

import fused_objectives as fo
import helpers
from helpers import device_for, make_inputs


@pytest.fixture(params=["reference", "fused"])
def backend(request, fused_backend, monkeypatch):
    name = "reference" if request.param == "reference" else fused_backend
    # make_inputs' tensors: CUDA for the Triton backends on a CUDA machine, else CPU
    monkeypatch.setitem(helpers.DEFAULT_DEVICE, "device", device_for(name))
    return name


def call(backend, hidden, weight, target, bias=None, **kw):
    return fo.linear_objective_loss(hidden, weight, target, bias, backend=backend, **kw)


@pytest.mark.parametrize("case,exc,match", [
    ("target_high", ValueError, r"outside \[0, 100\)"),
    ("target_negative", ValueError, r"holds -5"),
    ("hidden_H", ValueError, "hidden's last dim"),
    ("target_shape", ValueError, "target shape"),
    ("weight_1d", ValueError, r"weight must have shape \[V, H\]"),
    ("weight_empty", ValueError, "V >= 1"),
    ("bias_shape", ValueError, r"bias must have shape \[V\]"),
    ("dtype_mismatch", TypeError, "weight dtype"),
    ("bias_dtype", TypeError, "bias dtype"),
    ("int_hidden", TypeError, "hidden must be a floating tensor"),
    ("float_target", TypeError, "target must be an integer tensor"),
    ("bool_target", TypeError, "target must be an integer tensor"),
    ("not_tensor", TypeError, "hidden must be a torch.Tensor"),
    ("reduction", ValueError, "reduction must be one of"),
    ("normalize", ValueError, "normalize must be one of"),
    ("objective", ValueError, "unknown objective"),
    ("objective_param", ValueError, "must be > 0"),
    ("threshold", ValueError, r"in \[0, 1\]"),
    ("softcap", ValueError, "softcap must be"),
    ("logit_scale", ValueError, "logit_scale must be"),
    ("softcap_type", TypeError, "softcap must be a float"),
    ("backend", ValueError, "unknown backend"),
    ("num_items_sum", ValueError, "cannot be combined with reduction='sum'"),
    ("num_items_kept", ValueError, "normalize='kept'"),
    ("num_items_negative", ValueError, "num_items_in_batch must be >= 0"),
    ("num_items_type", TypeError, "num_items_in_batch must be an int"),
    ("num_items_shape", ValueError, "1-element tensor"),
    ("ignore_index", TypeError, "ignore_index must be an int"),
    ("shift_type", TypeError, "shift must be a bool"),
    ("shift_0d", ValueError, "sequence dimension"),
    ("return_stats", TypeError, "return_stats must be a bool"),
])
def test_bad_input(backend, case, exc, match):
    h, w, t, b = make_inputs(N=7, H=8, V=100, bias=True)
    kw = {}
    if case == "target_high":
        t[2] = 100
    elif case == "target_negative":
        t[2] = -5
    elif case == "hidden_H":
        h = h[:, :5]
    elif case == "target_shape":
        t = t[:5]
    elif case == "weight_1d":
        w = w[0]
    elif case == "weight_empty":
        w = w[:0]
    elif case == "bias_shape":
        b = b[:7]
    elif case == "dtype_mismatch":
        w = w.half()
    elif case == "bias_dtype":
        b = b.half()
    elif case == "int_hidden":
        h, w, b = h.long(), w.long(), None
    elif case == "float_target":
        t = t.float()
    elif case == "bool_target":
        t = t > 0
    elif case == "not_tensor":
        h = h.tolist()
    elif case == "reduction":
        kw = dict(reduction="avg")
    elif case == "normalize":
        kw = dict(normalize="all")
    elif case == "objective":
        kw = dict(objective="no_such_objective")
    elif case == "objective_param":
        kw = dict(objective="power:-1")
    elif case == "threshold":
        kw = dict(objective="nll_top:1.5")
    elif case == "softcap":
        kw = dict(softcap=-3.0)
    elif case == "logit_scale":
        kw = dict(logit_scale=0.0)
    elif case == "softcap_type":
        kw = dict(softcap="30")
    elif case == "backend":
        kw = dict(backend="cuda")
    elif case == "num_items_sum":
        kw = dict(reduction="sum", num_items_in_batch=3)
    elif case == "num_items_kept":
        kw = dict(normalize="kept", num_items_in_batch=3)
    elif case == "num_items_negative":
        kw = dict(num_items_in_batch=-1)
    elif case == "num_items_type":
        kw = dict(num_items_in_batch="3")
    elif case == "num_items_shape":
        kw = dict(num_items_in_batch=torch.tensor([1, 2]))
    elif case == "ignore_index":
        kw = dict(ignore_index=-100.0)
    elif case == "shift_type":
        kw = dict(shift=1)
    elif case == "shift_0d":
        h, t, kw = h[0], t[0], dict(shift=True)
    elif case == "return_stats":
        kw = dict(return_stats="yes")
    kw.setdefault("backend", backend)
    if case in ("target_high", "target_negative") and h.device.type == "cuda":
        # CUDA does not sync to check targets: an out-of-range target makes the loss NaN (README)
        assert torch.isnan(fo.linear_objective_loss(h, w, t, b, **kw))
        return
    with pytest.raises(exc, match=match):
        fo.linear_objective_loss(h, w, t, b, **kw)


def test_float64_only_on_reference(fused_backend):
    h, w, t, _ = make_inputs(N=4, H=8, V=20, dtype=torch.float64)
    fo.linear_objective_loss(h, w, t, backend="reference")
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        fo.linear_objective_loss(h, w, t, backend=fused_backend)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="unknown objective"):
        fo.LinearObjectiveLoss("nope")
    with pytest.raises(ValueError, match="reduction"):
        fo.LinearObjectiveLoss("nll", reduction="avg")


def test_target_logprob_validates(backend):
    h, w, t, _ = make_inputs(N=4, H=8, V=20)
    with pytest.raises(ValueError, match="target shape"):
        fo.target_logprob(h, w, t[:2], backend=backend)
    with pytest.raises(ValueError, match="softcap"):
        fo.target_logprob(h, w, t, softcap=0.0, backend=backend)


# Appended by HARDEN (issue 12 items 6, 9): inputs that used to crash unclearly or pass silently.
@pytest.mark.parametrize("case,exc,match", [
    ("meta_inputs", ValueError, "meta tensor"),
    ("ignore_index_huge", ValueError, "does not fit in int64"),
    ("num_items_bool", TypeError, "num_items_in_batch must be an integer or floating tensor"),
    ("num_items_meta", ValueError, "num_items_in_batch is a meta tensor"),
    ("num_items_negative_cpu_tensor", ValueError, "num_items_in_batch must be >= 0"),
    ("num_items_nan", ValueError, "num_items_in_batch must be finite"),
    ("gate_floats", TypeError, "must return a bool tensor"),
    ("gate_shape", ValueError, "shaped like its input p"),
])
def test_bad_input_hardening(backend, case, exc, match):
    h, w, t, _ = make_inputs(N=7, H=8, V=100)
    kw = {}
    if case == "meta_inputs":
        h, w, t = h.to("meta"), w.to("meta"), t.to("meta")
    elif case == "ignore_index_huge":
        kw = dict(ignore_index=2**70)
    elif case == "num_items_bool":
        kw = dict(num_items_in_batch=torch.tensor(True))
    elif case == "num_items_meta":
        kw = dict(num_items_in_batch=torch.tensor(3, device="meta"))
    elif case == "num_items_negative_cpu_tensor":
        kw = dict(num_items_in_batch=torch.tensor(-4))
    elif case == "num_items_nan":
        kw = dict(num_items_in_batch=float("nan"))
    elif case == "gate_floats":
        kw = dict(objective=fo.Objective("float_gate", lambda l: -l, gate=lambda p: (p > 0.5).float()))
    elif case == "gate_shape":
        kw = dict(objective=fo.Objective("short_gate", lambda l: -l, gate=lambda p: p[:2] > 0.5))
    with pytest.raises(exc, match=match):
        call(backend, h, w, t, **kw)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(backend="nope"), ValueError, "unknown backend 'nope'"),
    (dict(softcap=-1), ValueError, "softcap must be"),
    (dict(ignore_index="x"), TypeError, "ignore_index must be an int"),
])
def test_module_validates_options_at_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        fo.LinearObjectiveLoss("nll", **kw)

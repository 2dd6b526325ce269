"""Every causal-LM family of the installed transformers, patched: exact, or refused with a reason, never different.

The checks are ``fused_objectives.integrations.hf_verify.check_family`` (see its docstring);
``scripts/gen_supported_models.py`` runs the same checks to write docs/supported_models.md, and this
file also asserts that the committed table claims nothing the checks do not verify.
"""
import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from fused_objectives.integrations.hf_verify import causal_lm_types, check_family  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "supported_models.md"
FAMILIES = causal_lm_types()


def _documented():
    if not DOC.exists():
        return None, {}
    text = DOC.read_text()
    version = re.search(r"on transformers (\S+), CPU", text)
    rows = dict(re.findall(r"^\| `([^`]+)` \| [^|]* \| (\w+) \|", text, flags=re.M))
    return (version.group(1) if version else None), rows


DOC_VERSION, DOC_STATUS = _documented()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # ~200 tiny models: intra-op threads only add contention (4x faster on 2 shared cores)
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("model_type,class_name", FAMILIES, ids=[mt for mt, _ in FAMILIES])
def test_family(model_type, class_name):
    r = check_family(model_type, class_name)
    assert r.status != "FAILED", f"{model_type}: {r.reason}"
    if DOC_VERSION == transformers.__version__ and model_type in DOC_STATUS:
        assert r.status == DOC_STATUS[model_type], (
            f"{model_type}: docs/supported_models.md says {DOC_STATUS[model_type]}, the check gives {r.status} "
            f"({r.reason}); rerun scripts/gen_supported_models.py")
    if r.status == "skipped":
        pytest.skip(r.reason)


def test_supported_table_is_generated_and_claims_at_least_60_exact():
    assert DOC.exists(), "run scripts/gen_supported_models.py"
    assert sum(s == "exact" for s in DOC_STATUS.values()) >= 60
    assert "FAILED" not in DOC_STATUS.values()
    if DOC_VERSION == transformers.__version__:
        assert set(DOC_STATUS) == {mt for mt, _ in FAMILIES}


def test_an_exception_after_the_model_is_built_is_failed_not_skipped(monkeypatch):
    from fused_objectives.integrations import hf_verify

    def broken(*args, **kwargs):
        raise RuntimeError("planted: set_objective broke")

    monkeypatch.setattr(hf_verify, "set_objective", broken)
    r = check_family("llama")
    assert r.status == "FAILED" and "planted: set_objective broke" in r.reason, r
    # a model that cannot be built stays "skipped", with why
    monkeypatch.setattr(hf_verify, "build_tiny", lambda mt: (_ for _ in ()).throw(KeyError("no config")))
    r = check_family("llama")
    assert r.status == "skipped" and "cannot build a tiny model" in r.reason


def test_known_refusals_are_families_of_this_transformers_and_refused_in_the_table():
    from fused_objectives.integrations.hf.refusals import KNOWN_REFUSALS

    types = {mt for mt, _ in FAMILIES}
    assert set(KNOWN_REFUSALS) <= types, set(KNOWN_REFUSALS) - types
    if DOC_VERSION == transformers.__version__:
        for mt, (reason, condition) in KNOWN_REFUSALS.items():
            if condition is None and DOC_STATUS.get(mt) != "skipped":
                assert DOC_STATUS.get(mt) == "refused", mt

import pytest
import torch

import shoptune.models as M

pytestmark = pytest.mark.slow


def test_pull_builds_cache_then_loads_without_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOPTUNE_CACHE_DIR", str(tmp_path))
    assert not M.is_cached("smollm2-135m")
    path = M.pull("smollm2-135m")
    assert (path / "model.safetensors").exists() and path.parent.name == "models"
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == ["smollm2-135m"]  # no temp left
    assert M.list_models()[0]["cached"] is True
    # From now on the GGUF is never read again.
    monkeypatch.setattr(M, "_gguf_path", lambda spec: (_ for _ in ()).throw(AssertionError("GGUF read")))
    model, tok = M.load("smollm2-135m", dtype="fp32")
    assert model.num_parameters() == 134_515_008
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    ids = tok(["Which brand is Galaxy S21?"], return_tensors="pt")
    with torch.no_grad():
        a = model(**ids).logits
    # The cache is a plain HF folder: loading it by path gives the same model.
    model2, _ = M.load(str(path), dtype="fp32")
    with torch.no_grad():
        assert torch.equal(a, model2(**ids).logits)


def test_unknown_model_and_bad_adapter_are_clear(tmp_path):
    with pytest.raises(M.ModelNotFoundError, match="not an embedded model"):
        M.resolve(tmp_path / "nothing")
    with pytest.raises(M.ModelNotFoundError, match="not a PEFT adapter folder"):
        M.load("smollm2-135m", adapter=tmp_path)
    with pytest.raises(ValueError, match="unknown dtype"):
        M.load("smollm2-135m", dtype="int3")

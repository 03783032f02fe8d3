"""check_adapter: an adapter is checked against the base before anything touches the model."""
import json
import shutil

import pytest
import torch

import shoptune.models as M

pytestmark = pytest.mark.slow  # the tiny fixtures need the real tokenizer (model cache)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from shoptune.serve.testing import make_tiny_fixtures
    return make_tiny_fixtures(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def base(tiny):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(tiny["base"]), dtype=torch.float32)


def variant(tiny, tmp_path, edit_config=None, edit_tensors=None):
    """A copy of the good adapter with its config or tensors edited."""
    from safetensors.torch import load_file, save_file
    out = tmp_path / "variant"
    shutil.copytree(tiny["good"], out)
    if edit_config:
        cfg = json.loads((out / "adapter_config.json").read_text())
        edit_config(cfg)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(out / "adapter_model.safetensors")
        save_file(edit_tensors(tensors), out / "adapter_model.safetensors")
    return out


def test_a_fitting_adapter_passes_and_nothing_is_touched(tiny, base):
    before = [(n, type(m).__name__) for n, m in base.named_modules()]
    cfg = M.check_adapter(base, tiny["good"])
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert [(n, type(m).__name__) for n, m in base.named_modules()] == before
    assert not hasattr(base, "peft_config")
    assert M.check_adapter(base.config, tiny["good"])["r"] == 4  # from the config alone (meta tensors)


def test_an_adapter_for_another_base_names_both_and_the_layer(tiny, base):
    for b in (base, base.config):
        with pytest.raises(M.AdapterMismatchError) as e:
            M.check_adapter(b, tiny["mismatch"], base_name="tiny-64")
        msg = str(e.value)
        assert msg.startswith(f"adapter {tiny['mismatch']} was trained for a different base model "
                              f"({tiny['base'].parent / 'tiny-32'}), not tiny-64: ")
        assert "model.layers.0.self_attn.q_proj has input size 64 in the base but 32 in the adapter" in msg
        assert "(and 7 more tensors)" in msg and "\n" not in msg


def test_unreadable_wrong_type_and_foreign_modules_are_refused(tiny, base, tmp_path):
    with pytest.raises(M.InvalidAdapterError, match="not a readable safetensors file"):
        M.check_adapter(base, tiny["corrupt"])
    with pytest.raises(M.InvalidAdapterError, match="a PROMPT_TUNING adapter; only LORA adapters"):
        M.check_adapter(base, tiny["prompt_tuning"])
    with pytest.raises(M.AdapterMismatchError, match=r"none of its target modules \(\['nope_proj'\]\)"):
        M.check_adapter(base, variant(tiny, tmp_path / "a", lambda c: c.update(target_modules=["nope_proj"])))
    moved = variant(tiny, tmp_path / "b", edit_tensors=lambda t: {
        k.replace("layers.1.", "layers.7."): v for k, v in t.items()})
    with pytest.raises(M.AdapterMismatchError, match="weights for model.layers.7.self_attn.[qv]_proj, a "
                                                     "module the base does not have"):
        M.check_adapter(base, moved)
    nan = variant(tiny, tmp_path / "c", edit_tensors=lambda t: {
        k: v.fill_(float("nan")) if "layers.1.self_attn.v_proj.lora_B" in k else v for k, v in t.items()})
    with pytest.raises(M.InvalidAdapterError, match="lora_B.weight has NaN or infinite values"):
        M.check_adapter(base, nan)
    empty = variant(tiny, tmp_path / "d", edit_tensors=lambda t: {"other": torch.zeros(1)})
    with pytest.raises(M.InvalidAdapterError, match="no LoRA weights"):
        M.check_adapter(base, empty)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "adapter_config.json").write_text("{not json")
    with pytest.raises(M.InvalidAdapterError, match="unreadable adapter config"):
        M.check_adapter(base, tmp_path / "e")


def test_load_with_a_foreign_adapter_is_one_clear_error(tiny):
    with pytest.raises(M.AdapterMismatchError) as e:
        M.load(str(tiny["base"]), adapter=tiny["mismatch"], dtype="fp32")
    assert len(str(e.value)) < 400 and "trained for a different base model" in str(e.value)
    model, _ = M.load(str(tiny["base"]), adapter=tiny["good"], dtype="fp32")
    from peft import PeftModel
    assert isinstance(model, PeftModel) and model.peft_config["default"].r == 4

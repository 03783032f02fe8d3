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


# ----------------------------------------------------------------------------- issue #20, item 12

def test_a_config_whose_rank_is_not_the_weights_names_tensor_shapes_and_field(tiny, base, tmp_path):
    r16 = variant(tiny, tmp_path / "a", lambda c: c.update(r=16))  # an r=16 config over r=4 tensors
    with pytest.raises(M.InvalidAdapterError) as e:
        M.check_adapter(base, r16)
    msg = str(e.value)
    assert msg.startswith(f"{r16}: its config and weights do not belong together: adapter_config.json "
                          "says r=16 but tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A."
                          "weight has rank 4 (shape (4, 64))"), msg
    assert "(and 7 more tensors)" in msg and "\n" not in msg
    pattern = variant(tiny, tmp_path / "b", lambda c: c.update(rank_pattern={"v_proj": 8}))
    with pytest.raises(M.InvalidAdapterError, match=r"says rank_pattern\['v_proj'\]=8 but tensor "
                                                    r"\S+v_proj.lora_A.weight has rank 4"):
        M.check_adapter(base, pattern)
    from shoptune.serve.testing import make_tiny_lora  # per-layer ranks that match: no complaint
    ok = make_tiny_lora(tiny["base"], tmp_path / "c", r=4, rank_pattern={"v_proj": 2})
    assert M.check_adapter(base, ok, per_row=True)["rank_pattern"] == {"v_proj": 2}


def test_load_and_eval_name_the_rank_mismatch_instead_of_a_heading(tiny, tmp_path):
    r16 = variant(tiny, tmp_path, lambda c: c.update(r=16))
    with pytest.raises(M.InvalidAdapterError) as e:
        M.load(str(tiny["base"]), adapter=r16, dtype="fp32")
    assert "says r=16 but tensor" in str(e.value) and "Error(s) in loading" not in str(e.value)


def test_load_error_line_keeps_the_first_reason_under_a_heading():
    err = RuntimeError("Error(s) in loading state_dict for PeftModel:\n\tsize mismatch for a.lora_A: "
                       "copying a param with shape [4, 64], the shape in current model is [16, 64].\n"
                       "\tsize mismatch for b.lora_A: ...\n\tsize mismatch for c.lora_A: ...")
    assert M.load_error_line(err) == ("Error(s) in loading state_dict for PeftModel: size mismatch for "
                                      "a.lora_A: copying a param with shape [4, 64], the shape in current "
                                      "model is [16, 64]. (and 2 more)")
    assert M.load_error_line(ValueError("one line")) == "one line"
    assert len(M.load_error_line(ValueError("x" * 5000))) == 400


# ----------------------------------------------------------------------------- issue #20, items 2, 3

@pytest.mark.parametrize("kind,fragment", [
    ("dora", "it is a DoRA adapter (use_dora: True), which peft cannot apply per row in a mixed batch"),
    ("modules_to_save", "it replaces whole base modules (modules_to_save: ['lm_head'])"),
])
def test_what_peft_cannot_batch_per_row_is_refused_for_serving_only(tiny, base, kind, fragment):
    with pytest.raises(M.InvalidAdapterError) as e:
        M.check_adapter(base, tiny[kind], per_row=True)
    assert str(e.value).startswith(f"{tiny[kind]}: cannot be served next to other adapters: {fragment}")
    assert str(e.value).endswith("serve it alone with --merge")
    assert M.check_adapter(base, tiny[kind])["peft_type"] == "LORA"  # eval / --merge load it alone


@pytest.mark.parametrize("edit,fragment", [
    ({"layer_replication": [[0, 2], [1, 2]]}, "replicates base layers (layer_replication)"),
    ({"target_parameters": ["mlp.up_proj.weight"]}, "targets parameters directly (target_parameters"),
    ({"trainable_token_indices": [1, 2]}, "trains token embeddings of the base (trainable_token_indices)"),
    ({"bias": "all"}, "trains the base model's biases (bias: 'all')"),
    ({"alora_invocation_tokens": [5, 6]}, "activated LoRA (alora_invocation_tokens)"),
    ({"kasa_config": {"x": 1}}, "LoRA variant (kasa_config)"),
])
def test_other_config_features_that_break_per_row_batches(tiny, base, tmp_path, edit, fragment):
    with pytest.raises(M.InvalidAdapterError, match="cannot be served next to other adapters: .*"
                       + fragment.replace("(", r"\(").replace(")", r"\)")):
        M.check_adapter(base, variant(tiny, tmp_path, lambda c: c.update(edit)), per_row=True)


def test_per_row_safe_features_pass_and_weights_are_checked_without_the_config(tiny, base, tmp_path):
    for edit in ({"use_rslora": True}, {"alpha_pattern": {"q_proj": 16}}, {"lora_dropout": 0.1},
                 {"layers_to_transform": [0, 1]}, {"modules_to_save": None, "use_dora": False}):
        M.check_adapter(base, variant(tiny, tmp_path / str(len(list(tmp_path.iterdir()))),
                                      lambda c: c.update(edit)), per_row=True)
    # a config that does not say so, but the weights do: a DoRA magnitude vector, a full lm_head
    for kind, key, what in (("dora", "lora_magnitude_vector", "a DoRA magnitude vector"),
                            ("modules_to_save", "base_model.model.lm_head.weight", "a full weight")):
        quiet = tmp_path / f"quiet-{kind}"
        shutil.copytree(tiny[kind], quiet)
        cfg = json.loads((quiet / "adapter_config.json").read_text())
        cfg.update(use_dora=False, modules_to_save=None)
        (quiet / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(M.InvalidAdapterError, match=f"its tensor \\S*{key}\\S* is {what}"):
            M.check_adapter(base, quiet, per_row=True)

"""LoRA students through peft: frozen base, adapters only, saved as an adapter and merged; gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from lmdistill.errors import ConfigError
from lmdistill.losses import HiddenStates, build_objective, fused_linear_distill, reduce_tokens
from lmdistill.models.families import build_family_model, save_family_model
from lmdistill.models.heads import linear_head_mismatch
from lmdistill.models.loading import load_causal_lm
from lmdistill.models.lora import (
    LoraSettings,
    apply_lora,
    enable_gradient_checkpointing,
    is_lora,
    save_lora_student,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, small_tokenizer):
    return save_family_model(tmp_path_factory.mktemp("lora") / "llama", "llama", small_tokenizer, seed=3, hidden=32)


def _batch(tokenizer, verses, rows=2, length=24):
    ids = [tokenizer.encode(" ".join(v for _, v in verses[i * 5:i * 5 + 5]))[:length] for i in range(rows)]
    return torch.tensor(ids)


def _lm_loss(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_adapters_start_at_the_base_and_train_alone(llama_dir, small_tokenizer, kjv_verses):
    base = load_causal_lm(llama_dir)
    ids = _batch(small_tokenizer, kjv_verses)
    with torch.no_grad():
        want = base(input_ids=ids).logits
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert is_lora(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-3] for n in trainable} == {"lora_A", "lora_B"}
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want)  # B = 0: exactly the base model

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    first = float(_lm_loss(model, ids).detach())
    for _ in range(10):
        optimizer.zero_grad()
        _lm_loss(model, ids).backward()
        optimizer.step()
    assert float(_lm_loss(model, ids).detach()) < first - 0.05
    after = model.get_base_model().state_dict()
    for key, value in frozen.items():  # the base weights never moved
        wrapped = key.replace(".q_proj.weight", ".q_proj.base_layer.weight").replace(".v_proj.weight", ".v_proj.base_layer.weight")
        torch.testing.assert_close(after[wrapped], value, rtol=0, atol=0)


def test_bad_targets_name_the_key_and_the_choices(small_tokenizer):
    model = build_family_model("qwen2", small_tokenizer)
    with pytest.raises(ConfigError, match=r"student.lora.target_modules: 'qproj' matches no linear layer.*q_proj"):
        apply_lora(model, {"target_modules": ["qproj"]})
    with pytest.raises(ConfigError, match="output layer or the embeddings"):
        apply_lora(build_family_model("qwen2", small_tokenizer), {"target_modules": ["lm_head"]})
    with pytest.raises(Exception, match="target_modules"):
        LoraSettings(target_modules=[])
    with pytest.raises(Exception, match="rank"):
        LoraSettings(rank=4)  # unknown keys are errors (the field is 'r')


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "phi3", "gpt_neox"])
def test_all_linear_on_other_families_saves_and_reloads(family, tmp_path, small_tokenizer, kjv_verses):
    """GPT-2's Conv1D, Phi-3's fused projections, GPT-NeoX's query_key_value: 'all-linear' adapts every
    projection and never the output layer; the adapter directory reloads (base + adapter merged) and equals the
    merged model saved beside it and the LoRA model itself."""
    base_dir = save_family_model(tmp_path / "base", family, small_tokenizer, seed=5)
    model = apply_lora(load_causal_lm(base_dir), LoraSettings(r=2, alpha=4))
    head = model.get_output_embeddings()
    assert not head.weight.requires_grad and type(head).__name__ in ("Linear",)
    with torch.no_grad():  # move the adapters off zero so merging matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 1000))
    ids = _batch(small_tokenizer, kjv_verses)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    written = save_lora_student(model, tmp_path / "final", small_tokenizer, save="both")
    assert written == [tmp_path / "final" / "adapter", tmp_path / "final"]
    assert (tmp_path / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert is_lora(model)  # saving merged a copy, not the model in training
    for path in written:
        reloaded = load_causal_lm(path)
        assert not is_lora(reloaded)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)


def test_adapter_with_a_missing_base_is_a_clear_error(tmp_path, small_tokenizer, llama_dir):
    import json
    import shutil

    model = apply_lora(load_causal_lm(llama_dir), {"r": 2})
    save_lora_student(model, tmp_path / "final", small_tokenizer, save="adapter")
    adapter = tmp_path / "final" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="moved-away.*not a local directory.*base_model_name_or_path"):
        load_causal_lm(adapter)
    shutil.copytree(adapter, tmp_path / "no-weights")
    (tmp_path / "no-weights" / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no adapter_model.safetensors"):
        load_causal_lm(tmp_path / "no-weights")


def test_chunked_path_is_exact_for_a_lora_student(llama_dir, small_tokenizer, kjv_verses):
    """The output layer stays a plain frozen linear layer, so the chunked loss on a LoRA student's hidden states
    gives the plain path's loss and adapter gradients, and the trainer's probe accepts it."""
    model = apply_lora(load_causal_lm(llama_dir).double(), {"r": 4, "alpha": 4}).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    teacher = build_family_model("qwen3", small_tokenizer, seed=9, dtype=torch.float64).eval()
    ids = _batch(small_tokenizer, kjv_verses, rows=1, length=30)
    labels = torch.cat([ids[0, 1:], torch.tensor([-100])])
    assert linear_head_mismatch(model, ids, lambda m: m(input_ids=ids, output_hidden_states=True).hidden_states[-1],
                                allow_transform=True) is None
    objective = build_objective("reverse_kl")
    adapters = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        t_hidden = teacher.base_model(input_ids=ids).last_hidden_state[0]
    t_weight = teacher.get_output_embeddings().weight
    want = reduce_tokens(objective.per_token(model(input_ids=ids).logits[0], t_hidden @ t_weight.T, labels), labels)
    want_grads = torch.autograd.grad(want, adapters)
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    got = fused_linear_distill(hidden, model.get_output_embeddings().weight, HiddenStates(t_hidden, t_weight), labels,
                               objective, chunk_size=8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, adapters), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(lora, llama_dir, small_tokenizer, kjv_verses):
    ids = _batch(small_tokenizer, kjv_verses)

    def gradients(checkpointing: bool):
        model = load_causal_lm(llama_dir).double()
        if lora:
            torch.manual_seed(0)  # the same random A in both runs
            model = apply_lora(model, {"r": 4})
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.fill_(0.01)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.autograd.grad(_lm_loss(model, ids), params)

    plain_model, plain = gradients(False)
    ckpt_model, ckpt = gradients(True)
    base = ckpt_model.get_base_model() if lora else ckpt_model
    assert base.is_activation_checkpointing and not getattr(plain_model, "is_activation_checkpointing", False)
    assert len(plain) == len(ckpt) > 0
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_qlora_style_bf16_base_with_float32_adapters(llama_dir, small_tokenizer, kjv_verses):
    """A frozen base in bfloat16 (half its memory) with float32 adapters trains without autocast."""
    model = apply_lora(load_causal_lm(llama_dir, dtype="bfloat16"), {"r": 4, "alpha": 8})
    dtypes = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}
    ids = _batch(small_tokenizer, kjv_verses)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    first = float(_lm_loss(model, ids).detach())
    for _ in range(10):
        optimizer.zero_grad()
        _lm_loss(model, ids).float().backward()
        optimizer.step()
    assert float(_lm_loss(model, ids).detach()) < first - 0.05


def test_adapter_state_round_trips_through_safetensors(llama_dir, tmp_path):
    """What a checkpoint of a LoRA student stores (the adapters only) restores the same model; another rank is
    refused with the keys named."""
    from safetensors.torch import load_file, save_file

    from lmdistill.models.lora import load_lora_state, lora_state

    torch.manual_seed(1)
    trained = apply_lora(load_causal_lm(llama_dir), {"r": 4})
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    state = lora_state(trained)
    assert state and all("lora_" in k for k in state)
    save_file(state, str(tmp_path / "adapters.safetensors"))
    torch.manual_seed(2)
    resumed = apply_lora(load_causal_lm(llama_dir), {"r": 4})
    load_lora_state(resumed, load_file(str(tmp_path / "adapters.safetensors")))
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    with torch.no_grad():
        torch.testing.assert_close(resumed(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="does not fit this student's adapters"):
        load_lora_state(apply_lora(load_causal_lm(llama_dir), {"r": 8, "target_modules": ["q_proj"]}), state)

"""Padding-free (packed) micro-batches give the padded loss and gradients; the checks that stop a
sequence-parallel or Liger run before any model is built say what is wrong in one line."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from config.schema import ConfigError
from test_batching import skewed_examples
from test_verl_compat import sft
from trainer.data import MicroBatch, collate
from trainer.fsdp_sft_trainer import ModelFeed, token_loss_sum
from workers import liger, sequence_parallel
from workers.packing import Layout, choose_layout, model_inputs
from helpers import ROOT


def loss_and_grads(model, fn):
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def test_packed_rows_give_the_padded_loss_and_gradients(tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples = skewed_examples(tmp_path, tok)[:8]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    batch = collate(examples, tok.pad_token_id)
    packed = ModelFeed(tok.pad_token_id, Layout(packed=True))
    inputs, targets = model_inputs(batch.input_ids, batch.attention_mask, batch.labels, tok.pad_token_id, packed.layout)
    lengths = [len(e.input_ids) for e in examples]
    assert inputs["input_ids"].shape == (1, sum(lengths)) < batch.input_ids.shape[:1] + (batch.input_ids.numel(),)
    # positions restart with each sequence; the mask keeps each sequence to itself
    assert inputs["position_ids"][0, : lengths[0] + 1].tolist() == [*range(lengths[0]), 0]
    mask = inputs["attention_mask"][0, 0]
    assert mask[lengths[0], lengths[0] - 1].item() is False and mask[lengths[0] - 1, 0].item() is True
    assert int((targets != -100).sum()) == batch.num_loss_tokens

    loss_a, grads_a = loss_and_grads(model, lambda: token_loss_sum(model, batch))
    loss_b, grads_b = loss_and_grads(model, lambda: token_loss_sum(model, batch, packed))
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Position ids alone do not keep packed sequences apart with sdpa: without the mask it differs.
    with torch.no_grad():
        exact = model(**inputs).logits[0]
        unmasked = model(**{k: v for k, v in inputs.items() if k != "attention_mask"}).logits[0]
        padded = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.attention_mask.bool()]
    assert (exact - padded).abs().max() < 1e-4 < (unmasked - padded).abs().max()


def test_packing_is_used_only_where_a_varlen_kernel_keeps_sequences_apart():
    assert choose_layout(True, "sdpa") == Layout(packed=False, varlen=False)
    assert choose_layout(True, "flash_attention_2") == Layout(packed=True, varlen=True)
    assert choose_layout(False, "flash_attention_2", sp_size=2).packed  # flash takes no padding mask: SP packs
    assert not choose_layout(False, "sdpa", sp_size=2).packed
    # The varlen path hands transformers the sequences' boundaries instead of a mask.
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    mask = (ids != 0).long()
    kwargs, targets = model_inputs(ids, mask, ids.masked_fill(mask == 0, -100), 0, Layout(packed=True, varlen=True))
    assert "attention_mask" not in kwargs and kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]
    assert kwargs["max_length_k"] == 4 and kwargs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert targets.tolist() == [[6, 7, -100, 9, -100, 2, 3, 4, -100]]


def test_sequence_parallel_size_must_divide_world_size_and_heads(tiny_model, tiny_data):
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={tiny_data['train']}", "data.train_batch_size=24"]
    with pytest.raises(ConfigError) as err:
        sft([*inputs, "ulysses_sequence_parallel_size=2"], world_size=3)
    assert str(err.value).startswith("model.ulysses_sequence_parallel_size: 2 must divide the number of processes (3)")
    cfg = sft([*inputs, "ulysses_sequence_parallel_size=2", "use_remove_padding=true"], world_size=4).config
    assert cfg.model.ulysses_sequence_parallel_size == 2 and cfg.model.use_remove_padding
    with pytest.raises(ConfigError, match=r"not divisible by .*data-parallel size 2 \(world 4 / sequence-parallel 2\)"):
        sft([*inputs, "ulysses_sequence_parallel_size=2", "data.train_batch_size=9", "data.max_token_len_per_gpu=2048"],
            world_size=4)
    for config, culprit in ((LlamaConfig(hidden_size=96, num_attention_heads=3, num_key_value_heads=3), "attention heads (3)"),
                            (LlamaConfig(num_attention_heads=4, num_key_value_heads=1), "key/value heads (1)")):
        with pytest.raises(ConfigError) as err:
            sequence_parallel.check_model(2, config, "sdpa")
        assert str(err.value) == f"model.ulysses_sequence_parallel_size=2: must divide the model's {culprit}"
    with pytest.raises(ConfigError, match=r"^model.ulysses_sequence_parallel_size=2: needs model.attn_implementation"):
        sequence_parallel.check_model(2, LlamaConfig(num_attention_heads=4), "eager")
    sequence_parallel.check_model(2, LlamaConfig(num_attention_heads=4, num_key_value_heads=2), "sdpa")


def test_liger_without_a_gpu_is_one_line_naming_the_key(tiny_model, tiny_data):
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={tiny_data['train']}"]
    assert sft([*inputs, "model.use_liger=True"]).config.model.use_liger is True  # verl's key, ours too
    with pytest.raises(ConfigError) as err:
        liger.check(True, torch.device("cpu"))
    assert str(err.value).startswith("model.use_liger=true: liger-kernel's Triton kernels need a CUDA GPU")
    assert "\n" not in str(err.value)
    liger.check(False, torch.device("cpu"))


def test_liger_fused_loss_and_the_lm_head_on_targets_never_both_run(monkeypatch, tiny_model):
    import trainer.fsdp_sft_trainer as sft

    calls = []

    def no_head_hook(*args):
        raise AssertionError("lm_head_rows ran beside liger's fused cross-entropy")

    monkeypatch.setattr(sft, "lm_head_rows", no_head_hook)
    monkeypatch.setattr(sft, "liger_token_loss_sum", lambda model, inputs, targets: calls.append(targets) or torch.tensor(2.0))
    ids = torch.tensor([[5, 6, 7, 0]])
    batch = MicroBatch(ids, (ids != 0).long(), ids.masked_fill(ids == 0, -100))
    assert token_loss_sum(None, batch, ModelFeed(0, liger=True)).item() == 2.0
    assert calls[0].tolist() == [[6, 7, -100, -100]]  # shifted targets: liger's shift_labels


@pytest.mark.parametrize("override", ["model.ulysses_sequence_parallel_size=2", "model.use_remove_padding=true",
                                      "model.use_liger=true"])  # in the RL YAML: no `+` needed
def test_the_sft_only_model_keys_are_refused_in_rl(override, tiny_model, rl_data):
    from test_verl_compat import rl

    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={rl_data['train']}", "data.train_batch_size=16"]
    with pytest.raises(ConfigError) as err:
        rl([*inputs, override], world_size=2)
    key = override.split("=")[0]
    assert str(err.value).startswith(f"{key}: ") and "not available in RL yet" in str(err.value)


class Liger060Forward(torch.nn.Module):
    """The branch logic of liger-kernel 0.6.0's patched LlamaForCausalLM.forward (read from its
    wheel), with a plain cross-entropy standing in for the Triton kernel."""

    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(4, 7, bias=False)

    def forward(self, hidden, labels=None, skip_logits=None, use_cache=None, **kwargs):
        shift_labels = kwargs.pop("shift_labels", None)
        if skip_logits is None:
            skip_logits = self.training and (labels is not None or shift_labels is not None)
        loss = logits = None
        if skip_logits:  # the fused linear cross-entropy: the loss from shift_labels, no logits
            per_token = torch.nn.functional.cross_entropy(self.lm_head(hidden).flatten(0, 1), shift_labels.flatten(),
                                                          ignore_index=-100, reduction="sum")
            loss = per_token / kwargs["num_items_in_batch"]
        else:
            logits = self.lm_head(hidden)
            if labels is not None:  # 0.6.0 computes an eval loss from labels only
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return SimpleNamespace(loss=loss, logits=logits)


def test_liger_validation_loss_is_computed_in_eval_mode_too():
    torch.manual_seed(0)
    model = Liger060Forward()
    hidden, targets = torch.randn(2, 5, 4), torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, -100]])
    want = torch.nn.functional.cross_entropy(model.lm_head(hidden).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    # Left to liger, eval mode takes the logits branch and returns no loss (the validation loss was None).
    assert model.eval()(hidden, shift_labels=targets, num_items_in_batch=1).loss is None
    for mode in (model.train(), model.eval()):
        torch.testing.assert_close(liger.liger_token_loss_sum(mode, {"hidden": hidden}, targets), want)


def test_a_liger_forward_without_a_loss_is_a_clear_error():
    class NoLoss(torch.nn.Module):
        def forward(self, **kwargs):
            return SimpleNamespace(loss=None)

    with pytest.raises(RuntimeError, match=r"liger-kernel's forward returned no loss \(eval mode; supported liger-kernel: >=0.6.0,<0.9.0\)"):
        liger.liger_token_loss_sum(NoLoss().eval(), {}, torch.zeros(1, 1, dtype=torch.long))


def test_liger_versions_outside_the_api_range_are_refused_in_one_line():
    import tomllib

    for ok in ("0.6.0", "0.7.3", "0.8.5", "0.8.5.dev2025"):
        liger.check_version(ok)
    for bad in ("0.5.10", "0.9.0", "1.0.0"):
        with pytest.raises(ConfigError, match=rf"^model.use_liger=true: liger-kernel {bad} is installed; this trainer uses the API of 0.6.0"):
            liger.check_version(bad)
    # pyproject's extra says the same range.
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["liger"]
    assert extra == [f"liger-kernel>={'.'.join(map(str, liger.SUPPORTED[0]))},<{'.'.join(map(str, liger.SUPPORTED[1][:2]))}"]

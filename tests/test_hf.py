"""Hugging Face models (pcdistill.lm.models) and the DistillationTrainer, on tiny random-init models."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from pcdistill.hf import DistillationTrainer
from pcdistill.lm.models import create_causal_lm, fusable, last_hidden_states, output_layer
from tests.helpers import run_two_processes
from tests.test_lm_distill import V_S, V_T, gemma2_softcapped, tiny_lm

CLASSES = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel,
           "qwen2": transformers.Qwen2ForCausalLM}


@pytest.mark.parametrize("config", list(CLASSES))
def test_create_causal_lm_builds_each_config(config):
    model = tiny_lm(config, vocab=V_S)
    assert type(model) is CLASSES[config]
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.get_output_embeddings().weight.shape == (V_S, 32)


def test_a_save_pretrained_folder_round_trips(tmp_path):
    model = tiny_lm("qwen2").eval()
    model.save_pretrained(tmp_path / "m")
    loaded = create_causal_lm({"path": str(tmp_path / "m")}).eval()
    assert type(loaded) is transformers.Qwen2ForCausalLM
    ids = torch.randint(0, V_S, (2, 6))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("spec,error,message", [
    ({"path": "{tmp}/nothing"}, FileNotFoundError, r"nothing is not a Hugging Face model folder: expected config"),
    ({"path": "{tmp}/only_config"}, FileNotFoundError, r"model\.safetensors"),
    ({"path": "{tmp}", "vocab_size": 3}, ValueError, r"takes no other key; got \['vocab_size'\]"),
    ({"config": "lama", "vocab_size": 10}, ValueError, r"unknown config 'lama'.*did you mean 'llama'"),
    ({"config": "llama", "hiden_size": 8, "vocab_size": 10}, ValueError, r"no key 'hiden_size'.*'hidden_size'"),
    ({"config": "llama", "hidden": 8, "vocab_size": 10}, ValueError, r"no key 'hidden'.*'hidden_size'"),  # not _act
    ({"config": "gpt2", "n_emb": 8, "vocab_size": 10}, ValueError, r"no key 'n_emb'.*'n_embd'"),
    ({"config": "gpt2", "hidden_size": 8}, ValueError, r"needs vocab_size"),
    ({"config": "gpt2", "path": "x"}, ValueError, r"exactly one of 'path'"),
    ("llama", TypeError, r"a dict with 'path' or 'config'"),
])
def test_bad_specs_are_named(tmp_path, spec, error, message):
    (tmp_path / "only_config").mkdir()
    (tmp_path / "only_config" / "config.json").write_text("{}")
    if isinstance(spec, dict) and "path" in spec:
        spec = spec | {"path": spec["path"].format(tmp=tmp_path)}
    with pytest.raises(error, match=message):
        create_causal_lm(spec)


@pytest.mark.parametrize("config", list(CLASSES))
def test_last_hidden_states_and_output_layer_give_the_models_logits(config):
    model = tiny_lm(config).eval()
    ids = torch.randint(0, V_S, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    head_outputs = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_outputs.append(o.shape))
    hidden = last_hidden_states(model, ids, mask)
    assert head_outputs == [(2, 1, V_S)]  # logits_to_keep=1: the full logits were never computed
    weight, bias = output_layer(model)
    full = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(F.linear(hidden, weight, bias), full, rtol=1e-6, atol=1e-6)
    assert fusable(model)[0]
    if config == "gpt2":
        assert weight is model.get_input_embeddings().weight  # tied


def test_fusable_names_why_not():
    ok, reason = fusable(gemma2_softcapped())
    assert not ok and "final_logit_softcapping=5.0" in reason

    class NoLinear(torch.nn.Module):
        def get_output_embeddings(self):
            return torch.nn.Identity()

    ok, reason = fusable(NoLinear())
    assert not ok and "Identity, not an nn.Linear" in reason


# -- DistillationTrainer ------------------------------------------------------------------------------

def dataset(n: int = 16, length: int = 9):
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(n):
        ids = torch.randint(0, V_S, (length,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 5] = -100  # uneven counts per sample: a mean of micro-batch means would differ
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(length, dtype=torch.long)})
    return rows


def arguments(folder, **kwargs):
    base = dict(output_dir=str(folder), max_steps=3, per_device_train_batch_size=2, learning_rate=0.5, optim="sgd",
                lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[], logging_steps=1,
                save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return transformers.TrainingArguments(**(base | kwargs))


def trainer_for(folder, student=None, teacher=None, data_size: int = 16, loss: str = "pcd", **kwargs):
    loss_options = kwargs.pop("loss_options", {"temperature": 2.0, "stages": 2})
    return DistillationTrainer(model=student or tiny_lm(), teacher_model=teacher or tiny_lm(vocab=V_T, seed=1),
                               args=arguments(folder, **kwargs), train_dataset=dataset(data_size), loss=loss,
                               loss_options=loss_options)


def test_trainer_runs_logs_the_parts_and_leaves_the_teacher_alone(tmp_path):
    teacher = tiny_lm(vocab=V_T, seed=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = trainer_for(tmp_path, teacher=teacher,
                          loss_options={"temperature": 2.0, "stages": 2, "schedule": "curriculum"})
    progress = []
    losses = trainer.distiller.losses
    trainer.distiller.losses = lambda *a, **k: progress.append(k["progress"]) or losses(*a, **k)
    trainer.train()
    assert trainer.state.global_step == 3 and progress == [0.0, 1 / 3, 2 / 3]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:  # the parts add up to the Trainer's own loss
        assert entry["loss"] == pytest.approx(entry["ce_loss"] + entry["pcd_loss"], rel=1e-5)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    assert torch.isfinite(torch.tensor(trainer.evaluate(dataset(4))["eval_loss"]))


def test_trainer_takes_a_method_of_the_table(tmp_path):
    trainer = trainer_for(tmp_path, max_steps=1, loss="jsd", loss_options={"beta": 0.3, "temperature": 2.0})
    trainer.train()
    entry = trainer.state.log_history[0]
    assert entry["jsd_loss"] > 0 and entry["loss"] == pytest.approx(entry["ce_loss"] + entry["jsd_loss"], rel=1e-5)


def test_trainer_refuses_a_teacher_of_another_vocabulary(tmp_path):
    with pytest.raises(ValueError, match="vocabulary has 300 entries and the student's 100"):
        trainer_for(tmp_path, teacher=tiny_lm(vocab=300, hidden=8))


def test_trainer_under_bf16_autocast_takes_the_fused_path_with_the_materialized_value(tmp_path):
    student = tiny_lm()
    with torch.no_grad():  # large logits: bf16 rounding of the model's own lm_head is far above 1e-3
        student.get_output_embeddings().weight.mul_(30)
    trainer = trainer_for(tmp_path, student=student, max_steps=1, bf16=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "cannot use the fused output-layer loss" would fail here
        trainer.train()
    entry = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor([entry["loss"], entry["ce_loss"], entry["pcd_loss"]])).all()
    assert [ok for ok, _ in trainer.distiller._fusable.values()] == [True, True]
    inputs = {key: torch.stack([row[key] for row in dataset(4)]) for key in dataset(1)[0]}
    values = {}
    for fused in ("always", "never"):  # never: the model's own (autocast) logits
        trainer.distiller.fused = fused
        values[fused] = trainer.compute_loss(trainer.model, inputs).item()
    assert values["always"] == pytest.approx(values["never"], rel=1e-5)


def test_gradient_accumulation_gives_the_large_batch_step(tmp_path):
    trained = {}
    for name, batch, accumulation in (("big", 4, 1), ("accumulated", 2, 2)):
        trainer = trainer_for(tmp_path / name, max_steps=1, per_device_train_batch_size=batch,
                              gradient_accumulation_steps=accumulation)
        trainer.train()
        trained[name] = trainer.model.state_dict()
        logged = trainer.state.log_history[0]
        trained[name + "_loss"] = logged["loss"]
    initial = tiny_lm().state_dict()
    for key, value in trained["big"].items():  # SGD: the update is -lr * gradient
        torch.testing.assert_close(trained["accumulated"][key] - initial[key], value - initial[key],
                                   rtol=1e-4, atol=1e-6, msg=key)
    assert trained["accumulated_loss"] == pytest.approx(trained["big_loss"], rel=1e-5)


def test_checkpoints_hold_the_student_only_and_resume(tmp_path):
    first = trainer_for(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    weights = load_file(checkpoint / "model.safetensors")
    student_keys = set(tiny_lm().state_dict())
    assert set(weights) <= student_keys and not any(t.shape[0] == V_T for t in weights.values())
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    in_optimizer = sum(len(group["params"]) for group in optimizer["param_groups"])
    assert in_optimizer == len(list(tiny_lm().parameters()))
    resumed = trainer_for(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    straight = trainer_for(tmp_path / "straight", max_steps=4)
    straight.train()
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_two_ddp_processes_take_the_one_process_steps(tmp_path):
    # 8 samples = one global batch (2 x 4, or 1 x 8): every step sees all of them, whatever the sampler's order;
    # their label counts differ, so only a loss normalised by the global token count gives the same step.
    # (FSDP: accelerate shards only on accelerators, so on CPU the Trainer would run DDP; test_lm_distill
    # checks the distiller under fully_shard on two processes.)
    options = {"data_size": 8, "per_device_train_batch_size": 4, "max_steps": 2}
    run_two_processes("hf_worker.py", json.dumps(options), str(tmp_path / "two"))
    ran = json.loads((tmp_path / "two" / "ran.json").read_text())
    assert ran == {"processes": 2, "wrapper": "DistributedDataParallel"}, ran
    two = load_file(tmp_path / "two" / "model.safetensors")
    one = trainer_for(tmp_path / "one", data_size=8, per_device_train_batch_size=8, max_steps=2)
    one.train()
    start = tiny_lm().state_dict()
    assert set(two) == set(start)
    for key, value in one.model.state_dict().items():
        assert not torch.equal(value, start[key]), key  # it trained
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_fusable_catches_a_forward_that_transforms_the_logits():
    class Scaled(transformers.LlamaForCausalLM):  # a model whose config says nothing about it
        def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
            out = super().forward(input_ids, attention_mask, logits_to_keep=logits_to_keep, **kwargs)
            out.logits = out.logits * 2
            return out

    model = tiny_lm()
    scaled = Scaled(model.config)
    ok, reason = fusable(scaled)
    assert not ok and "differ from lm_head(hidden_states[-1])" in reason
    assert fusable(model) == (True, "its logits are lm_head(hidden_states[-1]) (checked on two tokens)")
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: (args[0] / 8,))  # as MiniCPM
    ok, reason = fusable(model)
    assert not ok and "output layer's input differs from hidden_states[-1]" in reason

"""CausalLMDistiller against an independent computation on the models' own materialized logits."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file

from pcdistill.lm import distill as lm_distill
from pcdistill.lm.distill import CausalLMDistiller
from pcdistill.lm.models import create_causal_lm
from pcdistill.losses import fused_methods, get_method
from tests.helpers import run_two_processes

V_S, V_T, T = 100, 108, 2.0  # a padded teacher vocabulary (within VOCAB_TOLERANCE)


def tiny_lm(config: str = "llama", vocab: int = V_S, hidden: int = 32, seed: int = 0):
    """A random-init 2-layer causal LM (float32)."""
    torch.manual_seed(seed)
    spec = {"config": config, "hidden_size": hidden, "num_hidden_layers": 2, "num_attention_heads": 2,
            "vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0}
    if config != "gpt2":
        spec |= {"intermediate_size": 64, "num_key_value_heads": 2}
    return create_causal_lm(spec)


def batch(seed: int = 1, vocab: int = V_S):
    """input_ids, labels with -100 holes, an attention mask with right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 9), generator=g)
    labels = ids.clone()
    labels[0, 3] = labels[2, 5] = -100
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, labels, mask


def even_batch():
    """Four rows (two per process in the FSDP test) with -100 holes and padding, uneven token counts."""
    ids, labels, mask = batch(seed=3)
    more, more_labels, more_mask = batch(seed=4)
    more_labels[0, :4] = -100
    return torch.cat([ids, more[:1]]), torch.cat([labels, more_labels[:1]]), torch.cat([mask, more_mask[:1]])


def reference(student, teacher, ids, labels, mask, method, ce_weight, weight, options):
    """The loss written out on the full logits: shift, keep, CE by log-softmax gather, KD by its formula."""
    s = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    y = labels[:, 1:]
    keep = (y != -100) & mask[:, :-1].bool() & mask[:, 1:].bool()
    rows, y = s[keep], y[keep]
    ce = -torch.log_softmax(rows, -1).gather(1, y[:, None]).mean()
    out = {"ce": ce_weight * ce}
    if method == "vanilla":
        return out
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1][keep][:, :V_S]
    if method == "kd":
        log_p_s, log_p_t = torch.log_softmax(rows / T, -1), torch.log_softmax(t / T, -1)
        value = (T * T * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)).mean()
    else:  # the method's public loss on the counted rows
        entry = get_method(method)
        value = entry.loss(rows, t, *((y,) if entry.needs_target else ()), temperature=T, **options)
    out[method] = weight * value
    return out


CASES = [("vanilla", {}), ("kd", {}), ("dkd", {"beta": 2.0}), ("pcd", {"stages": 2}),
         ("pcd", {"stages": 3, "schedule": "curriculum", "progress": 0.7}), ("rkl", {}), ("jsd", {"beta": 0.3}),
         ("tvd", {})]


def test_every_fused_method_has_a_case():
    assert {m for m, _ in CASES} == set(fused_methods())


@pytest.mark.parametrize("method,options", CASES, ids=["vanilla", "kd", "dkd", "pcd", "pcd-curriculum", "rkl", "jsd",
                                                       "tvd"])
@pytest.mark.parametrize("fused", ["always", "never"])
def test_losses_and_gradients_equal_the_materialized_reference(method, options, fused):
    student, teacher = tiny_lm(), tiny_lm(vocab=V_T, hidden=48, seed=1)
    options = dict(options)
    progress = options.pop("progress", None)
    loss_options = {} if method == "vanilla" else {"temperature": T, **options}
    distiller = CausalLMDistiller(student, None if method == "vanilla" else teacher, loss=method,
                                  loss_options=loss_options, alpha=0.5, ce_weight=0.7, fused=fused)
    ids, labels, mask = batch()
    _, losses = distiller(ids, labels, attention_mask=mask, progress=progress)
    ref = reference(student, teacher, ids, labels, mask, method, 0.7, 0.5,
                    options | ({"progress": progress} if progress is not None else {}))
    assert set(losses) == set(ref)
    for name in ref:
        torch.testing.assert_close(losses[name], ref[name], rtol=1e-5, atol=1e-6)
    params = list(student.parameters())
    want = torch.autograd.grad(sum(ref.values()), params)
    sum(losses.values()).backward()
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)
    if method != "vanilla":
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("method", ["kd", "pcd"])
@pytest.mark.parametrize("fused", ["always", "never"])
def test_weighting_the_entries_weights_their_gradients(method, fused):
    """Each entry carries its own gradient (float64 models): a weighted sum of the entries has the gradient of
    the same weighted sum of CE and the distillation term computed apart on the materialized logits."""
    student, teacher = tiny_lm().double(), tiny_lm(vocab=V_T, hidden=48, seed=1).double()
    options = {"stages": 2} if method == "pcd" else {}
    distiller = CausalLMDistiller(student, teacher, loss=method, loss_options={"temperature": T, **options},
                                  alpha=0.5, ce_weight=0.7, fused=fused)
    ids, labels, mask = batch()
    params = list(student.parameters())
    for combine in (lambda parts: 2 * parts["ce"] + 3 * parts[method], lambda parts: sum(parts.values()),
                    lambda parts: parts[method]):
        _, losses = distiller(ids, labels, attention_mask=mask)
        got = torch.autograd.grad(combine(losses), params, allow_unused=True)
        ref = reference(student, teacher, ids, labels, mask, method, 0.7, 0.5, options)
        want = torch.autograd.grad(combine(ref), params, allow_unused=True)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_summed_entries_keep_one_gradient_set_with_the_same_values_and_sum_gradient():
    """``part_gradients=False`` (what the trainers use): the same entry values, CE detached, and the sum of the
    entries has the gradient of the float64 reference's sum."""
    student, teacher = tiny_lm().double(), tiny_lm(vocab=V_T, hidden=48, seed=1).double()
    distiller = CausalLMDistiller(student, teacher, loss="pcd", loss_options={"temperature": T, "stages": 2},
                                  alpha=0.5, ce_weight=0.7, fused="always", part_gradients=False)
    ids, labels, mask = batch()
    params = list(student.parameters())
    _, losses = distiller(ids, labels, attention_mask=mask)
    ref = reference(student, teacher, ids, labels, mask, "pcd", 0.7, 0.5, {"stages": 2})
    assert not losses["ce"].requires_grad
    for name in ref:
        torch.testing.assert_close(losses[name], ref[name].detach(), rtol=1e-9, atol=1e-12)
    got = torch.autograd.grad(sum(losses.values()), params)
    want = torch.autograd.grad(sum(ref.values()), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_fused_never_equals_always_and_num_items_sums():
    student, teacher = tiny_lm(), tiny_lm(vocab=V_T, hidden=48, seed=1)
    ids, labels, mask = batch(seed=3)
    results = {}
    for fused in ("always", "never"):
        distiller = CausalLMDistiller(student, teacher, loss="pcd", ce_weight=1.0, fused=fused)
        losses = distiller.losses(student, ids, labels, attention_mask=mask, num_items=5)
        grads = torch.autograd.grad(sum(losses.values()), list(student.parameters()))
        results[fused] = (losses, grads)
    (a, ga), (b, gb) = results["always"], results["never"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    counted = int(((labels[:, 1:] != -100) & mask[:, :-1].bool() & mask[:, 1:].bool()).sum())
    mean = CausalLMDistiller(student, teacher, loss="pcd").losses(student, ids, labels, attention_mask=mask)
    for name in a:  # sum over tokens / num_items equals the per-token mean x counted / num_items
        torch.testing.assert_close(a[name], mean[name] * counted / 5, rtol=1e-5, atol=1e-6)


def test_warmup_scales_the_distillation_term_and_skips_the_teacher_at_zero():
    student, teacher = tiny_lm(), tiny_lm(vocab=V_T, seed=1)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    ids, labels, mask = batch()
    distiller = CausalLMDistiller(student, teacher, loss="kd", loss_options={"temperature": T}, warmup_epochs=2.0,
                                  fused="always")
    full = distiller(ids, labels, attention_mask=mask, epoch=5.0)[1]
    half = distiller(ids, labels, attention_mask=mask, epoch=1.0)[1]
    torch.testing.assert_close(half["kd"], full["kd"] / 2)
    torch.testing.assert_close(half["ce"], full["ce"])
    calls.clear()
    zero = distiller(ids, labels, attention_mask=mask, epoch=0.0)[1]
    assert calls == [] and float(zero["kd"]) == 0.0
    torch.testing.assert_close(zero["ce"], full["ce"])
    no_ce = CausalLMDistiller(student, teacher, loss="kd", ce_weight=0.0, warmup_epochs=2.0, fused="always")
    assert {k: float(v) for k, v in no_ce(ids, labels, attention_mask=mask, epoch=0.0)[1].items()} == {"kd": 0.0}
    with pytest.raises(ValueError, match="pass epoch="):
        distiller(ids, labels)


def gemma2_softcapped(vocab: int = V_S):
    torch.manual_seed(2)
    config = transformers.Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                       final_logit_softcapping=5.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_auto_falls_back_on_softcapped_logits_and_warns_once(monkeypatch):
    monkeypatch.setattr(lm_distill, "_WARNED", set())
    student, teacher = gemma2_softcapped(), tiny_lm(vocab=V_T, seed=1)
    ids, labels, mask = batch()
    distiller = CausalLMDistiller(student, teacher, loss="kd", loss_options={"temperature": T}, ce_weight=0.7,
                                  alpha=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, losses = distiller(ids, labels, attention_mask=mask)
        distiller(ids, labels, attention_mask=mask)
    messages = [str(w.message) for w in caught if "pcdistill" in str(w.message)]
    assert len(messages) == 1
    assert "Gemma2ForCausalLM" in messages[0] and "final_logit_softcapping=5.0" in messages[0]
    assert "MiB" in messages[0]
    ref = reference(student, teacher, ids, labels, mask, "kd", 0.7, 0.5, {})  # on the softcapped logits
    for name in ref:
        torch.testing.assert_close(losses[name], ref[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fused='always' but the student Gemma2ForCausalLM cannot be fused"):
        CausalLMDistiller(student, teacher, loss="kd", fused="always")(ids, labels)


def test_teacher_is_frozen_in_eval_mode():
    student, teacher = tiny_lm(), tiny_lm(seed=1)
    teacher.train()
    CausalLMDistiller(student, teacher, loss="pcd").train()
    assert student.training and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("kwargs,message", [
    ({"loss": "pcdd"}, "unknown loss 'pcdd'.*did you mean 'pcd'"),
    ({"loss": "dist"}, "loss .dist. cannot distill a causal LM.*correlates each class"),
    ({"loss": "pcd", "loss_options": {"stagse": 2}}, "stagse.*stages"),
    ({"loss": "kd", "loss_options": {"reduction": "sum"}}, "may not set 'reduction'"),
    ({"loss": "kd", "no_teacher": True}, "needs a teacher"),
    ({"loss": "vanilla", "loss_options": {"temperature": 2.0}}, "takes no loss_options"),
    ({"loss": "kd", "fused": "yes"}, "fused must be one of auto, always, never"),
])
def test_bad_arguments_are_named(kwargs, message):
    kwargs = dict(kwargs)
    teacher = None if kwargs.pop("no_teacher", False) else torch.nn.Linear(1, 1)
    with pytest.raises((ValueError, TypeError), match=message):
        CausalLMDistiller(torch.nn.Linear(1, 1), teacher, **kwargs)


@pytest.mark.parametrize("v_s,v_t", [(128, 50_000), (128, 100), (100, 128)])
def test_vocabularies_beyond_padding_are_refused(v_s, v_t):
    student, teacher = tiny_lm(vocab=v_s, hidden=8), tiny_lm(vocab=v_t, hidden=8)
    message = rf"teacher's vocabulary has {v_t} entries and the student's {v_s}: they differ by {abs(v_s - v_t)} " \
              rf"rows.*accepted: up to 10%.*share one tokenizer"
    with pytest.raises(ValueError, match=message):
        CausalLMDistiller(student, teacher, loss="kd")
    assert CausalLMDistiller(student, None, loss="vanilla").loss == "vanilla"  # no teacher, nothing to compare


def test_bad_batch_shapes_are_named():
    distiller = CausalLMDistiller(tiny_lm(), loss="vanilla")
    with pytest.raises(ValueError, match=r"\(batch, length >= 2\); got \(2, 5\) and \(2, 4\)"):
        distiller(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_fsdp2_sharded_student_falls_back_to_materialized_logits(tmp_path, monkeypatch):
    from torch.distributed.fsdp import fully_shard

    monkeypatch.setattr(lm_distill, "_WARNED", set())
    student, teacher = tiny_lm(), tiny_lm(vocab=V_T, seed=1)
    ids, labels, mask = batch()
    unsharded = CausalLMDistiller(student, teacher, loss="kd")(ids, labels, attention_mask=mask)[1]
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student)
        with pytest.warns(UserWarning, match="sharded by FSDP"):
            sharded = CausalLMDistiller(student, teacher, loss="kd")(ids, labels, attention_mask=mask)[1]
    finally:
        torch.distributed.destroy_process_group()
    for name in unsharded:
        torch.testing.assert_close(sharded[name], unsharded[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_process_fsdp2_step_is_the_one_process_step(tmp_path):
    # the HF Trainer cannot shard on CPU (accelerate's FSDP is for accelerators), so fully_shard directly
    loss = "pcd"
    proc = run_two_processes("fsdp_worker.py", loss, str(tmp_path / "grads.safetensors"))
    # each process says once why it materializes the logits
    assert [err.count("sharded by FSDP") for err in proc.stderr] == [1, 1], proc.report()
    sharded = load_file(tmp_path / "grads.safetensors")
    student, teacher = tiny_lm(), tiny_lm(vocab=V_T, seed=1)
    ids, labels, mask = even_batch()
    total = sum(CausalLMDistiller(student, teacher, loss=loss).losses(
        student, ids, labels, attention_mask=mask, progress=0.5).values())
    grads = torch.autograd.grad(total, [p for _, p in student.named_parameters()])
    torch.testing.assert_close(sharded.pop("__loss__")[0], total.detach(), rtol=1e-5, atol=1e-6)
    names = [name for name, _ in student.named_parameters()]
    assert sorted(sharded) == sorted(names)
    for name, grad in zip(names, grads):
        torch.testing.assert_close(sharded[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_a_ddp_wrapped_student_takes_the_fused_path_through_its_forward(tmp_path):
    student, teacher = tiny_lm(), tiny_lm(vocab=V_T, seed=1)
    ids, labels, mask = batch()
    distiller = CausalLMDistiller(student, teacher, loss="pcd", fused="always")
    want = torch.autograd.grad(sum(distiller.losses(student, ids, labels, attention_mask=mask).values()),
                               list(student.parameters()))
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(student)
        calls = []
        wrapped.register_forward_hook(lambda *_: calls.append(1))
        sum(distiller.losses(wrapped, ids, labels, attention_mask=mask).values()).backward()
    finally:
        torch.distributed.destroy_process_group()
    assert calls == [1]
    for p, w in zip(student.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)


def test_no_counted_token_gives_zero_with_gradient():
    student, teacher = tiny_lm(), tiny_lm(vocab=V_T, seed=1)
    ids = torch.randint(0, V_S, (2, 5))
    labels = torch.full_like(ids, -100)
    for num_items in (None, 0, torch.tensor(0)):
        losses = CausalLMDistiller(student, teacher, loss="pcd").losses(student, ids, labels, num_items=num_items)
        total = sum(losses.values())
        assert float(total.detach()) == 0.0 and total.requires_grad
        total.backward()
        assert all(torch.all(p.grad == 0) for p in student.parameters() if p.grad is not None)


def test_fusable_is_probed_once_per_model():
    student, teacher = tiny_lm(), tiny_lm(vocab=V_T, seed=1)
    calls = []
    student.register_forward_hook(lambda *_: calls.append(1))
    distiller = CausalLMDistiller(student, teacher, loss="kd")
    ids, labels, mask = batch()
    distiller(ids, labels, attention_mask=mask)
    first = len(calls)
    distiller(ids, labels, attention_mask=mask)
    assert first == 2 and len(calls) == 3  # the probe's forward, then one per step

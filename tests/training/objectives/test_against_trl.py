"""The preference objectives against TRL, the oracle: on one fixed batch each loss and its
gradient equal TRL's (DPO and IPO through TRL's own ``DPOTrainer`` on a LoRA model, SimPO
and ORPO through the loss functions of TRL's CPO and ORPO trainers), DPO's loss at step 0
is ln 2, and the reference is exactly the model with its adapter off."""

from __future__ import annotations

import math
import tempfile
import types

import pytest
import torch

from loralab.data.pairs import encode_pair
from loralab.files.adapter_dir import load_adapter
from loralab.lora.adapters import disabled_adapters
from loralab.training.objectives import PREFERENCE_OBJECTIVES, PairLogProbs, PreferenceSettings
from loralab.training.objectives.step import (
    collate_pairs,
    load_reference_adapter,
    preference_loss,
    reference_policy,
)
from loralab.training.sequence_logps import RowLogProbs, row_log_probs
from tiny_runs import tiny_pair

RECORDS = [
    {"prompt": "Reverse cat:", "chosen": " tac", "rejected": " cat"},
    {"prompt": "Reverse lion:", "chosen": " noil", "rejected": " lion!"},
    {"prompt": "Say dog twice:", "chosen": " dog dog", "rejected": " god"},
]


def _trl_dpo(model_dir, loss_type: str, beta: float, reference: str):
    """TRL's DPOTrainer on the tiny Llama with a PEFT LoRA adapter that has moved away from
    its reference (the base for a new adapter, or the adapter it started from), its
    collated batch of ``RECORDS``, its loss there, the adapter's gradients, and the
    adapter's folders (as trained, and as it started)."""
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = tiny_pair(model_dir)
    torch.manual_seed(0)
    peft_config = PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    started = tempfile.mkdtemp()
    if reference == "start":  # TRL keeps a copy of a given adapter, named "ref"
        model = get_peft_model(model, peft_config)
        _move_b(model)
        model.save_pretrained(started)
        peft_config = None
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to=[],
        per_device_train_batch_size=len(RECORDS),
        beta=beta,
        loss_type=[loss_type],
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(RECORDS),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    _move_b(trainer.model)  # the trained adapter only: the policy leaves its reference
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(RECORDS))])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {
        name: parameter.grad.clone()
        for name, parameter in trainer.model.named_parameters()
        if parameter.requires_grad
    }
    trained = tempfile.mkdtemp()
    trainer.model.save_pretrained(trained, selected_adapters=["default"])
    return batch, loss.item(), grads, trained, started


def _move_b(peft_model) -> None:
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name and ".default." in name:
                parameter.add_(torch.randn_like(parameter) * 0.5)


def _peft_name(name: str) -> str:
    """Our factor's name as PEFT's (``….lora.default.A`` → ``….lora_A.default.weight``)."""
    for factor in ("A", "B"):
        name = name.replace(f".lora.default.{factor}", f".lora_{factor}.default.weight")
    return f"base_model.model.{name}"


@pytest.mark.parametrize("reference", ["base", "start"])
@pytest.mark.parametrize("objective", ["dpo", "ipo"])
def test_dpo_and_ipo_equal_trl_dpo_trainer_loss_and_gradient(tiny_model_dir, objective, reference):
    """Against a new adapter (the reference: the base, adapters off) and against an
    adapter given to start from (the reference: a frozen copy of it, TRL's "ref")."""
    beta = 0.5
    loss_type = {"dpo": "sigmoid", "ipo": "ipo"}[objective]
    batch, trl_loss, trl_grads, trained, started = _trl_dpo(
        tiny_model_dir, loss_type, beta, reference
    )

    model, tokenizer = tiny_pair(tiny_model_dir)
    load_adapter(model, trained)
    if reference == "start":
        load_reference_adapter(model, started)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora.default." in name)
    # Our own encoding of the records gives TRL's tokens and reply masks.
    pairs = [encode_pair(tokenizer, record, 64) for record in RECORDS]
    ours = collate_pairs(pairs, tokenizer.pad_token_id)
    width = ours["input_ids"].shape[1]
    assert torch.equal(ours["input_ids"], batch["input_ids"][:, :width])
    assert torch.equal(ours["labels"] != -100, batch["completion_mask"][:, :width].bool())

    settings = PreferenceSettings(beta=beta)
    loss, metrics = preference_loss(
        model, model, ours, PREFERENCE_OBJECTIVES[objective], settings, {"use_cache": False}
    )
    loss.backward()
    assert abs(loss.item() - trl_loss) < 1e-6
    assert abs(loss.item() - math.log(2)) > 1e-3  # a batch where the policy has moved
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            theirs = trl_grads[_peft_name(name)]
            torch.testing.assert_close(parameter.grad, theirs, atol=1e-6, rtol=0)
    assert set(metrics) >= {"rewards/chosen", "rewards/margins", "rewards/accuracies"}


def _log_probs(seed: int, pairs: int = 5):
    """Random per-pair log-probabilities (sums and token counts) that require grad."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 9, (2, pairs), generator=generator).double()
    totals = -torch.rand(2, pairs, generator=generator, dtype=torch.float64) * 3 * tokens
    totals.requires_grad_(True)
    return totals, tokens


def test_simpo_equals_trl_cpo_simpo_loss_and_gradient():
    from trl.experimental.cpo import CPOTrainer

    totals, tokens = _log_probs(1)
    settings = PreferenceSettings(beta=2.0, simpo_gamma=0.7)
    pairs = PairLogProbs(RowLogProbs(totals[0], tokens[0]), RowLogProbs(totals[1], tokens[1]))
    ours = PREFERENCE_OBJECTIVES["simpo"].loss(pairs, settings).loss
    (ours_grad,) = torch.autograd.grad(ours, totals)

    trainer = types.SimpleNamespace(
        alpha=0.0,
        beta=2.0,
        simpo_gamma=0.7,
        label_smoothing=0.0,
        loss_type="simpo",
        accelerator=types.SimpleNamespace(device="cpu"),
    )
    # TRL's CPO with loss_type simpo reads the length-averaged log-probabilities.
    losses, _, _ = CPOTrainer.cpo_loss(trainer, totals[0] / tokens[0], totals[1] / tokens[1])
    theirs = losses.mean()
    (their_grad,) = torch.autograd.grad(theirs, totals)
    assert abs(ours.item() - theirs.item()) < 1e-6
    torch.testing.assert_close(ours_grad, their_grad, atol=1e-6, rtol=0)


def test_orpo_equals_trl_odds_ratio_loss_and_gradient():
    from trl.experimental.orpo import ORPOTrainer

    totals, tokens = _log_probs(2)
    settings = PreferenceSettings(beta=0.25)
    pairs = PairLogProbs(RowLogProbs(totals[0], tokens[0]), RowLogProbs(totals[1], tokens[1]))
    ours = PREFERENCE_OBJECTIVES["orpo"].loss(pairs, settings).loss
    (ours_grad,) = torch.autograd.grad(ours, totals)

    trainer = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device="cpu"))
    losses, *_ = ORPOTrainer.odds_ratio_loss(trainer, totals[0] / tokens[0], totals[1] / tokens[1])
    nll = -totals[0].sum() / tokens[0].sum()  # the chosen replies' tokens (the paper's L_SFT)
    theirs = nll - losses.mean()  # TRL's "policy_nll_loss - losses.mean()"
    (their_grad,) = torch.autograd.grad(theirs, totals)
    assert abs(ours.item() - theirs.item()) < 1e-6
    torch.testing.assert_close(ours_grad, their_grad, atol=1e-6, rtol=0)


def test_dpo_starts_at_ln2_and_the_reference_is_the_adapter_off_model(tiny_model_dir):
    from loralab import LoraConfig, inject_adapter

    model, tokenizer = tiny_pair(tiny_model_dir)
    base_batch = collate_pairs([encode_pair(tokenizer, r, 64) for r in RECORDS], 0)
    model.requires_grad_(False)  # frozen, as under LoRA: the same (chunked) head path
    with torch.no_grad():
        base = row_log_probs(model, model, base_batch).total
    inject_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    settings = PreferenceSettings(beta=0.1)
    dpo = PREFERENCE_OBJECTIVES["dpo"]
    loss, metrics = preference_loss(model, model, base_batch, dpo, settings)
    assert abs(loss.item() - math.log(2)) < 1e-6  # B = 0: the policy is the reference
    assert metrics["rewards/margins"] == 0.0

    with torch.no_grad():  # a trained adapter: the reference is still exactly the base
        for name, parameter in model.named_parameters():
            if name.endswith(".B"):
                parameter.normal_()
        with reference_policy(model):
            reference = row_log_probs(model, model, base_batch).total
        moved = row_log_probs(model, model, base_batch).total
        with disabled_adapters(model):
            off = row_log_probs(model, model, base_batch).total
    assert torch.equal(reference, base) and torch.equal(off, base)
    assert not torch.allclose(moved, base)


def test_row_log_probs_in_chunks_equal_the_models_logits(tiny_model_dir):
    """The chunked head (and its gradient) equals a log-softmax of the model's logits."""
    from loralab import LoraConfig, inject_adapter

    model, tokenizer = tiny_pair(tiny_model_dir)
    inject_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".B"):
                parameter.normal_()
    batch = collate_pairs([encode_pair(tokenizer, r, 64) for r in RECORDS], 0)
    weights = torch.linspace(-1, 2, 2 * len(RECORDS))
    chunked = row_log_probs(model, model, batch)
    (chunked.total * weights).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    token = logits[:, :-1].log_softmax(-1).gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    plain = (token * (labels != -100)).sum(1)
    (plain * weights).sum().backward()
    torch.testing.assert_close(chunked.total, plain, atol=1e-5, rtol=0)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(ours[name], parameter.grad, atol=1e-5, rtol=1e-4)


UNPAIRED = [
    {"prompt": "Reverse cat:", "completion": " tac", "label": True},
    {"prompt": "Reverse lion:", "completion": " lion!", "label": False},
    {"prompt": "Say dog twice:", "completion": " dog dog", "label": True},
    {"prompt": "Say owl:", "completion": " lwo lwo", "label": False},
]


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_equals_trl_kto_trainer_loss_and_gradient(tiny_model_dir, weights):
    """KTO's loss, its KL estimate from mismatched pairs (each prompt with the previous
    example's completion) and its gradient equal TRL's ``KTOTrainer`` on one batch."""
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from trl import KTOConfig, KTOTrainer

    from loralab.data.pairs import encode_completions
    from loralab.training.objectives.kto import KtoSettings, kto_loss

    model, tokenizer = tiny_pair(tiny_model_dir)
    args = KTOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to=[],
        per_device_train_batch_size=len(UNPAIRED),
        beta=0.5,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
    )
    trainer = KTOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(UNPAIRED),
        processing_class=tokenizer,
        peft_config=PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    _move_b(trainer.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(UNPAIRED))])
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, batch, False)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    theirs.backward()
    trl_grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
    adapter = tempfile.mkdtemp()
    trainer.model.save_pretrained(adapter)

    ours_model, _ = tiny_pair(tiny_model_dir)
    load_adapter(ours_model, adapter)
    for name, parameter in ours_model.named_parameters():
        parameter.requires_grad_(".lora.default." in name)
    examples = encode_completions(tokenizer, UNPAIRED, 64)
    assert [e.prompt + e.completion for e in examples] == [
        row[row_mask.bool()].tolist()
        for row, row_mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    settings = KtoSettings(beta=0.5, desirable_weight=weights[0], undesirable_weight=weights[1])
    loss, metrics = kto_loss(
        ours_model, ours_model, examples, 0, settings, 64, torch.device("cpu"), {"use_cache": False}
    )
    loss.backward()
    assert abs(loss.item() - theirs.item()) < 1e-6, (loss.item(), theirs.item())
    assert metrics["kl"] >= 0
    for name, parameter in ours_model.named_parameters():
        if parameter.requires_grad:
            expected = trl_grads[_peft_name(name)]
            torch.testing.assert_close(parameter.grad, expected, atol=1e-6, rtol=0)

"""GRPO's pieces: the group advantages and the clipped surrogate against hand computation,
every loss aggregation and the KL penalty against TRL's ``GRPOTrainer`` (the oracle) in
loss and gradient, and rewards that fail for one completion."""

from __future__ import annotations

import math
import tempfile

import pytest
import torch

from loralab.files.adapter_dir import load_adapter
from loralab.training.objectives.grpo import GrpoSettings, group_advantages, grpo_loss
from loralab.training.objectives.grpo_step import Rollouts, SamplingPrompt, rollout_batch
from loralab.training.objectives.rewards import compute_rewards
from loralab.training.objectives.step import reference_policy
from loralab.training.sequence_logps import token_log_probs
from tiny_runs import tiny_pair


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    got = group_advantages(rewards, 4)
    std = math.sqrt((3 * 0.25**2 + 0.75**2) / 3)  # Bessel's correction, as TRL
    expected = [(r - 0.75) / (std + 1e-4) for r in (1.0, 0.0, 1.0, 1.0)] + [0.0] * 4
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)
    unscaled = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(unscaled, torch.tensor([0.25, -0.75, 0.25, 0.25, 0, 0, 0, 0]))
    batch_std = float(torch.tensor(rewards).std())
    torch.testing.assert_close(
        group_advantages(rewards, 4, "batch"), unscaled / (batch_std + 1e-4), atol=1e-6, rtol=0
    )


def test_a_skipped_reward_leaves_its_group_and_gets_no_advantage():
    rewards = torch.tensor([1.0, math.nan, 0.0, 1.0, math.nan, math.nan, math.nan, 2.0])
    got = group_advantages(rewards, 4)
    std = math.sqrt(((1 - 2 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)
    first = [(r - 2 / 3) / (std + 1e-4) for r in (1.0, 0.0, 1.0)]
    expected = [first[0], 0.0, first[1], first[2], 0.0, 0.0, 0.0, 0.0]  # one left: no std
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)


def test_the_clipped_surrogate_by_hand():
    settings = GrpoSettings(epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo")
    old = torch.zeros(4, 1)
    ratios = torch.tensor([[1.5], [1.5], [0.5], [0.5]])
    logps = ratios.log().requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss = grpo_loss(logps, old, advantages, torch.ones(4, 1), settings)
    # −min(ρA, clip(ρ, 0.8, 1.28)·A) for each token, then the mean over tokens
    by_hand = [-min(1.5, 1.28), -min(-1.5, -1.28), -min(0.5, 0.8), -min(-0.5, -0.8)]
    assert loss.item() == pytest.approx(sum(by_hand) / 4, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, logps)
    # the clip holds tokens 1 (ρ > 1 + ε, A > 0) and 4 (ρ < 1 − ε, A < 0): no gradient
    expected = torch.tensor([[0.0], [1.5 / 4], [-0.5 / 4], [0.0]])
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("loss_type", "divisor"),
    [("bnpo", 5.0), ("dapo", 20.0), ("dr_grpo", 2 * 8.0)],
)
def test_the_aggregations_by_hand(loss_type, divisor):
    settings = GrpoSettings(loss_type=loss_type, max_completion_length=8)
    logps = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    advantages = torch.tensor([1.0, -2.0])
    loss = grpo_loss(logps, logps, advantages, mask, settings, tokens_in_batch=20)
    assert loss.item() == pytest.approx((-1.0 * 3 + 2.0 * 2) / divisor)
    per_completion = grpo_loss(logps, logps, advantages, mask, GrpoSettings(loss_type="grpo"))
    assert per_completion.item() == pytest.approx((-1.0 + 2.0) / 2)


def _trl_grpo(model_dir, loss_type: str, beta: float, temperature: float):
    """TRL's GRPOTrainer on the tiny Llama with a PEFT LoRA adapter moved from zero."""
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = tiny_pair(model_dir)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to=[],
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        beta=beta,
        loss_type=loss_type,
        temperature=temperature,
        epsilon=0.2,
        epsilon_high=0.28,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda prompts, completions, **_: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "Say a:"}] * 8),
        processing_class=tokenizer,
        peft_config=PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    trainer.current_gradient_accumulation_steps = 1
    adapter = tempfile.mkdtemp()
    trainer.model.save_pretrained(adapter)
    return trainer, tokenizer, adapter


def _peft_name(name: str) -> str:
    for factor in ("A", "B"):
        name = name.replace(f".lora.default.{factor}", f".lora_{factor}.default.weight")
    return f"base_model.model.{name}"


@pytest.mark.parametrize(
    ("loss_type", "beta"),
    [("dapo", 0.0), ("dapo", 0.05), ("grpo", 0.05), ("bnpo", 0.0), ("dr_grpo", 0.05)],
)
def test_grpo_loss_equals_trl_grpo_trainer_in_loss_and_gradient(tiny_model_dir, loss_type, beta):
    """On one batch of 4 completions of one prompt, with π_old ≠ π (the clip at work) and
    the KL penalty to the adapter-off model: TRL's ``_compute_loss`` and ours agree."""
    temperature = 0.7
    trainer, tokenizer, adapter = _trl_grpo(tiny_model_dir, loss_type, beta, temperature)
    prompt = tokenizer("Say a:")["input_ids"]
    completions = [[40, 41, 1], [42, 43, 44, 45, 46, 1], [47], [48, 49, 50, 51]]
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])

    model, _ = tiny_pair(tiny_model_dir)
    load_adapter(model, adapter)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora.default." in name)
    rollouts = Rollouts(
        [SamplingPrompt(prompt, {"prompt": "Say a:"})] * 4,
        completions,
        torch.zeros(4),
        advantages,
        0.0,
    )
    batch = rollout_batch(rollouts, [0, 1, 2, 3], tokenizer.pad_token_id)
    start = len(prompt) - 1  # where the completion's first token is predicted
    mask = (batch["labels"][:, 1:] != -100)[:, start:]
    logps = token_log_probs(model, model, batch, temperature)[:, start:]
    generator = torch.Generator().manual_seed(0)
    old = (logps.detach() + 0.3 * torch.randn(logps.shape, generator=generator)) * mask
    with torch.no_grad(), reference_policy(model):
        reference = token_log_probs(model, model, batch, temperature)[:, start:]
    settings = GrpoSettings(
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=beta,
        loss_type=loss_type,
        max_completion_length=6,
    )
    tokens = int(mask.sum())
    ours = grpo_loss(logps, old, advantages, mask, settings, reference, tokens)
    ours.backward()

    width = mask.shape[1]
    completion_ids = batch["input_ids"][:, len(prompt) :][:, :width]
    inputs = {
        "prompt_ids": torch.tensor([prompt] * 4),
        "prompt_mask": torch.ones(4, len(prompt), dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": torch.tensor(float(tokens)),
    }
    if beta:
        inputs["ref_per_token_logps"] = reference
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-6, (ours.item(), theirs.item())
    trl_grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(
                parameter.grad, trl_grads[_peft_name(name)], atol=1e-6, rtol=0
            )


def test_a_reward_that_fails_for_one_completion_skips_it_and_goes_on():
    def picky(prompts, completions, **_):
        out = []
        for completion in completions:
            if completion == "boom":
                raise RuntimeError("cannot score boom")
            out.append(math.nan if completion == "nan" else None if completion == "none" else 1.0)
        return out

    records = [{"prompt": "p", "id": i} for i in range(5)]
    completions = ["ok", "boom", "nan", "none", "fine"]
    with pytest.warns(UserWarning, match="scoring one by one"):
        rewards = compute_rewards(picky, ["p"] * 5, completions, records)
    assert rewards[0] == 1.0 and rewards[4] == 1.0
    assert all(math.isnan(r) for r in rewards[1:4])

    def wrong_count(prompts, completions, **_):
        return [1.0]

    with pytest.warns(UserWarning, match="returned 1 rewards for 2 completions"):
        assert compute_rewards(wrong_count, ["p"] * 2, ["a", "b"], records[:2]) == [1.0, 1.0]

    def reads_columns(prompts, completions, id, **_):
        return [float(i) for i in id]

    assert compute_rewards(reads_columns, ["p"] * 3, ["a"] * 3, records[:3]) == [0.0, 1.0, 2.0]

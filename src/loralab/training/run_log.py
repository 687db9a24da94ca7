"""What a training run writes as it goes: one JSON line per logged step and evaluation
(``metrics.jsonl``), TensorBoard events if asked for, the progress bar, and the loss curve
(``loss.png``) at the end. Only the process that writes (rank 0) writes; every rank keeps
the history, which the result reports.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..lora.config import ConfigError

METRICS_FILE = "metrics.jsonl"


def check_tensorboard(requested: bool) -> None:
    """Fail before any work if TensorBoard events are asked for and cannot be written."""
    if not requested:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install 'loralab[tensorboard]'"
        ) from None


def read_history(run_dir: Path, up_to: int) -> list[dict]:
    """Metrics of the steps before a resume point; later lines (lost work) are dropped."""
    path = run_dir / METRICS_FILE
    if not path.exists() or up_to == 0:
        path.unlink(missing_ok=True)
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [entry for entry in kept if entry["step"] <= up_to]
    path.write_text("".join(json.dumps(entry) + "\n" for entry in kept))
    return kept


class RunLog:
    """The run's history, and the files and bar it goes to (where ``writes``)."""

    def __init__(
        self,
        run_dir: Path,
        history: list[dict],
        step: int,
        max_steps: int,
        writes: bool,
        tensorboard: bool = False,
        progress: bool = True,
    ) -> None:
        self.run_dir, self.history, self.writes = run_dir, history, writes
        self.writer = None
        if tensorboard and writes:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.bar = None
        if progress and writes:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, initial=step, desc="train", unit="step")

    def step(self, entry: dict, logged: bool) -> None:
        """One optimizer step's entry (step, loss, lr, tokens/s, seconds); ``logged`` on
        the steps that ``log_every`` keeps."""
        if logged:
            self._add(entry)
            if self.writer:
                self.writer.add_scalar("train/loss", entry["loss"], entry["step"])
                self.writer.add_scalar("train/lr", entry["lr"], entry["step"])
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{entry['loss']:.4f}",
                lr=f"{entry['lr']:.2e}",
                tok_s=f"{entry['tokens_per_s']:.0f}",
            )

    def validation(self, step: int, loss: float) -> None:
        self._add({"step": step, "validation_loss": loss})
        if self.writer:
            self.writer.add_scalar("validation/loss", loss, step)

    def _add(self, entry: dict) -> None:
        self.history.append(entry)
        if self.writes:
            with (self.run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.close()

    @property
    def losses(self) -> list[float]:
        return [e["loss"] for e in self.history if "loss" in e]

    @property
    def validation_losses(self) -> list[tuple[int, float]]:
        return [(e["step"], e["validation_loss"]) for e in self.history if "validation_loss" in e]

    def plot(self, path: Path) -> None:
        """The training and validation loss against the step, as a PNG; beside it, for a
        GRPO run, the mean reward of each step's completions."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rewards = [(e["step"], e["reward"]) for e in self.history if "reward" in e]
        if rewards:
            figure, (axis, right) = plt.subplots(1, 2, figsize=(10, 3.5))
            right.plot(*zip(*rewards, strict=True), linewidth=1)
            right.set_xlabel("step")
            right.set_ylabel("mean reward")
        else:
            figure, axis = plt.subplots(figsize=(6, 3.5))
        train = [(e["step"], e["loss"]) for e in self.history if "loss" in e]
        if train:
            axis.plot(*zip(*train, strict=True), label="training loss", linewidth=1)
        if self.validation_losses:
            axis.plot(*zip(*self.validation_losses, strict=True), "o-", label="validation loss")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)

"""``nfm train``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nfm_cli.choices import TRAIN_SAVE_EVERY_SECONDS
from nfm_cli.cli import WORKFLOW, command
from nfm_cli.cli.lock_guard import locked, wait_option
from nfm_cli.cli.options import Dataset, Device, Force, Model, Optimizer, Quiet, flag, positive
from nfm_cli.cli.render import console, progress_bar
from nfm_cli.data.registry import datasets_help
from nfm_cli.store.train_config import TRAIN_DEFAULTS as DEFAULT


@command("train", WORKFLOW)
def train_command(
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write (safetensors). An incomplete one "
                             "with the same config is resumed; a complete one is left alone."),
    model: Model = typer.Option(Model(DEFAULT["model"]), help="Model from the registry."),
    dataset: Dataset = typer.Option(Dataset(DEFAULT["dataset"]), help=datasets_help()),
    random_ratio: float = typer.Option(DEFAULT["random_ratio"], "--random-ratio", min=0.0, max=1.0,
                                       help="Fraction of training labels replaced by uniformly random ones "
                                       "(Sec. 6.1)."),
    epochs: int = typer.Option(DEFAULT["epochs"], min=1, help="Epochs to train (Appendix E: 50 on MNIST)."),
    batch_size: int = typer.Option(DEFAULT["batch_size"], "--batch-size", min=1, help="Minibatch size."),
    lr: float = typer.Option(DEFAULT["lr"], callback=positive, help="Learning rate."),
    optimizer: Optimizer = typer.Option(Optimizer(DEFAULT["optimizer"]), help="adam (default betas; the paper's "
                                        "Appendix E), sgd or adamw (Adam with decoupled weight decay, as ViTs are "
                                        "trained)."),
    momentum: float = typer.Option(DEFAULT["momentum"], min=0.0, help="SGD momentum in [0, 1) (sgd only; "
                                   "e.g. 0.9)."),
    weight_decay: float = typer.Option(DEFAULT["weight_decay"], "--weight-decay", min=0.0, help="L2 weight decay "
                                       "added to the gradient (torch.optim's weight_decay; default none, as in the "
                                       "paper); with adamw, the decoupled decay w <- w - lr * wd * w."),
    warmup_epochs: int = typer.Option(DEFAULT["warmup_epochs"], "--warmup-epochs", min=0, help="Raise the "
                                      "learning rate linearly from lr/steps to lr over the minibatches of the "
                                      "first E epochs (0: none)."),
    stop_at_loss: float | None = typer.Option(DEFAULT["stop_at_loss"], "--stop-at-loss", min=0.0,
                                                 help="Stop after the first epoch whose training cross-entropy is "
                                                 "at most this (e.g. 0.01, Jiang et al. 2020); --epochs stays the "
                                                 "cap."),
    seed: int = typer.Option(DEFAULT["seed"], help="Seed for init, subset, random labels and shuffling."),
    width: int | None = typer.Option(DEFAULT["width"], min=1, help="mlp: hidden width (default 512); wrn16-4: "
                                        "width factor k (4); vit-tiny: embedding width (32)."),
    depth: int | None = typer.Option(DEFAULT["depth"], min=1, help="mlp: hidden layers (default 3); wrn16-4: "
                                        "depth 6n+4 (16); vit-tiny: blocks (2)."),
    train_size: int | None = typer.Option(DEFAULT["train_size"], "--train-size", min=1, help="Seeded subset of "
                                             "the training split."),
    test_size: int | None = typer.Option(DEFAULT["test_size"], "--test-size", min=1, help="Seeded subset of the "
                                            "test split for the test accuracy (default: all)."),
    data_dir: Path | None = typer.Option(DEFAULT["data_dir"], "--data-dir", help="Folder with the dataset files "
                                            "(searched before $NFM_DATA and /usr/share/datasets/<name>)."),
    download: Annotated[bool, flag("--download", help="Allow torchvision to download the dataset.")] = False,
    device: Device = "auto",
    save_every: float = typer.Option(TRAIN_SAVE_EVERY_SECONDS, "--save-every", min=0.0, metavar="SECONDS",
                                     help="Write the checkpoint "
                                     "at most this often (and at the end, and on Ctrl-C or SIGTERM); 0 saves after "
                                     "every minibatch. Resuming is bit-identical whenever it was saved."),
    force: Force = False,
    quiet: Quiet = False,
    wait: bool = wait_option(),
) -> None:
    """Train a model with part of the labels randomized (Sec. 6.1, Appendix E), checkpointing as it goes.

    Ctrl-C or SIGTERM (e.g. a scheduler's time limit) saves the progress and exits (130 / 143); rerun
    the same command to continue exactly where it stopped.
    Prints the checkpoint path on stdout, e.g. `nfm train ... | xargs nfm measure`.
    """
    from nfm_cli.steps.train import DIVERGENCE_FACTOR, TrainConfig, train
    config = TrainConfig(model=model.value, dataset=dataset.value, width=width, depth=depth,
                         random_ratio=random_ratio, epochs=epochs, batch_size=batch_size, lr=lr,
                         optimizer=optimizer.value, momentum=momentum, weight_decay=weight_decay,
                         stop_at_loss=stop_at_loss, seed=seed, train_size=train_size, test_size=test_size,
                         data_dir=str(data_dir) if data_dir else None, warmup_epochs=warmup_epochs)
    with locked(out, wait, "nfm train"), progress_bar(quiet) as progress:
        result = train(config, out, device=device, force=force, download=download, progress=progress,
                       save_every=save_every)
    _render_result(result, out, quiet, DIVERGENCE_FACTOR)
    typer.echo(str(out))


def _render_result(result, out: Path, quiet: bool, divergence_factor: float) -> None:
    """What ``nfm train`` says on stderr about a finished, resumed or skipped run (and a divergence)."""
    m = result.metrics
    if result.status == "already complete":
        console.print(f"{out}: already complete ({result.epochs_done} epochs); use --force to retrain")
    elif not quiet:
        if result.resumed_from is not None:
            epochs, batches = result.resumed_from
            console.print(f"resumed after {epochs} epochs" + (f" and {batches} minibatches" if batches else ""))
        first = result.epochs_done - result.epochs_run + 1
        what = (f"trained epochs {first}-{result.epochs_done} in {result.session_time:.1f}s "
                f"({result.epochs_done} in all)" if result.status == "resumed"
                else f"trained {result.epochs_run} epochs in {result.session_time:.1f}s")
        console.print(f"{what}: train acc {m.get('train_acc', float('nan')):.4f}, "
                      f"test acc {m.get('test_acc', float('nan')):.4f}, gap {m.get('gap', float('nan')):.4f}",
                      highlight=False)
    if m.get("diverged"):
        loss = m.get("train_loss")
        loss_text = f"{loss:.3g}" if isinstance(loss, float) else "not finite"
        console.print(f"warning: training diverged at epoch {m.get('diverged_epoch')} (train loss {loss_text}, "
                      f"more than {divergence_factor:g} x ln(classes), the loss of a uniform guess); the checkpoint "
                      "records it and nfm measure refuses it: retrain with a smaller --lr",
                      style="yellow", markup=False, highlight=False, soft_wrap=True)

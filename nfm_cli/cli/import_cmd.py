"""``nfm import``."""
from __future__ import annotations

from pathlib import Path

import typer

from nfm_cli.choices import DATASETS
from nfm_cli.cli import WORKFLOW, command
from nfm_cli.cli.lock_guard import locked, wait_option
from nfm_cli.cli.options import Device, Force, Quiet
from nfm_cli.cli.render import console, progress_bar


@command("import", WORKFLOW)
def import_command(
    model: str = typer.Option(..., "--model", help="The architecture: a registered name (mlp, lenet, wrn16-4), "
                              "torchvision:NAME (e.g. torchvision:resnet18; architecture only, nothing is "
                              "downloaded) or MODULE:FACTORY (your importable function or nn.Module class, e.g. "
                              "mynets:make_net; it must stay importable for later steps)."),
    weights: Path = typer.Option(..., "--weights", help="The state_dict: .safetensors, or .pt/.pth/.bin loaded with "
                                 "torch.load(weights_only=True) (no code in it runs). {'state_dict': ...} / "
                                 "{'model': ...} wrappers and module. (DDP) / model. (Lightning) prefixes are undone."),
    data: str = typer.Option(..., "--data", help=f"{', '.join(DATASETS)}; "
                             "tensors:FILE.safetensors (train.x, train.y, test.x, test.y, preprocessed); or "
                             "imagefolder:DIR (DIR/train and DIR/test or DIR/val, one folder per class)."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write (refused if it exists, unless --force)."),
    model_arg: list[str] | None = typer.Option(None, "--model-arg", help="KEY=VALUE passed to the model's "
                                                  "constructor, repeatable; VALUE is a JSON literal when it parses "
                                                  "as one (10, 0.5, true, [1,2]), else a string."),
    train_size: int | None = typer.Option(None, "--train-size", help="Seeded subset of the training split "
                                             "(the samples later steps measure on; default: all)."),
    test_size: int | None = typer.Option(None, "--test-size", help="Seeded subset of the test split for "
                                            "the test accuracy (default: all)."),
    seed: int = typer.Option(0, help="Seed for the --train-size and --test-size subsets."),
    labels: Path | None = typer.Option(None, "--labels", help="safetensors file with one int64 vector: the "
                                          "labels the model was trained on, one per training sample (default: "
                                          "the dataset's)."),
    resize: int | None = typer.Option(None, "--resize", help="imagefolder: resize the shorter side to this."),
    crop: int | None = typer.Option(None, "--crop", help="imagefolder: center crop to this square size."),
    normalize: str | None = typer.Option(None, "--normalize", help="imagefolder: MEAN,STD, or per channel "
                                            "m1,m2,m3,s1,s2,s3 (applied after scaling pixels to [0, 1])."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Folder with a registered dataset's files "
                                            "(searched before $NFM_DATA and /usr/share/datasets/<name>)."),
    device: Device = "auto",
    force: Force = False,
    quiet: Quiet = False,
    wait: bool = wait_option(),
) -> None:
    """Make a checkpoint of a model trained elsewhere, so measure, hessian-diag, report, ... work on it.

    Evaluates the train and test loss and accuracy, records where code, weights and data came from
    (with content hashes), and prints the checkpoint path on stdout, e.g. `nfm import ... | xargs nfm measure`.
    """
    from nfm_cli.steps.importing import ImportConfig, import_checkpoint
    config = ImportConfig(model=model, weights=str(weights), data=data, model_args=list(model_arg or []),
                          train_size=train_size, test_size=test_size, seed=seed,
                          labels=str(labels) if labels else None, resize=resize, crop=crop, normalize=normalize,
                          data_dir=str(data_dir) if data_dir else None)
    with locked(out, wait, "nfm import"), progress_bar(quiet) as progress:
        result = import_checkpoint(config, out, device=device, force=force, progress=progress)
    m = result.metrics
    if not quiet:
        console.print(f"imported {model} ({result.num_classes} classes) on {result.samples} training samples: "
                      f"train acc {m['train_acc']:.4f}, test acc {m['test_acc']:.4f}, gap {m['gap']:.4f}")
    typer.echo(str(out))

"""The registered datasets by name: the one list that ``choices.DATASETS``, the ``--dataset`` help, the
readers (``data.datasets``: shapes, normalization, file layout, download) and ``report``'s test-split
sizes (the Hoeffding weights of the protocol) are derived from. Torch-free, so ``nfm --help`` can list
them.

Adding a dataset: one ``DatasetSpec`` here (with its file ``layout``; a new layout also needs its
reader in ``data.files`` and a branch in ``data.datasets._local_files`` / ``_read_files``), and its
tests.
"""
from __future__ import annotations

from dataclasses import dataclass

from nfm_cli.errors import NfmError

# the file layouts the readers know: IDX files (flat, or torchvision's ``<folder>/raw``), CIFAR-10's
# pickled batches (``<folder>/data_batch_1..5``, ``test_batch``), or a set made in code
LAYOUTS = ("idx", "cifar", "synthetic")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: ``name`` (the option value); ``in_channels``, ``image_size``, ``num_classes`` (the
    model's constructor arguments); ``normalization`` (per-channel mean and std of the training split
    that inputs in [0, 1] are standardised with; None: made already standardised); ``layout`` (one of
    ``LAYOUTS``); ``torchvision_folder`` (the folder torchvision's downloader writes, searched under
    each data root); ``train_size`` and ``test_size`` (the whole splits); ``download_class`` (the
    ``torchvision.datasets`` class that downloads it; None: nothing to download); ``help`` (a note for
    ``--help``, or empty)."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None
    layout: str
    torchvision_folder: str | None
    train_size: int
    test_size: int
    download_class: str | None
    help: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        """One input's shape, (channels, height, width)."""
        return (self.in_channels, self.image_size, self.image_size)


DATASET_SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("mnist", 1, 28, 10, ((0.1307,), (0.3081,)), "idx", "MNIST", 60_000, 10_000, "MNIST"),
    DatasetSpec("fashion-mnist", 1, 28, 10, ((0.2860,), (0.3530,)), "idx", "FashionMNIST", 60_000, 10_000,
                "FashionMNIST"),
    DatasetSpec("cifar10", 3, 32, 10, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), "cifar",
                "cifar-10-batches-py", 50_000, 10_000, "CIFAR10"),
    DatasetSpec("synthetic", 1, 28, 10, None, "synthetic", None, 2048, 512, None,
                "a small seeded set made in code"),
)}
DATASET_NAMES = tuple(DATASET_SPECS)


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of ``name``; an ``NfmError`` listing the valid names for an unknown one."""
    try:
        return DATASET_SPECS[name]
    except KeyError:
        raise NfmError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASET_NAMES)}") from None


def datasets_help() -> str:
    """The ``--dataset`` help text: every dataset with its input shape and classes (and its note)."""
    return "Dataset: " + "; ".join(
        f"{s.name} ({s.in_channels}x{s.image_size}x{s.image_size}, {s.num_classes} classes"
        + (f", {s.help})" if s.help else ")") for s in DATASET_SPECS.values()) + "."

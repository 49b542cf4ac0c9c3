"""nfm: normalized sharpness (Tsuzuku, Sato & Sugiyama, ICML 2020) of trained networks.

Python API (mirrors the CLI):

- ``train(TrainConfig(...), out)`` runs what ``nfm train`` runs,
- ``load_checkpoint(path)`` returns the rebuilt model, its config and metrics, and
  ``training_tensors()`` (inputs as preprocessed in training, labels exactly as trained on),
- ``import_checkpoint(ImportConfig(...), out)`` runs what ``nfm import`` runs,
- ``measure_model(model, x, y, ...)`` measures an in-memory model, returning the dict of
  ``nfm measure --json`` and writing no file.
"""
__version__ = "0.1.0"

from nfm_cli.errors import NfmError  # noqa: E402

# Imported on first use (PEP 562), so that ``import nfm_cli`` (every ``nfm`` command, ``--help``
# included) does not pay for torch until a command needs it.
_LAZY = {"Checkpoint": "nfm_cli.store.checkpoint", "load_checkpoint": "nfm_cli.store.checkpoint",
         "TrainConfig": "nfm_cli.steps.train", "TrainResult": "nfm_cli.steps.train", "train": "nfm_cli.steps.train",
         "ImportConfig": "nfm_cli.steps.importing", "ImportResult": "nfm_cli.steps.importing",
         "import_checkpoint": "nfm_cli.steps.importing", "measure_model": "nfm_cli.api"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nfm_cli' has no attribute {name!r}")

__all__ = ["Checkpoint", "ImportConfig", "ImportResult", "NfmError", "TrainConfig", "TrainResult", "import_checkpoint",
           "load_checkpoint", "measure_model", "train", "__version__"]

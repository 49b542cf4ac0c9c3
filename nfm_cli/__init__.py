"""nfm: normalized sharpness (Tsuzuku, Sato & Sugiyama, ICML 2020) of trained networks.

Python API (mirrors the CLI):

- ``train(TrainConfig(...), out)`` runs what ``nfm train`` runs,
- ``load_checkpoint(path)`` returns the rebuilt model, its config and metrics, and
  ``training_tensors()`` (inputs as preprocessed in training, labels exactly as trained on).
"""
__version__ = "0.1.0"

from nfm_cli.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from nfm_cli.errors import NfmError  # noqa: E402
from nfm_cli.training import TrainConfig, TrainResult, train  # noqa: E402

__all__ = ["Checkpoint", "NfmError", "TrainConfig", "TrainResult", "load_checkpoint", "train", "__version__"]

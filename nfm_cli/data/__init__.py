"""Data: the registered datasets, their file readers, and data specs of imported checkpoints.

* ``registry``: each dataset's shape, classes, normalization, file layout, split sizes (torch-free);
* ``datasets``: loading a split (local folders, the decoded cache, opt-in download), seeded subsets
  and random labels (Sec. 6.1);
* ``files``: IDX and CIFAR-10 files read without torchvision, and the decoded cache;
* ``specs``: ``tensors:FILE`` and ``imagefolder:DIR`` data of ``nfm import``.

Imports ``runtime/`` and ``errors`` only; never ``store/``, ``steps/`` or ``cli/``.
"""

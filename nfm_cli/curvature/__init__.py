"""Curvature: the diagonal of the Hessian of the training loss (the h of eqs. 5, 17, 59), math only.

* ``registry``: the estimators by name (class, memory factor, probes, exactness), torch-free;
* ``exact``/``rules``/``support``: the Gauss-Newton identity for piecewise-linear networks, per-layer
  rules, and the torch.fx check that a graph is piecewise linear in each weight;
* ``stochastic``: Hutchinson (eq. 60) and the paper's finite differences (Algorithm 1, eq. 61);
* ``estimators``: each estimator as a resumable sequence of work units with float64 state;
* ``losses``: ce and normalized-ce (eqs. 20-22) and their Hessians in the logits;
* ``split``: halving a batch that ran out of memory; ``batch_size``: the automatic batch size.

Imports ``runtime/`` and ``errors`` only; never ``steps/``, ``cli/`` or a file format (``store/``).
This ``__init__`` imports nothing, so the torch-free registry can be read without torch.
"""

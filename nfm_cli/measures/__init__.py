"""Measures: what is computed from a model, its weights and its curvature.

* ``registry``: every measure named, titled and described once (torch-free; ``measure``, ``report``,
  plots and README follow it);
* ``matrices``: which parameters are weight matrices of (17) (rows, columns; Sec. 5.3);
* ``variance``: the exact solver of problem (17) per matrix, and (13) in closed form;
* ``compute``: the per-layer and total measures of one model from its Hessian diagonals;
* ``fisher_rao``: the Fisher-Rao norm (eq. 25); ``rivals``: the literature's sharpness measures.

Imports ``curvature/``, ``data/``, ``runtime/`` and ``errors``; never ``steps/`` or ``cli/``.
"""

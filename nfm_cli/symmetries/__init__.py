"""Symmetries: function-preserving reparametrizations of a model's weights, found and applied.

* ``scaling``: one scaling of a slice of a parameter (rows, columns, a block of a fused matrix) and
  the plan (a list of them) that a symmetry applies;
* ``attention``: inside each attention head, query dim j x a_j with key dim j x 1/a_j, value dim j
  x b_j with input column j of the output projection x 1/b_j, for the attention modules nfm knows;
* ``layernorm``: a LayerNorm's gain and bias x c with the input columns of the Linear layers that
  alone consume its output x 1/c (found by recording one forward pass).

Normalized sharpness (eq. 17 with a variance per row and column) must not change under any of
them (Sec. 5); the Hessian trace and weight norms do. ``steps/rescale.py`` is the step that applies
them to a checkpoint and checks the function. Imports ``errors`` and ``nfm_models``; never ``steps/``
or ``cli/``; never prints.
"""

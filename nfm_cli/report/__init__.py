"""Report: runs gathered from measures files, correlations, the field's protocol scores, plots.

* ``correlations``: reading measures files' headers (no torch), grouping runs, Pearson/Spearman/Kendall,
  CSV and JSON;
* ``protocol``: Jiang et al. 2020's granulated Kendall and CMI, Dziugaite et al. 2020's robust sign error;
* ``plots``: the paper's scatter plots and Figure 1.

Imports ``store/`` (artifact headers), ``measures.registry``, ``data.registry`` (test-split sizes),
``runtime/`` and ``errors``; never ``steps/`` or ``cli/``.
"""

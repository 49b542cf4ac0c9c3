"""Steps: one module per pipeline step, what a command calls (DESIGN.md: "The pipeline").

``train`` (``nfm train``) -> ``importing`` (``nfm import``) -> ``hessian_diag`` -> ``solve``
(``solve-variance``) -> ``measure`` (both, plus Fisher-Rao and the rivals) ; ``rescale``; ``sweep``
(a grid of train + measure runs); ``report`` (``nfm report``: correlations, protocol scores, plots).
Each reads and writes artifacts through ``store/``, reports progress through a callback and raises
``NfmError`` for what the user can fix.

May import every core package (``curvature/``, ``measures/``, ``report/``, ``data/``, ``store/``, ``runtime/``); only
``cli/`` and ``api`` import ``steps/``.
"""

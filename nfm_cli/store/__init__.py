"""Store: the files between the steps, and who may write them.

``artifacts`` (the safetensors artifact format, atomic writes, output-folder checks), ``checkpoint``
(a checkpoint read back: model, data, labels as trained), ``weights`` (outside weight files, read
safely), ``model_source`` (how an imported model is rebuilt), ``locks`` (one writer per output),
``inflight`` (temp and partial files seen by ``report``), ``train_config`` (the fields of a training
run, torch-free: the train command's defaults, sweep grids, measures files and report derive from it).

Imports ``data/``, ``runtime/``, ``errors`` and ``nfm_models``; never ``steps/`` or ``cli/``.
"""

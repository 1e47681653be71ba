"""Super-resolution on the library side: loading SR models into the pipeline's SR component and ``crispdiff add-sr``
(``load.py``), and training SR models on the user's own images (the rest). The component itself, ``SpandrelSRModel``,
stays in ``pipelines/sr_model.py`` because saved folders carry it.

Pretrained Real-ESRGAN / SwinIR weights are trained on camera photos and must be downloaded; flat art (emoji,
icons, sprites) wants an SR model trained on its own kind. This package trains a small spandrel-native network
(Compact / SRVGGNet by default) on pairs made by crispdiff's own downscaling, so the result loads anywhere spandrel
does and drops into a pipeline with ``crispdiff add-sr`` or ``--sr_model_name_or_path``.
"""

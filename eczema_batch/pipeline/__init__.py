"""Pure compute: arrays in, results out. The paper's steps, one module each.

registry (model specs by name) -> loading (weights from disk, digest, load once) ->
embed (DINO CLS) -> retrieve (K nearest references) -> segment (SegGPT) -> crop (lesion box) ->
embed again. `device` and `preprocess` serve them; `tiny` builds test models; `reference` is the
plain transformers path the batched one is tested against.

Nothing here touches the catalogue, prints, or imports the CLI or Celery
(tests/test_layering.py holds that). Import the modules themselves:
`import eczema_batch.pipeline.retrieve` does not pay for torch and transformers.
"""

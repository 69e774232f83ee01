"""Use cases that train and evaluate the severity head against the catalogue.

`train` fits a head on the lesion-crop embeddings `eczema-batch run` stored and registers it;
`heads` lists heads and picks the active one; `evaluate` cross-validates the whole method by
patient, with `features` caching masks and embeddings per (image, prompt set, model identity)
and `report` turning out-of-fold predictions into numbers. The arithmetic (fitting, metrics)
lives in `pipeline.train` and `pipeline.evaluate`, which never touch the catalogue.
"""

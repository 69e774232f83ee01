"""The method bound to this machine and the catalogue, shared by `run` (jobs/) and `evaluate`
(training/): the run configuration, the loaded models (runtime), pixels from the study folders and
the process's cache of decoded prompt images. The method itself is `pipeline.measure`; what it
reads and writes in the catalogue is `catalogue.measurements`.
"""

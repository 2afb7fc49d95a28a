"""Build time: the Triton model repository written from an ONNX export.

`configs.py` makes every config.pbtxt, `builder.py` lays out the folders, `chain.py` runs
the whole chain from weights to a repository (for serve, demo and benchmarks),
`record.py` writes what a repository records of itself (repository.json), `publish.py`
copies it to object storage, and `arguments.py` turns settings dataclasses into flags.
"""

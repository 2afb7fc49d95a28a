"""Benchmarks: Triton (perf_analyzer sweep + per-stage statistics) against diffusers eager
PyTorch and a bare onnxruntime loop, on the same weights, settings and seed.

    python -m benchmarks.run --preset small --size 256 --steps 20   (or `make bench`)
"""

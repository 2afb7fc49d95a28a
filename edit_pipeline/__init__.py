"""The edit pipeline: what runs inside tritonserver, and all the serving image needs
besides Triton.

Plain Python, testable without a server: `pipeline.py` runs one edit top to bottom
(`preprocess.py` checks and decodes the request, `sampler.py` denoises, `postprocess.py`
encodes the PNG, `preview.py` draws latent previews) around four component calls; the
components run in onnxruntime (`onnxruntime_component.py`) or OpenVINO
(`openvino_component.py`), merging the requests Triton batches (`batching.py`);
`runtime_status.py` is what the model processes tell the supervisor. `triton/` holds the
thin Python backend model.py files that translate Triton's tensors and reach the
components through BLS.

It imports nothing of the build (model_repository) or of the server process (serving).
"""

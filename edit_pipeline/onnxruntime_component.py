"""An exported component run by onnxruntime inside a Python backend model.

Used by the `python-onnxruntime` flavour, where tritonserver has no onnxruntime backend.
Requests that arrive together (Triton's dynamic batcher hands the Python backend a list)
and share a shape are concatenated along the batch axis and run as one call: that is
where concurrent edits' UNet steps merge.

Memory: no session plans its activations ahead (onnxruntime's memory pattern keeps a
buffer per input shape seen, a plan per resolution), and a component called once per edit
(the encoders, the VAE) can give its arena's free chunks back after each call
(`release_activations`): at SD 1.5 size the VAE decoder's working memory at 512x512 is
about a gigabyte that would otherwise stay between edits. Their arena grows by what each
allocation asks (an arena frees a region only when all of it is free): grown by doubling
regions, the sd15 VAE encoder (its saved graph, edit_pipeline/cpu_graph.py) kept 532 MB
of anonymous memory after a 512x512 call; grown as asked, 176 MB, at the same speed
(5.64 s against 5.53 s a call). The UNet, called every step, keeps its arena. The
sessions of a process share one arena: a UNet's shallow pass (edit_pipeline/unet_passes.py)
and its one-thread sessions reuse the chunks the full pass freed, where an arena each held
the working memory of both (3.4 GB more at SD 1.5 size, 512x512, batch 3, on the plain
graph).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edit_pipeline.batching import model_feed, run_merged

if TYPE_CHECKING:
    import torch


def session_options(
    intra_op_threads: int = 0, inter_op_threads: int = 1, allow_spinning: bool = True
) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    # Idle pool threads spin before sleeping: fast hand-offs inside one model, but CPU
    # taken from models in other processes that run at the same time.
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if allow_spinning else "0"
    )
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    return options


# How the process's arena grows: None while none is registered.
_arena_grows_as_asked: list[bool | None] = [None]


def _in_process_arena(options: Any, grows_as_asked: bool = False) -> Any:
    """The session options, made to allocate from the process's one CPU arena.

    By default the arena grows by regions of twice what it holds, onnxruntime's default;
    `grows_as_asked` makes each region the size an allocation asks for, so that a region
    freed at the end of a call (release_activations) is not kept whole for one chunk
    still in use. A session takes the arena registered when it is created; a Triton
    model's process holds one kind of component.
    """
    import onnxruntime as ort

    if _arena_grows_as_asked[0] != grows_as_asked:
        cpu = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        # kSameAsRequested (1), no limit, onnxruntime's defaults for the rest.
        config = ort.OrtArenaCfg(0, 1, -1, -1) if grows_as_asked else None
        ort.create_and_register_allocator(cpu, config)
        _arena_grows_as_asked[0] = grows_as_asked
    options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def run_options(release_activations: bool) -> object:
    """Per-call options: with `release_activations`, the CPU arena returns the chunks the
    call used once it ends."""
    import onnxruntime as ort

    options = ort.RunOptions()
    if release_activations:
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class OnnxComponent:
    """One ONNX model with named inputs and outputs, runnable on merged batches."""

    def __init__(
        self,
        model_path: Path,
        intra_op_threads: int = 0,
        allow_spinning: bool = True,
        split_threads: bool = False,
        release_activations: bool = False,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        self.model_path = Path(model_path)
        self.allow_spinning = allow_spinning
        self.providers = list(providers)
        self.release_activations = release_activations
        self.session = self._new_session(intra_op_threads)
        self.run_options = run_options(release_activations)
        # Merged requests run side by side, one thread each (see run_merged).
        self.split_threads = split_threads and (os.cpu_count() or 1) > 1
        self._single_thread_sessions: list[Any] = []
        self._pool: ThreadPoolExecutor | None = None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        # The first output's channels (a UNet's noise prediction): a bound output's shape.
        channels = self.session.get_outputs()[0].shape
        self.output_channels = channels[1] if len(channels) > 1 else 0

    def _new_session(self, intra_op_threads: int) -> Any:
        import onnxruntime as ort

        options = session_options(intra_op_threads, allow_spinning=self.allow_spinning)
        options = _in_process_arena(options, grows_as_asked=self.release_activations)
        return ort.InferenceSession(str(self.model_path), options, providers=self.providers)

    def close(self) -> None:
        """Releases the sessions and the side-by-side thread pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._single_thread_sessions.clear()
        self.session = None

    def run(self, inputs: dict[str, np.ndarray], session: Any = None) -> dict[str, np.ndarray]:
        feed = model_feed(inputs, self.input_names, self.input_ranks)
        outputs = (session or self.session).run(self.output_names, feed, self.run_options)
        return dict(zip(self.output_names, outputs, strict=True))

    def run_bound(
        self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]
    ) -> None:
        """Runs on torch tensors where they lie, CPU or CUDA, writing into `outputs`.

        Nothing is copied: onnxruntime reads and writes the tensors' own memory (I/O
        binding), so a loop on a GPU keeps its tensors there between calls.
        """
        import torch

        binding = self.session.io_binding()
        for name, tensor in (*inputs.items(), *outputs.items()):
            if not tensor.is_contiguous():
                raise ValueError(f"{name}: onnxruntime binds contiguous tensors only")
            bind = binding.bind_input if name in inputs else binding.bind_output
            bind(
                name,
                tensor.device.type,
                tensor.device.index or 0,
                torch.empty((), dtype=tensor.dtype).numpy().dtype,
                tuple(tensor.shape),
                tensor.data_ptr(),
            )
        devices = {t.device for t in (*inputs.values(), *outputs.values()) if t.is_cuda}
        for device in devices:
            # onnxruntime works on its own stream: what torch queued to write inputs ends first.
            torch.cuda.current_stream(device).synchronize()
        self.session.run_with_iobinding(binding, self.run_options)

    def run_merged(self, requests: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Runs requests that arrived together; returns per-request outputs.

        By default requests with equal non-batch shapes are concatenated into one batch.
        With `split_threads`, they run side by side instead, each on a one-thread session
        of its own: on a CPU, parallel single-threaded runs do more work per second than one
        run that splits every operator over the cores (benchmarks/README.md has figures).
        """
        if self.split_threads and len(requests) > 1:
            return self._run_side_by_side(requests)
        return run_merged(requests, self.input_names, self.run)

    def _run_side_by_side(
        self, requests: Sequence[dict[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray]]:
        workers = min(len(requests), os.cpu_count() or 1)
        while len(self._single_thread_sessions) < workers:
            # Created on the first merged call: a lone request never needs them.
            self._single_thread_sessions.append(self._new_session(1))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="onnx-side-by-side")

        def work(worker: int) -> list[tuple[int, dict[str, np.ndarray]]]:
            session = self._single_thread_sessions[worker]
            return [
                (i, self.run(requests[i], session)) for i in range(worker, len(requests), workers)
            ]

        results: list[dict[str, np.ndarray] | None] = [None] * len(requests)
        for done in self._pool.map(work, range(workers)):
            for index, outputs in done:
                results[index] = outputs
        return results  # type: ignore[return-value]

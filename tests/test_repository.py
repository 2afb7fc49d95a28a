"""The repository builder: every generated config of every flavour is a valid ModelConfig."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.components import COMPONENTS
from export.onnx_export import load_manifest
from model_repository.builder import FLAVOURS, RepositoryOptions, build_repository
from pix2pix_client.contract import OUTPUTS, parameters_for

PIPELINES = ("instruct_pix2pix", "img2img")


def _fake_engines(tiny_export: Path, folder: Path) -> Path:
    """Stand-in engine files: no GPU here, and the builder only links them into place."""
    folder.mkdir()
    components = {}
    for name in load_manifest(tiny_export)["components"]:
        engine = f"{name}.trt10.0.0.sm90.plan"
        (folder / engine).write_bytes(b"not a real engine")
        components[name] = {"engine": engine}
    (folder / "engines.json").write_text(json.dumps({"components": components}))
    return folder


@pytest.fixture(scope="module", params=FLAVOURS)
def repository(request, tiny_export: Path, tmp_path_factory) -> tuple[str, Path]:
    flavour = request.param
    root = tmp_path_factory.mktemp(flavour)
    engines = _fake_engines(tiny_export, root / "engines") if flavour == "tensorrt" else None
    output = root / "repository"
    build_repository(tiny_export, output, RepositoryOptions(flavour=flavour), engines)
    return flavour, output


def _configs(repository: Path) -> dict[str, mc.ModelConfig]:
    configs = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
        assert config.name == path.parent.name
        configs[config.name] = config
    return configs


def test_every_config_parses_as_model_config(repository) -> None:
    flavour, root = repository
    configs = _configs(root)
    expected = set(COMPONENTS) | {
        "preprocess_pix2pix",
        "preprocess_img2img",
        "sampler_pix2pix",
        "sampler_img2img",
        "postprocess",
        *PIPELINES,
    }
    assert set(configs) == expected
    for name in COMPONENTS:
        config = configs[name]
        if flavour == "python-onnxruntime":
            assert config.backend == "python"
            assert (root / name / "1" / "model.py").is_file()
            assert (root / name / "1" / "model.onnx").is_file()
        elif flavour == "onnxruntime":
            assert config.platform == "onnxruntime_onnx"
            assert (root / name / "1" / "model.onnx").is_file()
        else:
            assert config.platform == "tensorrt_plan"
            assert (root / name / "1" / "model.plan").is_file()
            assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU


def test_component_configs_follow_the_specs(repository, tiny_export: Path) -> None:
    _, root = repository
    configs = _configs(root)
    manifest = load_manifest(tiny_export)
    for name, entry in manifest["components"].items():
        config = configs[name]
        spec = entry["spec"]
        assert config.max_batch_size == spec["axes"]["batch"]["max"]
        assert [i.name for i in config.input] == [t["name"] for t in spec["inputs"]]
        assert [o.name for o in config.output] == [t["name"] for t in spec["outputs"]]
        for tensor, declared in zip(config.input, spec["inputs"], strict=True):
            dims = [-1 if isinstance(d, str) else d for d in declared["dims"][1:]] or [1]
            assert list(tensor.dims) == dims
    unet = configs["unet_pix2pix"]
    assert unet.HasField("dynamic_batching")
    timestep = next(t for t in unet.input if t.name == "timestep")
    assert list(timestep.dims) == [1] and timestep.HasField("reshape")
    assert not configs["text_encoder"].HasField("dynamic_batching")


def test_ensembles_wire_existing_tensors(repository) -> None:
    """Every ensemble step reads and writes tensors its model declares, dtypes agreeing."""
    _, root = repository
    configs = _configs(root)
    for pipeline in PIPELINES:
        ensemble = configs[pipeline]
        assert ensemble.platform == "ensemble"
        assert [i.name for i in ensemble.input] == [p.name for p in parameters_for(pipeline)]
        assert all(i.optional for i in ensemble.input)
        assert [o.name for o in ensemble.output] == [name for name, _, _ in OUTPUTS]
        dtypes = {t.name: t.data_type for t in ensemble.input}
        produced: set[str] = set(dtypes)
        for step in ensemble.ensemble_scheduling.step:
            model = configs[step.model_name]
            model_inputs = {t.name: t.data_type for t in model.input}
            model_outputs = {t.name: t.data_type for t in model.output}
            for model_input, tensor in step.input_map.items():
                assert tensor in produced, f"{step.model_name} reads {tensor} before it exists"
                assert model_inputs[model_input] == dtypes[tensor], (step.model_name, tensor)
            for model_output, tensor in step.output_map.items():
                dtypes[tensor] = model_outputs[model_output]
                produced.add(tensor)
        for output in ensemble.output:
            assert output.name in produced and dtypes[output.name] == output.data_type


def test_python_models_are_thin_and_carry_their_assets(repository) -> None:
    _, root = repository
    for pipeline in ("pix2pix", "img2img"):
        assert (
            root / f"preprocess_{pipeline}" / "1" / "tokenizer" / "tokenizer_config.json"
        ).is_file()
        assert (root / f"sampler_{pipeline}" / "1" / "scheduler_config.json").is_file()
    for model_file in root.glob("*/1/model.py"):
        assert len(model_file.read_text().splitlines()) < 110, model_file


def test_tensorrt_flavour_needs_engines(tiny_export: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="needs --engines"):
        build_repository(tiny_export, tmp_path / "repo", RepositoryOptions(flavour="tensorrt"))


def test_tensorrt_flavour_rejects_images_outside_the_engine_profile(repository) -> None:
    flavour, root = repository
    config = _configs(root)["preprocess_pix2pix"]
    expected = "256" if flavour == "tensorrt" else "8"
    assert config.parameters["min_image_side"].string_value == expected


def test_unknown_flavour_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="allowed one of python-onnxruntime, onnxruntime, tensorrt"
    ):
        build_repository(tiny_export, tmp_path / "repo", RepositoryOptions(flavour="openvino"))


def test_sampler_runs_next_to_its_unet(repository) -> None:
    # The loop's tensors never change device: the sampler instance sits where the UNet
    # does, and takes its inputs where the encoders left them instead of copied to the CPU.
    flavour, root = repository
    configs = _configs(root)
    expected = {
        "python-onnxruntime": mc.ModelInstanceGroup.KIND_CPU,
        "onnxruntime": mc.ModelInstanceGroup.KIND_AUTO,
        "tensorrt": mc.ModelInstanceGroup.KIND_GPU,
    }[flavour]
    for pipeline in ("pix2pix", "img2img"):
        sampler = configs[f"sampler_{pipeline}"]
        unet = configs[f"unet_{pipeline}"]
        assert sampler.instance_group[0].kind == expected
        assert unet.instance_group[0].kind in (expected, mc.ModelInstanceGroup.KIND_CPU)
        if flavour != "python-onnxruntime":
            assert unet.instance_group[0].kind == expected
        assert sampler.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    # Postprocess encodes PNGs on the CPU: its input is copied there, as it must be.
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in configs["postprocess"].parameters

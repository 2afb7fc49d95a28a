"""The repository builder: every generated config of every flavour is a valid ModelConfig."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from edit_pipeline.component_inputs import Bounds, InputBounds
from edit_pipeline.openvino_component import bf16_unsupported_reason
from edit_pipeline.runtime_status import CANCEL_TOKEN_INPUT, FAILURE_OUTPUT
from export.components import (
    COMPONENTS,
    DEEP_FEATURES,
    SHALLOW_SUFFIX,
    UNET_FOR_PIPELINE,
    ComponentSpec,
    shallow_unet,
)
from export.onnx_export import load_manifest
from model_repository.builder import build_repository
from model_repository.configs import (
    AUTO,
    FLAVOURS,
    MAX_DERIVED_EDIT_INSTANCES,
    OPENVINO_FLAVOURS,
    PYTHON_FLAVOURS,
    READINESS_MODEL,
    RepositoryOptions,
    derived_edit_instances,
    input_bounds,
)
from model_repository.record import REPOSITORY_RECORD
from pix2pix_client.contract import (
    OUTPUTS,
    STREAM_OUTPUTS,
    InvalidArgumentError,
    parameters_for,
    stream_model,
)

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
    # fp32 in the openvino flavours whatever this CPU computes (auto is bf16 where it has
    # native bf16); bf16 is built by its own test below.
    precision = "fp32" if flavour in OPENVINO_FLAVOURS else AUTO
    options = RepositoryOptions(flavour=flavour, precision=precision)
    build_repository(tiny_export, output, options, engines)
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
    streams = {stream_model(pipeline) for pipeline in PIPELINES}
    # The python flavours serve a UNet's shallow pass from the UNet's own model.
    hosted = flavour in PYTHON_FLAVOURS
    shallow = {shallow_unet(unet) for unet in UNET_FOR_PIPELINE.values()}
    components = {*COMPONENTS, *(set() if hosted else shallow)}
    assert set(configs) == {*components, *PIPELINES, *streams, READINESS_MODEL}
    for unet in UNET_FOR_PIPELINE.values():
        assert (root / unet / "1" / "shallow" / "model.onnx").is_file() == hosted
    for name in components:
        config = configs[name]
        if flavour == "python-onnxruntime":
            assert config.backend == "python"
            assert (root / name / "1" / "model.py").is_file()
            assert (root / name / "1" / "model.onnx").is_file()
        elif flavour == "python-openvino":
            assert config.backend == "python"
            assert config.parameters["precision"].string_value == "fp32"
            assert (root / name / "1" / "model.py").is_file()
            assert (root / name / "1" / "model.onnx").is_file()
            # Working memory given back after each call: once-per-edit components, and a
            # UNet's shallow pass, never its full one, which gives it back once idle.
            is_unet = name in UNET_FOR_PIPELINE.values()
            released = {
                "release_activations": str(int(not is_unet)),
                "release_shallow_activations": str(int(is_unet)),
                "release_after_idle_s": str(RepositoryOptions().unet_idle_release_s)
                if is_unet
                else "0",
            }
            for parameter, value in released.items():
                assert config.parameters[parameter].string_value == value, name
        elif flavour == "onnxruntime":
            assert config.platform == "onnxruntime_onnx"
            assert (root / name / "1" / "model.onnx").is_file()
        elif flavour == "openvino":
            # The NGC container's OpenVINO backend reads the plain ONNX file itself (fp32).
            assert config.backend == "openvino" and config.default_model_filename == "model.onnx"
            assert (root / name / "1" / "model.onnx").is_file()
            assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
            assert config.parameters["PERFORMANCE_HINT"].string_value == "LATENCY"
            assert "HINT_BF16" not in config.parameters
        else:
            assert config.platform == "tensorrt_plan"
            assert (root / name / "1" / "model.plan").is_file()
            assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU


def test_component_configs_follow_the_specs(repository, tiny_export: Path) -> None:
    flavour, root = repository
    configs = _configs(root)
    manifest = load_manifest(tiny_export)
    # Triton's OpenVINO backend takes only a batch of max_batch_size: its components have
    # none, the batch axis is a dim of the model's own (configs.component_config).
    batched = flavour != "openvino"
    hosted = flavour in PYTHON_FLAVOURS
    for name, entry in manifest["components"].items():
        if name.endswith(SHALLOW_SUFFIX) and hosted:
            continue
        config = configs[name]
        spec = entry["spec"]
        inputs = spec["inputs"]
        if hosted and name in UNET_FOR_PIPELINE.values():
            # The shallow pass's deep features: one more input, optional.
            shallow = manifest["components"][shallow_unet(name)]["spec"]
            inputs = [*inputs, shallow["inputs"][-1]]
            assert [i.name for i in config.input if i.optional] == [DEEP_FEATURES]
        assert config.max_batch_size == (spec["axes"]["batch"]["max"] if batched else 0)
        assert [i.name for i in config.input] == [t["name"] for t in inputs]
        assert [o.name for o in config.output] == [t["name"] for t in spec["outputs"]]
        if hosted:  # the inputs edits send, refused past them (test_hardening)
            bounds = json.loads(config.parameters["input_bounds"].string_value)
            assert list(bounds["inputs"]) == [t["name"] for t in inputs]
        for tensor, declared in zip(config.input, inputs, strict=True):
            dims = [-1 if isinstance(d, str) else d for d in declared["dims"]]
            dims = dims[1:] if batched else dims
            assert list(tensor.dims) == (dims if len(declared["dims"]) > 1 else [*dims, 1])
    unet = configs["unet_pix2pix"]
    assert unet.HasField("dynamic_batching") == batched
    timestep = next(t for t in unet.input if t.name == "timestep")
    # A [batch] tensor travels as [batch, 1], what the edit models send in every flavour.
    assert list(timestep.dims) == ([1] if batched else [-1, 1]) and timestep.HasField("reshape")
    assert not configs["text_encoder"].HasField("dynamic_batching")


def test_the_input_bounds_are_those_of_the_images_and_prompts_edited(tiny_export: Path) -> None:
    """At most 300 pixels a side: 296 once floored to the tiny VAE's factor of 8, latents
    of 1 to 37; batches up to the spec's; a tensor's dims name its axes; token ids below
    the vocabulary's size."""
    manifest = load_manifest(tiny_export)
    specs = {
        name: ComponentSpec.from_json(entry["spec"])
        for name, entry in manifest["components"].items()
    }
    limits = RepositoryOptions(max_image_side=300).image_limits(8)
    unet = input_bounds(specs["unet_pix2pix"], limits)
    assert unet.dims == {
        "sample": ("batch", 8, "latent_height", "latent_width"),
        "timestep": ("batch",),
        "encoder_hidden_states": ("batch", 77, 32),
    }
    latent = Bounds(1, 37)
    assert unet.axes == {"batch": Bounds(1, 6), "latent_height": latent, "latent_width": latent}
    assert unet.values == {}
    vae = input_bounds(specs["vae_encoder"], limits)
    assert vae.axes["height"] == vae.axes["width"] == Bounds(8, 296, 8)
    text = input_bounds(specs["text_encoder"], limits)
    assert text.axes == {"batch": Bounds(1, 2)}
    vocabulary = manifest["dimensions"]["text_vocab_size"]
    assert text.values == {"input_ids": Bounds(0, vocabulary - 1)}
    for bounds in (unet, text):
        assert InputBounds.from_json(json.loads(json.dumps(bounds.to_json()))) == bounds
    # A repository built before values were bounded (input_shapes) keeps its shapes.
    written_before = {key: value for key, value in text.to_json().items() if key != "values"}
    assert InputBounds.from_json(written_before) == replace(text, values={})


@pytest.mark.parametrize(
    ("shapes", "words"),
    [
        ({"sample": (1, 8, 37, 37), "timestep": (1, 1)}, None),
        ({"sample": (7, 8, 4, 4)}, "sample has shape [7, 8, 4, 4]: batch 7, allowed 1..6 ("),
        (
            {"sample": (1, 8, 38, 4)},
            "sample has shape [1, 8, 38, 4]: latent_height 38, allowed 1..37 (the shapes",
        ),
        ({"sample": (1, 8, 4, 0)}, "sample has shape [1, 8, 4, 0]: latent_width 0, allowed 1..37"),
        (
            {"sample": (2, 8, 4, 4), "timestep": (3, 1)},
            "timestep has shape [3, 1]: batch 3 where sample has 2: allowed the same",
        ),
    ],
)
def test_input_bounds_refuse_shapes_no_edit_sends(
    tiny_export: Path, shapes: dict[str, tuple[int, ...]], words: str | None
) -> None:
    spec = ComponentSpec.from_json(load_manifest(tiny_export)["components"]["unet_pix2pix"]["spec"])
    checked = input_bounds(spec, RepositoryOptions(max_image_side=300).image_limits(8))
    feed = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    if words is None:
        checked.check(feed)
        return
    with pytest.raises(InvalidArgumentError) as refused:
        checked.check(feed)
    assert refused.value.field == next(iter(words.split()))
    assert words in str(refused.value)


def test_input_bounds_refuse_token_ids_past_the_vocabulary(tiny_export: Path) -> None:
    """onnxruntime fails on a token id past the vocabulary (an INTERNAL error, as if the
    server had a bug) and OpenVINO embeds it as a vector of its own making: both ends are
    refused, naming the input and the ids allowed."""
    manifest = load_manifest(tiny_export)
    spec = ComponentSpec.from_json(manifest["components"]["text_encoder"]["spec"])
    checked = input_bounds(spec, RepositoryOptions().image_limits(8))
    last = manifest["dimensions"]["text_vocab_size"] - 1
    ids = np.zeros((2, 77), np.int32)
    ids[1, :3] = [0, last, 7]
    checked.check({"input_ids": ids})
    for value in (last + 1, -1, np.iinfo(np.int32).max):
        ids[1, 5] = value
        with pytest.raises(InvalidArgumentError) as refused:
            checked.check({"input_ids": ids})
        assert refused.value.field == "input_ids"
        assert f"input_ids holds {value}: allowed 0..{last}" in str(refused.value)
        ids[1, 5] = 0


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streaming"])
def test_edit_models_take_the_contract(repository, streaming: bool) -> None:
    """The models clients call: the contract's inputs (all optional to Triton, so the
    model names a missing one itself) and outputs, with wire types matching; the
    streaming models are decoupled and take the preview interval too."""
    _, root = repository
    configs = _configs(root)
    for pipeline in PIPELINES:
        config = configs[stream_model(pipeline) if streaming else pipeline]
        assert config.backend == "python" and config.max_batch_size == 0
        assert config.model_transaction_policy.decoupled == streaming
        parameters = parameters_for(pipeline, streaming)
        assert ("preview_every" in {p.name for p in parameters}) == streaming
        # The streaming model also takes the token its forwarding unary model sends.
        internal = [CANCEL_TOKEN_INPUT] if streaming else []
        assert [i.name for i in config.input] == [p.name for p in parameters] + internal
        assert all(i.optional and list(i.dims) == [1] for i in config.input)
        for tensor, parameter in zip(config.input, parameters, strict=False):
            wire = "STRING" if parameter.wire_type == "BYTES" else parameter.wire_type
            assert mc.DataType.Name(tensor.data_type) == f"TYPE_{wire}"
        outputs = [name for name, _, _ in (STREAM_OUTPUTS if streaming else OUTPUTS)]
        # ...and fails a forwarded edit with an output of its own.
        internal = [FAILURE_OUTPUT] if streaming else []
        assert [o.name for o in config.output] == outputs + internal


def test_edit_models_call_components_by_the_names_of_the_specs(
    repository, tiny_export: Path
) -> None:
    """pipeline.json names every component call with the specs' tensor names, and those
    tensors exist in the component configs: a renamed tensor fails here."""
    _, root = repository
    configs = _configs(root)
    specs = load_manifest(tiny_export)["components"]
    for pipeline in PIPELINES:
        settings = json.loads((root / stream_model(pipeline) / "1" / "pipeline.json").read_text())
        assert settings["pipeline"] == pipeline
        assert settings["components"]["unet"]["model"] == UNET_FOR_PIPELINE[pipeline]
        shallow = settings["components"]["unet_shallow"]
        assert shallow["component"] == shallow_unet(UNET_FOR_PIPELINE[pipeline])
        for call in settings["components"].values():
            spec = specs[call["component"]]["spec"]
            assert call["inputs"] == [t["name"] for t in spec["inputs"]]
            assert call["outputs"] == [t["name"] for t in spec["outputs"]]
            config = configs[call["model"]]
            assert set(call["inputs"]) <= {t.name for t in config.input}
            assert set(call["outputs"]) <= {t.name for t in config.output}


def test_edit_models_hold_a_bounded_number_of_edits(repository) -> None:
    _, root = repository
    recorded = json.loads((root / REPOSITORY_RECORD).read_text())["options"]
    # Derived when not given, and recorded as derived.
    assert RepositoryOptions().edit_instances == 0
    assert 1 <= recorded["edit_instances"] <= MAX_DERIVED_EDIT_INSTANCES
    for name in (*PIPELINES, *map(stream_model, PIPELINES)):
        config = _configs(root)[name]
        assert sum(group.count for group in config.instance_group) == recorded["edit_instances"]
        policy = config.dynamic_batching.default_queue_policy
        assert policy.max_queue_size == recorded["max_edits"] - recorded["edit_instances"]


GB = 10**9
SD15_FP32 = {"served_weight_bytes": int(7.7 * GB), "unet_weight_bytes": int(3.4 * GB)}


@pytest.mark.parametrize(
    ("cores", "memory_gb", "weights", "edit_models", "expected"),
    [
        (2, 24, SD15_FP32, 4, 1),  # this machine: one edit per model
        (32, 24, SD15_FP32, 4, 1),  # the cores allow 4; the memory holds one
        (32, 64, SD15_FP32, 4, 4),  # both allow 4
        (32, 32, SD15_FP32, 4, 2),  # the memory holds two per edit model
        (16, 512, SD15_FP32, 4, 2),  # the cores allow 2
        (128, 512, SD15_FP32, 4, MAX_DERIVED_EDIT_INSTANCES),  # never more than the cap
        (32, 8, SD15_FP32, 4, 1),  # too small for the rule: still one, not none
    ],
)
def test_edit_instances_come_from_cores_memory_and_model_size(
    cores: int, memory_gb: int, weights: dict, edit_models: int, expected: int
) -> None:
    options = RepositoryOptions(flavour="python-onnxruntime", precision="fp32")
    derived = derived_edit_instances(
        options, **weights, edit_models=edit_models, cores=cores, memory_bytes=memory_gb * GB
    )
    assert derived == expected
    # Larger images need more working memory per edit: never more instances.
    larger = RepositoryOptions(flavour="python-onnxruntime", precision="fp32", max_image_side=1024)
    assert (
        derived_edit_instances(
            larger, **weights, edit_models=edit_models, cores=cores, memory_bytes=memory_gb * GB
        )
        <= derived
    )
    # max_edits bounds them too: one place in the queue is left.
    few = RepositoryOptions(flavour="python-onnxruntime", precision="fp32", max_edits=2)
    assert (
        derived_edit_instances(
            few, **weights, edit_models=edit_models, cores=cores, memory_bytes=memory_gb * GB
        )
        == 1
    )


def test_auto_picks_bf16_openvino_only_where_the_cpu_computes_bf16(monkeypatch) -> None:
    import model_repository.configs as configs

    cases = {
        # (flavour, precision) asked -> chosen on a bf16 CPU, chosen elsewhere
        ("auto", "auto"): (("python-openvino", "bf16"), ("python-onnxruntime", "fp32")),
        ("auto", "fp32"): (("python-onnxruntime", "fp32"), ("python-onnxruntime", "fp32")),
        ("auto", "bf16"): (("python-openvino", "bf16"), ("python-openvino", "bf16")),
        # int8 is only ever asked for: auto never picks it.
        ("auto", "int8"): (("python-openvino", "int8"), ("python-openvino", "int8")),
        ("openvino", "int8"): (("openvino", "int8"), ("openvino", "int8")),
        ("python-openvino", "auto"): (("python-openvino", "bf16"), ("python-openvino", "fp32")),
        ("python-onnxruntime", "auto"): (
            ("python-onnxruntime", "fp32"),
            ("python-onnxruntime", "fp32"),
        ),
        ("tensorrt", "fp16"): (("tensorrt", "fp16"), ("tensorrt", "fp16")),
    }
    for has_bf16, column in ((True, 0), (False, 1)):
        monkeypatch.setattr(
            configs, "bf16_unsupported_reason", lambda has=has_bf16: None if has else "no bf16"
        )
        for (flavour, precision), expected in cases.items():
            chosen = RepositoryOptions(flavour=flavour, precision=precision).for_this_machine()
            assert (chosen.flavour, chosen.precision) == expected[column], (flavour, precision)
            chosen.check()


def test_edit_models_carry_their_assets_and_stay_thin(repository) -> None:
    """The streaming model runs the pipeline and carries its assets; the unary model
    forwards to it and carries none."""
    _, root = repository
    configs = _configs(root)
    for pipeline in PIPELINES:
        folder = root / stream_model(pipeline) / "1"
        assert (folder / "tokenizer" / "tokenizer_config.json").is_file()
        assert (folder / "scheduler_config.json").is_file()
        assert [p.name for p in (root / pipeline / "1").iterdir()] == ["model.py"]
        parameters = configs[pipeline].parameters
        assert parameters["streaming_model"].string_value == stream_model(pipeline)
    for model_file in root.glob("*/1/model.py"):
        assert len(model_file.read_text().splitlines()) < 150, model_file


def test_tensorrt_flavour_needs_engines(tiny_export: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="needs --engines"):
        build_repository(tiny_export, tmp_path / "repo", RepositoryOptions(flavour="tensorrt"))


def test_tensorrt_flavour_rejects_images_outside_the_engine_profile(repository) -> None:
    flavour, root = repository
    settings = root / stream_model("instruct_pix2pix") / "1" / "pipeline.json"
    limits = json.loads(settings.read_text())["limits"]
    assert limits["min_side"] == (256 if flavour == "tensorrt" else 8)
    assert limits["side_multiple"] == 8


def test_unknown_flavour_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="allowed one of auto, python-onnxruntime, onnxruntime, tensorrt"
    ):
        build_repository(tiny_export, tmp_path / "repo", RepositoryOptions(flavour="tflite"))


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"flavour": "python-onnxruntime", "precision": "bf16"},
            "precision=bf16 with flavour=python-onnxruntime: only the openvino",
        ),
        (
            {"flavour": "openvino", "precision": "fp16"},
            "the openvino flavours take fp32, bf16 or int8",
        ),
        (
            {"flavour": "tensorrt", "precision": "int8"},
            r"precision=int8 with flavour=tensorrt: only the openvino flavours "
            r"\(python-openvino, openvino\) compute in int8",
        ),
        ({"precision": "int4"}, "precision='int4': allowed one of auto, fp32, bf16, fp16, int8"),
        ({"flavour": "python-openvino", "openvino_streams": 0}, "openvino_streams=0"),
        ({"max_image_side": 0}, "max_image_side=0: allowed >= 8"),
        ({"max_image_pixels": -1}, "max_image_pixels=-1: allowed >= 64"),
        ({"intra_op_threads": -3}, "intra_op_threads=-3: allowed >= 0"),
        ({"unet_queue_delay_us": -1}, "unet_queue_delay_us=-1: allowed >= 0"),
        ({"unet_idle_release_s": float("nan")}, "unet_idle_release_s=nan: allowed seconds"),
    ],
)
def test_precision_fits_the_flavour(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RepositoryOptions(**options).check()


@pytest.mark.skipif(bf16_unsupported_reason() is not None, reason="this CPU has no native bf16")
def test_bf16_reaches_openvino_in_both_flavours(tiny_export: Path, tmp_path: Path) -> None:
    for flavour in ("python-openvino", "openvino"):
        options = RepositoryOptions(flavour=flavour, precision="bf16", intra_op_threads=2)
        build_repository(tiny_export, tmp_path / flavour, options)
        parameters = _configs(tmp_path / flavour)["unet_pix2pix"].parameters
        if flavour == "openvino":
            assert parameters["HINT_BF16"].string_value == "YES"
            assert parameters["INFERENCE_NUM_THREADS"].string_value == "2"
        else:
            assert parameters["precision"].string_value == "bf16"
            assert parameters["threads"].string_value == "2"


def test_edit_models_run_next_to_their_unet(repository) -> None:
    # The loop's tensors never change device: the edit model instance sits where the UNet
    # does, and takes its inputs where the encoders left them instead of copied to the CPU.
    flavour, root = repository
    configs = _configs(root)
    expected = {
        "python-onnxruntime": mc.ModelInstanceGroup.KIND_CPU,
        "python-openvino": mc.ModelInstanceGroup.KIND_CPU,
        "openvino": mc.ModelInstanceGroup.KIND_CPU,
        "onnxruntime": mc.ModelInstanceGroup.KIND_AUTO,
        "tensorrt": mc.ModelInstanceGroup.KIND_GPU,
    }[flavour]
    for pipeline in PIPELINES:
        edit = configs[stream_model(pipeline)]
        unet = configs[UNET_FOR_PIPELINE[pipeline]]
        assert edit.instance_group[0].kind == expected
        # The unary model forwards to it and computes nothing.
        assert configs[pipeline].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert unet.instance_group[0].kind in (expected, mc.ModelInstanceGroup.KIND_CPU)
        assert unet.instance_group[0].kind == expected
        assert edit.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"


def test_a_lean_repository_serves_only_what_it_is_asked_for(
    tiny_export: Path, tmp_path: Path
) -> None:
    """One pipeline without its streaming model: its UNet, the shared components, the edit
    model and the readiness gate, nothing of the other pipeline."""
    options = RepositoryOptions(pipelines=("img2img",), streaming_models=False)
    models = build_repository(tiny_export, tmp_path / "lean", options)
    shared = {"text_encoder", "vae_encoder", "vae_decoder"}
    assert set(models) == {*shared, "unet_img2img", "img2img", READINESS_MODEL}
    assert json.loads((tmp_path / "lean" / "repository.json").read_text())["pipelines"] == [
        "img2img"
    ]


def test_a_pipeline_the_export_lacks_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pipelines=\\['nope'\\]: allowed"):
        RepositoryOptions(pipelines=("nope",)).check()


def test_the_record_says_which_code_built_the_repository(
    repository, capsys: pytest.CaptureFixture[str]
) -> None:
    """repository.json names the project's version and commit; serve --repository warns
    when the code serving it is another."""
    from model_repository.record import code_version, read_record
    from serving.serve import warn_if_built_by_other_code

    _, root = repository
    record = read_record(str(root))
    assert record is not None
    assert record["built_by"] == code_version()
    assert record["built_by"]["version"] and record["built_by"]["commit"]
    warn_if_built_by_other_code(str(root))
    assert capsys.readouterr().out == ""

    other = {**record, "built_by": {**record["built_by"], "commit": "0" * 40}}
    (root / "repository.json").write_text(json.dumps(other))
    try:
        warn_if_built_by_other_code(str(root))
        warning = capsys.readouterr().out
        assert f"built by commit {'0' * 40}, served by commit {code_version()['commit']}" in warning
    finally:
        (root / "repository.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("text", "damage"),
    [
        ("", "Expecting value"),
        ('{"pipelines": ["instr', "Unterminated string"),
        ("[]", "a JSON list"),
        (b"\x80{}", "can't decode"),
    ],
)
def test_a_damaged_record_stops_serve_with_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | bytes, damage: str
) -> None:
    """A repository.json cut short (a copy interrupted, a full disk) or replaced stops
    `serve --repository` before tritonserver starts, with the file and the remedy."""
    from serving.serve import main

    (tmp_path / REPOSITORY_RECORD).write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["--repository", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert f"{tmp_path}/{REPOSITORY_RECORD} is damaged (" in error
    assert damage in error and "build the repository again" in error


def test_the_builder_writes_over_its_own_output_only(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--output` naming a folder of someone's files is refused and the files stay; a file
    in its place too. A repository built before, or one whose build was cut short (the
    project's mark, written first), is written again."""
    from export.folders import WRITTEN_MARK
    from model_repository.builder import main

    arguments = [str(tiny_export), "--flavour", "onnxruntime", "--precision", "fp32"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    assert main([*arguments, "--output", str(theirs)]) == 2
    error = capsys.readouterr().err
    assert f"{theirs}: holds files that are not a model repository (no repository.json)" in error
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]

    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    assert main([*arguments, "--output", str(a_file)]) == 2
    assert "is a file; allowed a folder" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"

    cut_short = tmp_path / "cut-short"
    cut_short.mkdir()
    (cut_short / WRITTEN_MARK).write_text("")
    (cut_short / "text_encoder").mkdir()
    assert main([*arguments, "--output", str(cut_short)]) == 0
    assert main([*arguments, "--output", str(cut_short)]) == 0  # its own repository
    assert (cut_short / REPOSITORY_RECORD).is_file()


@pytest.mark.parametrize(("text", "damage"), [("{}", "KeyError"), ("{", "JSONDecodeError")])
def test_a_damaged_manifest_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, damage: str
) -> None:
    from model_repository.builder import main

    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text(text)
    assert main([str(export), "--output", str(tmp_path / "out"), "--flavour", "onnxruntime"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{export}/manifest.json is damaged" in error
    assert damage in error and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["--grpc-port", "99999"], "grpc_port=99999: allowed a port 1..65535"),
        (["--metrics-port", "-1"], "metrics_port=-1: allowed a port 1..65535"),
        (["--http-port", "8001"], "allowed three different ports"),
        (["--grace", "nan"], "grace=nan: allowed seconds >= 0"),
        (["--host", " "], "host=' ': allowed an address"),
        (["--log-file", "."], "--log-file .: is a folder"),
    ],
)
def test_serve_checks_its_server_settings_before_building(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], words: str
) -> None:
    """Refused at once, with one line, where tritonserver (or an hour's export first) would
    find them: `--preset` would build, and nothing is."""
    from serving.serve import main

    build_dir = tmp_path / "build"
    assert main(["--preset", "tiny", "--build-dir", str(build_dir), *arguments]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and words in error, error
    assert not build_dir.exists()


@pytest.mark.parametrize(
    "arguments",
    [
        ["--max-edits", "-5"],
        ["--precision", "int8"],
        ["--pipelines", "img2img"],
        ["--engines", "."],
    ],
)
def test_serve_refuses_building_flags_with_a_built_repository(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str]
) -> None:
    """A built repository is served as it was built: a building flag beside --repository
    would change nothing, so it is refused by name before anything starts."""
    from serving.serve import main

    assert main(["--repository", str(tmp_path), *arguments]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{arguments[0]}: building flags" in error, error

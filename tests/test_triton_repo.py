"""Triton model repository: config.pbtxt parsed with Triton's own schema, checked against the graph."""

from __future__ import annotations

import json
from dataclasses import asdict

import onnx
import pytest
import torch
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from noisyseg import cli
from noisyseg.export.onnx_export import ExportConfig, export_model, read_metadata
from noisyseg.export.tensorrt_engine import EngineMetadata, plan_metadata_path
from noisyseg.export.triton_repo import (
    TritonModelConfig,
    TritonRepoConfig,
    TritonTensor,
    make_triton_repo,
)
from noisyseg.models import create_model
from noisyseg.models.model_file import ModelInfo

CLASSES = ["background", "esophagus", "heart", "trachea", "aorta"]
ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32,
    onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64,
}


@pytest.fixture(
    scope="module", params=[("logits", None), ("labels", (32, 48))], ids=["logits-dynamic", "labels-static"]
)
def onnx_model(request, tmp_path_factory: pytest.TempPathFactory):
    output, static_size = request.param
    torch.manual_seed(0)
    kwargs = {"base_width": 4, "depth": 2}
    path = tmp_path_factory.mktemp("triton") / f"seg-{output}.onnx"
    config = ExportConfig(exporter="torchscript", output=output, static_size=static_size)
    export_model(create_model("unet", **kwargs).eval(), ModelInfo("unet", kwargs, CLASSES), path, config)
    return path


def parse_config(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def expected_io(values: list[onnx.ValueInfoProto]) -> list[tuple[str, int, list[int]]]:
    """(name, Triton data type, dims without batch; -1 where the graph has a symbolic dim)."""
    return [
        (
            v.name,
            ONNX_TO_TRITON[v.type.tensor_type.elem_type],
            [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim][1:],
        )
        for v in values
    ]


def test_config_matches_the_onnx_graph(onnx_model, tmp_path) -> None:
    config_path = make_triton_repo(onnx_model, tmp_path / "repo", config=TritonRepoConfig(max_batch_size=4))
    name = onnx_model.name.split(".")[0]
    assert config_path == tmp_path / "repo" / name / "config.pbtxt"
    assert (tmp_path / "repo" / name / "1" / "model.onnx").read_bytes() == onnx_model.read_bytes()
    config = parse_config(config_path)
    graph = onnx.load(str(onnx_model))
    assert config.name == name and config.platform == "onnxruntime_onnx" and config.max_batch_size == 4
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == expected_io(list(graph.graph.input))
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == expected_io(list(graph.graph.output))
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters == read_metadata(graph)
    assert json.loads(parameters["class_names"]) == CLASSES


def test_the_served_json_and_the_file_are_the_same_configuration() -> None:
    config = TritonModelConfig(
        "seg",
        "onnxruntime_onnx",
        4,
        [TritonTensor("image", "TYPE_FP32", [1, -1, -1])],
        [TritonTensor("logits", "TYPE_FP32", [5, -1, -1]), TritonTensor("labels", "TYPE_INT64", [-1, -1])],
        {"class_names": json.dumps(["a", 'b "quoted"']), "stride": "16"},
        250,
    )
    from_file = text_format.Parse(config.to_pbtxt(), model_config_pb2.ModelConfig())
    from_json = json_format.ParseDict(config.to_json(), model_config_pb2.ModelConfig())
    assert from_json == from_file
    assert from_file.dynamic_batching.max_queue_delay_microseconds == 250 and from_file.max_batch_size == 4
    assert from_file.HasField("model_transaction_policy") and not from_file.model_transaction_policy.decoupled
    assert json.loads(from_file.parameters["class_names"].string_value) == ["a", 'b "quoted"']


def fake_engine_files(tmp_path, onnx_model, max_batch: int):
    """A plan file and its sidecar as `export engine` writes them (the plan bytes are opaque here)."""
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"serialized engine bytes")
    metadata = EngineMetadata(
        tensorrt_version="10.13.0.35",
        gpu_name="NVIDIA H100",
        compute_capability="9.0",
        precision="fp16",
        input_name="image",
        input_shape=["batch", 1, "height", "width"],
        output_names=["logits"],
        profiles=[{"min": [1, 1, 32, 32], "opt": [1, 1, 64, 64], "max": [max_batch, 1, 128, 128]}],
        onnx_file=onnx_model.name,
        onnx_sha256="0" * 64,
        plan_sha256="0" * 64,
    )
    plan_metadata_path(plan).write_text(json.dumps(asdict(metadata)))
    return plan


def test_engine_repository_uses_the_plan_and_respects_its_profile(onnx_model, tmp_path, monkeypatch, capsys) -> None:
    plan = fake_engine_files(tmp_path, onnx_model, max_batch=8)
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["noisyseg.commands.export"])
    argv = [
        "export",
        "triton-repo",
        "--onnx",
        str(onnx_model),
        "--engine",
        str(plan),
        "--out",
        str(tmp_path / "repo"),
        "--name",
        "seg_trt",
    ]
    assert cli.main(argv) == 0
    config = parse_config(tmp_path / "repo" / "seg_trt" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 8
    assert (tmp_path / "repo" / "seg_trt" / "1" / "model.plan").read_bytes() == plan.read_bytes()
    capsys.readouterr()
    assert cli.main(argv + ["--max-batch-size", "16"]) == 2
    assert "allows batches up to 8" in capsys.readouterr().err

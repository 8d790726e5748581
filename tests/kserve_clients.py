"""KServe's Python SDK clients against a running server, in a process of their own.

KServe's generated messages and tritonclient.grpc's both claim the `inference` protobuf package,
so they cannot be imported into one process: the test suite runs this script as a child.

    python tests/kserve_clients.py HTTP_URL GRPC_ADDRESS MODEL IMAGES.npy OUT.npz

It checks readiness with both clients, then infers IMAGES (float32 N x C x H x W) four ways:
REST with binary and with JSON tensors, gRPC with raw and with typed contents, and writes each
answer's outputs to OUT.npz as `<way>.<output>`.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def request(model: str, images: np.ndarray, binary: bool) -> InferRequest:
    tensor = InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return InferRequest(model_name=model, infer_inputs=[tensor], request_id=f"kserve-{binary}")


async def main(http_url: str, grpc_address: str, model: str, images: np.ndarray) -> dict[str, np.ndarray]:
    results: dict[str, np.ndarray] = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    assert await rest.is_server_ready(http_url) and await rest.is_model_ready(http_url, model)
    for binary in (True, False):
        answer = await rest.infer(http_url, request(model, images, binary), model_name=model)
        results.update({f"rest-{'binary' if binary else 'json'}.{out.name}": out.as_numpy() for out in answer.outputs})
    await rest.close()
    async with InferenceGRPCClient(grpc_address, timeout=30) as client:
        assert await client.is_server_live() and await client.is_server_ready() and await client.is_model_ready(model)
        for binary in (True, False):
            answer = await client.infer(request(model, images, binary))
            results.update(
                {f"grpc-{'raw' if binary else 'contents'}.{out.name}": out.as_numpy() for out in answer.outputs}
            )
    return results


if __name__ == "__main__":
    http_url, grpc_address, model, images_path, out_path = sys.argv[1:]
    outputs = asyncio.run(main(http_url, grpc_address, model, np.load(images_path)))
    np.savez(out_path, **outputs)

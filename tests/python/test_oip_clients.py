"""The real Open Inference Protocol clients against the running server: tritonclient.http (binary tensor extension,
its default, and JSON) and the kserve REST client (JSON and binary), checked against the package's golden logits."""

import asyncio

import numpy as np
import pytest
import tritonclient.http as httpclient
from conftest import PACKAGE
from PIL import Image

TOLERANCE = 1e-4


def golden_batch(manifest, golden, task: str, n: int = 2):
    """FORMAT.md section 4 for golden images (stored at the task's size): the OIP input and the expected logits."""
    spec = next(t for t in manifest["tasks"] if t["id"] == task)["input"]
    cases = [c for c in golden["cases"] if c["task"] == task][:n]
    images = []
    for case in cases:
        image = Image.open(PACKAGE / case["file"])
        if spec["channels"] == 1:
            grey = np.asarray(image.convert("L"), dtype=np.float32)
            rgb = np.stack([grey] * 3)
        else:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
        mean = np.array(spec["mean"], dtype=np.float32)[:, None, None]
        std = np.array(spec["std"], dtype=np.float32)[:, None, None]
        images.append((rgb / 255.0 - mean) / std)
    return np.stack(images).astype(np.float32), np.array([c["logits"] for c in cases], dtype=np.float32)


def triton(server):
    return httpclient.InferenceServerClient(url=server.address)


def test_tritonclient_metadata_and_health(server):
    client = triton(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("pneumonia")
    metadata = client.get_model_metadata("pneumonia")
    assert metadata["inputs"][0]["name"] == "input" and metadata["inputs"][0]["datatype"] == "FP32"
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]


@pytest.mark.parametrize("task", ["breast", "pneumonia", "retina"])
def test_tritonclient_default_call_uses_binary_data(server, manifest, golden, task):
    x, expected = golden_batch(manifest, golden, task)
    client = triton(server)
    infer_input = httpclient.InferInput("input", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x)  # default: binary tensor extension
    result = client.infer(task, [infer_input])  # no outputs given: binary_data_output
    logits = result.as_numpy("logits")
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() < TOLERANCE
    response = result.get_response()
    assert response["outputs"][0]["parameters"]["binary_data_size"] == expected.size * 4


@pytest.mark.parametrize(("binary_in", "binary_out"), [(False, False), (True, False), (False, True), (True, True)])
def test_tritonclient_json_and_binary_mixes(server, manifest, golden, binary_in, binary_out):
    x, expected = golden_batch(manifest, golden, "pneumonia")
    client = triton(server)
    infer_input = httpclient.InferInput("input", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x, binary_data=binary_in)
    output = httpclient.InferRequestedOutput("logits", binary_data=binary_out)
    result = client.infer("pneumonia", [infer_input], outputs=[output], request_id="r-7")
    assert np.abs(result.as_numpy("logits") - expected).max() < TOLERANCE
    response = result.get_response()
    assert response["id"] == "r-7"
    assert ("data" in response["outputs"][0]) == (not binary_out)


def test_tritonclient_errors_are_raised_cleanly(server, manifest, golden):
    x, _ = golden_batch(manifest, golden, "pneumonia")
    client = triton(server)
    wrong = httpclient.InferInput("input", [1, 3, 28, 27], "FP32")
    wrong.set_data_from_numpy(x[:1, :, :, :27].copy())
    with pytest.raises(httpclient.InferenceServerException) as error:
        client.infer("pneumonia", [wrong])
    assert "shape" in str(error.value)
    many = httpclient.InferInput("input", [33, 3, 28, 28], "FP32")
    many.set_data_from_numpy(np.zeros((33, 3, 28, 28), dtype=np.float32))
    with pytest.raises(httpclient.InferenceServerException) as error:
        client.infer("pneumonia", [many])
    assert "at most 32" in str(error.value)


@pytest.mark.parametrize("binary", [False, True])
def test_kserve_rest_client(server, manifest, golden, binary):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    x, expected = golden_batch(manifest, golden, "retina")

    async def call():
        client = InferenceRESTClient(config=RESTConfig(protocol="v2", retries=0))
        infer_input = InferInput(name="input", shape=list(x.shape), datatype="FP32")
        infer_input.set_data_from_numpy(x, binary_data=binary)
        request = InferRequest(model_name="retina", infer_inputs=[infer_input], request_id="k-1")
        try:
            return await client.infer(server.url, request, model_name="retina")
        finally:
            await client.close()

    response = asyncio.run(call())
    assert response.id == "k-1"
    logits = response.outputs[0].as_numpy()
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() < TOLERANCE

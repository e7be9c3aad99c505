"""`llava-token-reduction serve`: a real HTTP round trip with transformers' server on 127.0.0.1.

One server process per checkpoint (VisionZip, TRIM), each started on a free port, ready within a bound and
stopped by its PID in a `finally`. Every answer, streamed
or not, must equal `generate()` on the same image and text in this process.
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

import eval_support as support


try:
    import fastapi  # noqa: F401 - the serve extra
except ImportError as missing:
    if os.environ.get("CI"):
        raise ImportError(
            "CI installs the serve extra (.ci/run: pip install -e '.[test,serve]'); fastapi is missing"
        ) from missing
    pytest.skip("the serve extra is not installed: pip install -e '.[test,serve]'", allow_module_level=True)

READY_TIMEOUT = 180  # seconds until /health answers
REQUEST_TIMEOUT = 120
QUESTION = "What is in the picture?"
MAX_TOKENS = 8


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {"visionzip": support.save_visionzip_checkpoint(root / "visionzip"),
            "trim": support.save_trim_checkpoint(root / "trim"), "root": root}


@pytest.fixture(scope="module")
def servers(checkpoints):
    """One server per checkpoint (a server with a preloaded model answers for that model only), started together."""
    root = checkpoints["root"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(root / "modules")}
    started = {}
    try:
        for method in ("visionzip", "trim"):
            port, log_path = free_port(), root / f"server_{method}.log"
            command = [sys.executable, "-m", "llava_token_reduction", "serve", checkpoints[method],
                       "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
            with open(log_path, "w") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
            started[method] = (process, f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + READY_TIMEOUT
        for process, base, log_path in started.values():
            wait_until_ready(process, base, log_path, deadline)
        yield {method: base for method, (_, base, _) in started.items()}
    finally:
        for process, _, _ in started.values():
            process.terminate()
        for process, _, _ in started.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until_ready(process, base: str, log_path, deadline: float) -> None:
    while True:
        if process.poll() is not None:
            log = log_path.read_text()[-4000:]
            pytest.fail(f"the server exited ({process.returncode}) before it was ready:\n{log}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server was not ready within {READY_TIMEOUT} s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)


def request_body(model: str, image_png: bytes, stream: bool) -> dict:
    data_url = "data:image/png;base64," + base64.b64encode(image_png).decode()
    return {
        "model": model, "stream": stream, "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": QUESTION},
        ]}],
    }


def post(base: str, body: dict):
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    return urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT)


def direct(path: str, image):
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    content = [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]
    inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1]:]
    return processor.decode(new, skip_special_tokens=True), inputs["input_ids"].shape[1], len(new)


@pytest.mark.parametrize("method", ["visionzip", "trim"])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_completion_with_a_base64_image_equals_generate(servers, checkpoints, method, stream):
    image = support.picture(7, size=(64, 56))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    expected, prompt_tokens, completion_tokens = direct(checkpoints[method], image)
    with post(servers[method], request_body(checkpoints[method], buffer.getvalue(), stream)) as response:
        assert response.status == 200
        if not stream:
            answer = json.load(response)
            text, usage = answer["choices"][0]["message"]["content"], answer["usage"]
        else:
            pieces, usage = [], None
            for line in response.read().decode().splitlines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                assert "error" not in chunk, chunk
                for choice in chunk.get("choices", []):
                    pieces.append(choice.get("delta", {}).get("content") or "")
                usage = chunk.get("usage") or usage
            text = "".join(pieces)
    if stream:
        # A random byte-level model may end on an incomplete UTF-8 sequence: `decode` shows it as U+FFFD, the
        # server's streamer holds it back as unfinished. Everything before it must match exactly.
        expected = expected.rstrip("\ufffd")
    assert text == expected
    # transformers' server counts the processor's prompt (before the reduction): documented in docs/evaluation.md.
    assert usage["prompt_tokens"] == prompt_tokens and usage["completion_tokens"] == completion_tokens


def test_only_the_server_process_is_adapted(servers):
    """The look-ups are extended inside the server process only; this process's transformers tables are stock."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES

    assert "llava_visionzip" not in MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES
    assert "llava_trim" not in MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES

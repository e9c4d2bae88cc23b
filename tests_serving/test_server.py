"""`dsas serve`: vLLM's OpenAI-compatible server with per-request steering, through the official client."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Skipped where vLLM is not installed (the main .venv): these tests run in .venv-vllm.
pytest.importorskip("vllm.entrypoints.llm")
openai = pytest.importorskip("openai")

PROMPT = "Your so-called research is pseudoscientific bullshit, you fraud. You are such a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def client(
    steerer_dirs: dict[str, Path], engine_env: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, **engine_env(None)}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server's usual layout: API server + engine core process
    cmd = [str(Path(sys.executable).parent / "dsas"), "serve", "--model", "smollm2-135m", "--port", str(port)]
    cmd += [arg for k, v in steerer_dirs.items() for arg in ("--steerer", f"{k}={v}")]
    # Eager here (the offline tests cover torch.compile); the op runs as plain PyTorch.
    cmd += ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8", "--enforce-eager"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    try:
        deadline = time.monotonic() + 420
        while True:
            assert proc.poll() is None, f"dsas serve exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"dsas serve did not come up: {log.read_text()[-3000:]}"
            try:
                c.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(2)
        yield c
    finally:
        with contextlib.suppress(ProcessLookupError):  # the server's process group: API server + engine core
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _complete(c: Any, xargs: dict[str, Any] | None = None) -> str:
    extra = {"vllm_xargs": xargs} if xargs is not None else None
    r = c.completions.create(
        model="smollm2-135m", prompt=PROMPT, max_tokens=12, temperature=0.0, extra_body=extra
    )
    return str(r.choices[0].text)


def test_openai_client_steers_per_request(client: Any):
    plain = _complete(client)
    steered = _complete(client, {"dsas_steerer": "tox", "dsas_strength": 4.0})
    vanilla = _complete(client, {"dsas_steerer": "van", "dsas_strength": 4.0})
    assert steered != plain and vanilla != plain and steered != vanilla
    assert _complete(client, {"dsas_steerer": "tox", "dsas_strength": 4.0}) == steered
    assert _complete(client) == plain


def test_bad_steerer_is_a_400_with_the_message_and_the_server_keeps_serving(client: Any):
    plain = _complete(client)
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, {"dsas_steerer": "nope", "dsas_strength": 2.0})
    assert err.value.status_code == 400
    assert "Unknown steerer 'nope'" in str(err.value) and "'tox', 'van'" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="finite number"):
        _complete(client, {"dsas_steerer": "tox", "dsas_strength": "strong"})
    assert _complete(client) == plain
    chat = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=4,
        temperature=0.0,
        extra_body={"vllm_xargs": {"dsas_steerer": "tox", "dsas_strength": 1.0}},
    )
    assert chat.choices[0].message.content

"""The blocking ``%finetune`` in a real ipykernel: the Stop button and kernel interrupts work
while the cell runs, and cells queued meanwhile still run afterwards, in order.

A jupyter_client plays the front end: it reads the panel's widget models from IOPub and sends
the Stop button's click as the ``comm_msg`` a browser would send.
"""
from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import pytest

jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

TIMEOUT = 240
FAST = ("--method lora --set batch_size=2 --set lora_r=4 --set lora_alpha=8 --set lora_dropout=0 "
        "--set eval_steps=0 --set save_steps=0 --set max_length=64")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory, tiny_model_dir):
    from jupyter_client.manager import start_new_kernel

    from nbtuner.data import identity_conversations, save_xtuner

    workdir = tmp_path_factory.mktemp("kernel")
    save_xtuner(identity_conversations("Nova", n=16), workdir / "identity.json")
    env = {k: v for k, v in os.environ.items() if k != "NBTUNER_DISPLAY"}  # auto: widgets in a kernel
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(workdir), env=env)
    try:
        reply = execute(kc, "%load_ext nbtuner")
        assert reply["content"]["status"] == "ok"
        yield km, kc, workdir
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def execute(kc, code: str, timeout: float = TIMEOUT) -> dict:
    msg_id = kc.execute(code)
    return wait_reply(kc, msg_id, timeout)


def wait_reply(kc, msg_id: str, timeout: float = TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = kc.get_shell_msg(timeout=1)
        except queue.Empty:
            continue
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply
    raise AssertionError(f"no reply within {timeout} s")


def output_of(kc, code: str) -> str:
    msg_id = kc.execute(code)
    wait_reply(kc, msg_id)
    text = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=5)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            text.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    return "".join(text)


def drain(kc) -> None:
    while True:
        try:
            kc.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            return


def wait_for_step(kc, min_step: int, timeout: float = TIMEOUT) -> dict[str, str]:
    """Follows the panel's widget models on IOPub until the progress bar reaches `min_step`."""
    models: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        content = msg["content"]
        if msg["msg_type"] == "comm_open":
            state = content["data"]["state"]
            if state.get("_model_name") == "ButtonModel" and state.get("description") == "Stop":
                models["stop"] = content["comm_id"]
            elif state.get("_model_name") == "IntProgressModel":
                models["progress"] = content["comm_id"]
        elif msg["msg_type"] == "comm_msg" and content["comm_id"] == models.get("progress"):
            value = content["data"].get("state", {}).get("value")
            if isinstance(value, int) and value >= min_step:
                return models
        elif msg["msg_type"] == "error":
            raise AssertionError(f"{content['ename']}: {content['evalue']}")
    raise AssertionError(f"training did not reach step {min_step} within {timeout} s")


def test_stop_button_works_while_the_cell_blocks(kernel, tiny_model_dir):
    km, kc, workdir = kernel
    drain(kc)
    cell = kc.execute(f"%finetune --model {tiny_model_dir} --data identity.json --max-steps 100000 "
                      f"--out runs/clicked -o run {FAST}")
    try:
        models = wait_for_step(kc, 2)
        assert "stop" in models, "the panel's Stop button was not displayed"
        # Queued while the cell blocks, like "Run All": must run after the cell, not be lost.
        queued = kc.execute("after = run.status")
        click = kc.session.msg("comm_msg", {"comm_id": models["stop"],
                                            "data": {"method": "custom", "content": {"event": "click"}}})
        kc.shell_channel.send(click)
        reply = wait_reply(kc, cell, timeout=120)
    except BaseException:
        km.interrupt_kernel()
        raise
    assert reply["content"]["status"] == "ok"
    assert wait_reply(kc, queued, timeout=60)["content"]["status"] == "ok"
    out = output_of(kc, "print(run.status, run.step, after, len(run.checkpoints))")
    status, step, after, checkpoints = out.split()
    assert status == "stopped" and after == "stopped"
    assert 2 <= int(step) < 100000 and int(checkpoints) >= 1
    assert (Path(workdir) / "runs" / "clicked" / "adapter" / "adapter_config.json").is_file()


def test_kernel_interrupt_stops_gracefully_with_a_checkpoint(kernel, tiny_model_dir):
    km, kc, workdir = kernel
    drain(kc)
    cell = kc.execute(f"%finetune --model {tiny_model_dir} --data identity.json --max-steps 100000 "
                      f"--out runs/interrupted -o run2 {FAST}")
    try:
        wait_for_step(kc, 2)
        km.interrupt_kernel()
        reply = wait_reply(kc, cell, timeout=120)
    except BaseException:
        km.interrupt_kernel()
        raise
    assert reply["content"]["status"] == "ok"  # the interrupt became a graceful stop, not an error
    out = output_of(kc, "print(run2.status, len(run2.checkpoints))")
    status, checkpoints = out.split()
    assert status == "stopped" and int(checkpoints) >= 1
    checkpoint = sorted((Path(workdir) / "runs" / "interrupted" / "checkpoints").glob("checkpoint-*"))[-1]
    assert (checkpoint / "trainer_state.json").is_file()

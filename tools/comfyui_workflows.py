"""Every example workflow in a real ComfyUI server, on tiny random models: run with ComfyUI's own Python.

    /path/to/ComfyUI/venv/bin/python tools/comfyui_workflows.py /path/to/ComfyUI [--keep]

Builds a throwaway base folder (this pack under custom_nodes/, tiny models under the file names the workflows use,
their input images), starts `main.py --cpu` on it, queues each API twin of example_workflows/api/ through
POST /prompt, waits for /history and prints one row per workflow (status, seconds, images written, first error
line). Exits non-zero when a workflow fails. The ComfyUI folder itself is not modified.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, payload=None):
    data = None if payload is None else json.dumps(payload).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as response:
        return json.loads(response.read())


def prepare(base):
    """custom_nodes/<pack>, models/, input/ and the tiny tokenizer under `base`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("klein_nodes", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["klein_nodes"] = pack
    spec.loader.exec_module(pack)
    from klein_nodes.testing import write_workflow_inputs, write_workflow_models

    for folder in ("custom_nodes", "user", "output"):
        (base / folder).mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-Flux2-Klein").symlink_to(ROOT)
    write_workflow_models(base)
    write_workflow_inputs(base / "input")
    return base / "comfy" / "text_encoders" / "qwen25_tokenizer"


def start(core, base, tokenizer, log):
    port = free_port()
    env = {**os.environ, "KLEIN_TOKENIZER": str(tokenizer)}
    server = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                               "--base-directory", str(base), "--disable-auto-launch"],
                              cwd=core, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}; see {log.name}")
        try:
            request(f"{url}/system_stats")
            return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"the server did not answer in 5 minutes; see {log.name}")


def run(url, graph, timeout=900):
    """(status, seconds, images, message) of one queued graph."""
    began = time.monotonic()
    try:
        prompt_id = request(f"{url}/prompt", {"prompt": graph, "client_id": "klein-check"})["prompt_id"]
    except urllib.error.HTTPError as e:
        return "refused", 0.0, 0, json.loads(e.read()).get("error", {}).get("message", str(e))
    while time.monotonic() - began < timeout:
        history = request(f"{url}/history/{prompt_id}").get(prompt_id)
        if history and history.get("status", {}).get("completed") is not None:
            status = history["status"]
            seconds = time.monotonic() - began
            images = sum(len(out.get("images", [])) for out in history.get("outputs", {}).values())
            errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
            message = errors[0].get("exception_message", "").strip().splitlines()[0] if errors else ""
            return status.get("status_str", "?"), seconds, images, message
        time.sleep(0.25)
    return "timeout", time.monotonic() - began, 0, ""


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 1:
        sys.exit(__doc__)
    core = Path(args[0]).resolve()
    version = (core / "comfyui_version.py").read_text().split('"')[1]
    base = Path(tempfile.mkdtemp(prefix="klein-comfyui-"))
    failed = 0
    try:
        tokenizer = prepare(base)
        with open(base / "server.log", "w") as log:
            server, url = start(core, base, tokenizer, log)
            try:
                print(f"ComfyUI {version} ({core}), CPU; server log: {base / 'server.log'}")
                print(f"{'workflow':36} {'status':8} {'seconds':>7} {'images':>6}  error")
                for path in sorted((ROOT / "example_workflows" / "api").glob("*.json")):
                    status, seconds, images, message = run(url, json.loads(path.read_text()))
                    failed += status != "success"
                    print(f"{path.stem:36} {status:8} {seconds:7.1f} {images:6d}  {message}", flush=True)
            finally:
                server.terminate()
                server.wait(30)
    finally:
        if "--keep" not in sys.argv and not failed:
            shutil.rmtree(base, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

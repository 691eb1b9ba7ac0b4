"""Drives a real ComfyUI server with the arenafs package installed (tests/it/comfyui.rs).

  comfyui_e2e.py make-model PATH [FEAT CONV]
                                        writes a SRVGGNetCompact (ESRGAN-family) upscaler, tiny by
                                        default
  comfyui_e2e.py check URL SOCKET BASE  queues prompts over ComfyUI's HTTP API and checks what
                                        the daemon saw; prints OK or fails with a reason
"""

import json
import os
import socket
import sys
import time
import urllib.request


def make_model(path, feat=8, conv=2):
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact as SRVGGNetCompact

    torch.manual_seed(7)
    model = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=int(feat), num_conv=int(conv), upscale=2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def _up(url):
    try:
        return http(f"{url}/system_stats", timeout=2)
    except OSError:
        return None


def http(url, body=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def daemon(sock_path, method, target):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock_path)
    s.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def wait(what, cond, timeout=120):
    end = time.time() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.time() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def upscale_prompt(image, model, prefix):
    """LoadImage -> UpscaleModelLoader -> ImageUpscaleWithModel -> SaveImage."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }


def opens(stats):
    """Files opened through the mount, by every route."""
    return sum(v for k, v in stats.items() if k.startswith("opens_") and isinstance(v, int))


def queue_prompt(url, prompt):
    r = http(f"{url}/prompt", {"prompt": prompt, "client_id": "arenafs-test"})
    if r.get("node_errors"):
        raise SystemExit(f"prompt refused: {r}")
    return r["prompt_id"]


def run_prompt(url, prompt):
    return wait_prompt(url, queue_prompt(url, prompt))


def wait_prompt(url, pid):
    def done():
        h = http(f"{url}/history/{pid}")
        return h.get(pid) if h else None

    entry = wait(f"prompt {pid}", done, 300)
    status = entry.get("status", {})
    if status.get("status_str") != "success":
        raise SystemExit(f"prompt failed: {json.dumps(status)[:2000]}")
    return entry["outputs"]


def check(url, sock_path, base):
    from PIL import Image

    wait("ComfyUI to answer", lambda: _up(url), 180)
    info = http(f"{url}/object_info/ArenaAutoCacheStats")
    assert info["ArenaAutoCacheStats"]["display_name"] == "Arena AutoCache: Stats", info
    assert "ArenaAutoCacheTrim" in http(f"{url}/object_info/ArenaAutoCacheTrim")
    assert "ArenaAutoCache" in http(f"{url}/object_info/ArenaAutoCache")
    ext = http(f"{url}/arenafs/status")
    assert ext["reachable"] is True, ext
    assert ext["socket"] == sock_path and ext["socket_source"] == "ARENAFS_SOCKET", ext
    cid = ext["client_id"]

    for name, color in [("arena1.png", (200, 10, 10)), ("arena2.png", (10, 200, 10))]:
        Image.new("RGB", (16, 16), color).save(os.path.join(base, "input", name))

    def upscale(image, prefix):
        return upscale_prompt(image, "tiny.safetensors", prefix)

    # The first prompt's image is a FIFO: ComfyUI hashes every LoadImage input (IS_CHANGED)
    # before it runs any node of the prompt, so its executor waits on the FIFO, and the loader
    # cannot run, until the test writes the image. Meanwhile the model must reach this instance's
    # required set, with no file opened through the mount.
    before = daemon(sock_path, "GET", "/arena/stats")
    gate = os.path.join(base, "input", "gate.png")
    os.mkfifo(gate)
    pid = queue_prompt(url, upscale("gate.png", "arena1"))

    def required():
        c = daemon(sock_path, "GET", "/arena/status").get("clients", {}).get(cid)
        return c if c and c["required_models"] == 1 else None

    wait("the model in the required set", required, 60)
    held = daemon(sock_path, "GET", "/arena/stats")
    assert opens(held) == opens(before), ("a file was opened before the set was in place", before, held)
    assert not http(f"{url}/history/{pid}"), "the prompt ran before the gate opened"
    # Opening the FIFO for writing waits for the executor's read; the real image replaces the
    # FIFO before the hash ends, so the loader node reads a regular PNG.
    with open(gate, "wb") as w:
        os.replace(os.path.join(base, "input", "arena1.png"), gate)
        with open(gate, "rb") as f:
            w.write(f.read())
    out = wait_prompt(url, pid)
    assert opens(daemon(sock_path, "GET", "/arena/stats")) > opens(held)
    img = out["4"]["images"][0]
    with Image.open(os.path.join(base, "output", img.get("subfolder", ""), img["filename"])) as im:
        assert im.size == (32, 32), im.size

    # The daemon got the prompt's model as this instance's required set, and copied it.
    def copied():
        st = daemon(sock_path, "GET", "/arena/status")
        c = st.get("clients", {}).get(cid)
        return st if c and c["complete"] == 1 else None

    st = wait("the model's copy", copied, 60)
    c = st["clients"][cid]
    assert c["required_models"] == 1 and c["not_found"] == [], c
    events = http(f"{url}/arenafs/status")["events"]
    sent = [e for e in events if e["kind"] == "sent"]
    assert sent and sent[0]["models"] == ["upscale_models/tiny.safetensors"], events
    after_first = daemon(sock_path, "GET", "/arena/stats")
    assert after_first["bytes_fetched"] > before["bytes_fetched"], after_first

    # A second run, the model unloaded first: read from the SSD copy, nothing fetched.
    http(f"{url}/free", {"unload_models": True, "free_memory": True})
    run_prompt(url, upscale("arena2.png", "arena2"))
    after = daemon(sock_path, "GET", "/arena/stats")
    hits = lambda s: s["opens_passthrough"] + s["opens_ssd"]
    assert hits(after) > hits(after_first), (after_first, after)
    assert after["bytes_fetched"] == after_first["bytes_fetched"], (after_first, after)

    # The Stats and Trim nodes answer from the daemon.
    out = run_prompt(url, {"1": {"class_type": "ArenaAutoCacheStats", "inputs": {}}})
    text = out["1"]["text"][0]
    assert "opens_passthrough:" in text and "bytes_fetched:" in text, text
    out = run_prompt(url, {"1": {"class_type": "ArenaAutoCacheTrim",
                                 "inputs": {"criterion": "category", "value": "upscale_models", "dry_run": True}}})
    text = out["1"]["text"][0]
    assert text.startswith("would remove 1 copies") and "upscale_models/tiny.safetensors" in text, text
    assert daemon(sock_path, "GET", "/arena/status")["cache_complete_entries"] == 1

    # The override node, enabled, applies to its prompt's copies: with "prefetch_allowlist" the
    # allow-list's file (loras/extra.safetensors) joins the prompt's model in this instance's set.
    def with_override(prefix, discovery, prefetch):
        p = upscale("arena2.png", prefix)
        p["9"] = {"class_type": "ArenaAutoCache", "inputs": {
            "use_workflow_overrides": True, "override_discovery_mode": discovery,
            "override_prefetch_strategy": prefetch}}
        return p

    def events(kind):
        return [e for e in http(f"{url}/arenafs/status")["events"] if e["kind"] == kind]

    def settled():
        return http(f"{url}/arenafs/status")["pending_prompts"] == 0

    # Each part starts once the feeder has handled every prompt before it (one may wait out the
    # cooldown), so that its last event is the part's own.
    wait("the feeder to settle", settled, 60)
    n_sent = len(events("sent"))
    run_prompt(url, with_override("arena3", "inherit", "prefetch_allowlist"))
    wait("the override's prompt sent", settled, 60)
    assert len(events("sent")) == n_sent + 1 and events("sent")[-1]["allowlist"] == 1, events("sent")

    def both():
        c = daemon(sock_path, "GET", "/arena/status")["clients"][cid]
        return c if c["required_models"] == 2 and c["complete"] == 2 else None

    wait("the prompt's model and the allow-list copied", both, 60)
    # Not enabled: the node changes nothing (the allow-list is not asked for again).
    p = with_override("arena4", "inherit", "prefetch_allowlist")
    p["9"]["inputs"]["use_workflow_overrides"] = False
    n_sent = len(events("sent"))
    run_prompt(url, p)
    wait("the plain prompt sent", settled, 60)
    assert len(events("sent")) == n_sent + 1 and events("sent")[-1]["allowlist"] == 0, events("sent")
    # Discovery overridden to manual_only: the prompt is not sent.
    n_skipped = len(events("skipped"))
    run_prompt(url, with_override("arena5", "manual_only", "inherit"))
    wait("the manual_only prompt handled", settled, 60)
    skipped = events("skipped")[n_skipped:]
    assert [e["reason"] for e in skipped] == ["discovery is manual_only"], skipped
    assert not [e for e in http(f"{url}/arenafs/status")["events"] if e["kind"] == "error"], "feeder errors"
    print("OK")


def check_no_daemon(url, base):
    """No daemon behind the socket: ComfyUI still queues and runs prompts; the package says the
    daemon is not reachable."""
    from PIL import Image

    wait("ComfyUI to answer", lambda: _up(url), 180)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(os.path.join(base, "input", "plain.png"))
    out = run_prompt(url, upscale_prompt("plain.png", "tiny.safetensors", "plain"))
    assert out["4"]["images"], out
    ext = http(f"{url}/arenafs/status")
    assert ext["reachable"] is False and ext["error"]["code"] == "UNREACHABLE", ext
    errors = wait("the feeder's report", lambda: [e for e in http(f"{url}/arenafs/status")["events"]
                                                   if e["kind"] == "error"], 30)
    assert errors[0]["code"] == "UNREACHABLE", errors
    out = run_prompt(url, {"1": {"class_type": "ArenaAutoCacheStats", "inputs": {}}})
    assert out["1"]["text"][0].startswith("arenafs: UNREACHABLE"), out
    print("OK")


def check_two(url1, url2, sock_path, base1, base2):
    """Two ComfyUI instances on one mount queue different workflows: each gets its own required
    set, both models are copied, neither is refused."""
    from PIL import Image

    for url in (url1, url2):
        wait("ComfyUI to answer", lambda: _up(url), 180)
    ids = []
    for url, base, model in [(url1, base1, "a.safetensors"), (url2, base2, "b.safetensors")]:
        Image.new("RGB", (16, 16), (5, 5, 5)).save(os.path.join(base, "input", "t.png"))
        ids.append(http(f"{url}/arenafs/status")["client_id"])
    assert ids[0] != ids[1], ids
    for url, model in [(url1, "a.safetensors"), (url2, "b.safetensors")]:
        run_prompt(url, upscale_prompt("t.png", model, "t"))

    def both():
        st = daemon(sock_path, "GET", "/arena/status")
        c = st.get("clients", {})
        ok = all(c.get(i, {}).get("complete") == 1 for i in ids)
        return st if ok else None

    st = wait("both sets copied", both, 60)
    assert st["required_models_count"] == 2, st["required_models_count"]
    for url in (url1, url2):
        kinds = [e["kind"] for e in http(f"{url}/arenafs/status")["events"]]
        assert kinds and all(k == "sent" for k in kinds), kinds
    print("OK")


def measure(url, sock_path, base, count):
    """Prints the time from queueing a prompt (POST /prompt) to its model's background copy
    fetching its first bytes, for models m0..m{count-1}.safetensors not cached yet."""
    from PIL import Image

    wait("ComfyUI to answer", lambda: _up(url), 180)
    Image.new("RGB", (16, 16), (5, 5, 5)).save(os.path.join(base, "input", "m.png"))
    times = []
    for i in range(int(count)):
        before = daemon(sock_path, "GET", "/arena/stats")["session_bytes_downloaded"]
        prompt = upscale_prompt("m.png", f"m{i}.safetensors", "m")
        t0 = time.perf_counter()
        http(f"{url}/prompt", {"prompt": prompt, "client_id": "measure"})
        while daemon(sock_path, "GET", "/arena/stats")["session_bytes_downloaded"] == before:
            if time.perf_counter() - t0 > 30:
                raise SystemExit("no copy started")
        times.append((time.perf_counter() - t0) * 1000)
        wait("the queue to drain", lambda: not http(f"{url}/queue")["queue_running"], 60)
        wait("the copy", lambda: not daemon(sock_path, "GET", "/arena/status")["jobs"], 60)
    times.sort()
    print("queue -> first copy bytes, ms:", " ".join(f"{t:.1f}" for t in times),
          f"median {times[len(times) // 2]:.1f}")


def check_progress(url, base):
    """Copy progress reaches ComfyUI's websocket while a queued prompt's model copies."""
    import asyncio

    import aiohttp
    from PIL import Image

    wait("ComfyUI to answer", lambda: _up(url), 180)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(os.path.join(base, "input", "p.png"))
    prompt = upscale_prompt("p.png", "big.safetensors", "p")

    async def watch():
        seen = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId=arenafs-ws") as ws:
                # The prompt is queued once the socket listens (its model is not a real one: the
                # prompt fails at the loader, after the feeder has sent it).
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: http(f"{url}/prompt", {"prompt": prompt, "client_id": "arenafs-ws"}))
                running = False
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    m = json.loads(msg.data)
                    if not m.get("type", "").startswith("arenafs."):
                        continue
                    seen.append(m)
                    d = m["data"]
                    if m["type"] == "arenafs.progress":
                        jobs = [j for j in d["jobs"] if j["path"] == "upscale_models/big.safetensors"]
                        if jobs and jobs[0]["done_bytes"] < jobs[0]["total_bytes"]:
                            running = True
                        if running and d["jobs"] == [] and d["reachable"]:
                            return seen
        raise SystemExit(f"websocket closed: {seen}")

    seen = asyncio.run(asyncio.wait_for(watch(), 120))
    kinds = [m["data"].get("kind") for m in seen if m["type"] == "arenafs.event"]
    assert "sent" in kinds, seen
    progress = [m["data"] for m in seen if m["type"] == "arenafs.progress"]
    # A job that has not opened its file yet shows total_bytes 0; the later ones show the size.
    sized = [j for p in progress for j in p["jobs"] if j["total_bytes"]]
    assert sized, progress
    assert all(j["total_bytes"] == 24 * (1 << 20) for j in sized), sized
    assert any(j["done_bytes"] < j["total_bytes"] for j in sized), sized
    assert progress[-1]["cache_state"] == "red", progress[-1]
    print("OK", len(progress), "progress events")


if __name__ == "__main__":
    if sys.argv[1] == "make-model":
        make_model(*sys.argv[2:5])
    elif sys.argv[1] == "check":
        check(*sys.argv[2:5])
    elif sys.argv[1] == "make-image":
        from PIL import Image

        Image.new("RGB", (16, 16), (9, 9, 9)).save(sys.argv[2])
    elif sys.argv[1] == "wait-up":
        wait("ComfyUI to answer", lambda: _up(sys.argv[2]), 180)
    elif sys.argv[1] == "check-two":
        check_two(*sys.argv[2:7])
    elif sys.argv[1] == "measure":
        measure(*sys.argv[2:6])
    elif sys.argv[1] == "check-progress":
        check_progress(*sys.argv[2:4])
    elif sys.argv[1] == "check-no-daemon":
        check_no_daemon(*sys.argv[2:4])
    else:
        raise SystemExit(__doc__)

"""arenafs for ComfyUI: feeds the arenafs cache from queued prompts, and brings back Arena
AutoCache's nodes. Thin, over the daemon's control API; no cache logic of its own.

Install: copy or symlink this folder to ComfyUI/custom_nodes/arenafs. The daemon is found from
ARENAFS_SOCKET, else from the arenafs mount that serves ComfyUI's models/ directory.
"""

import asyncio
import logging
import os
import socket as _socket

from .arenafs_client import Client, DaemonError, find_socket
from .arenafs_feed import Feeder
from .arenafs_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, set_client
from .arenafs_progress import Progress

log = logging.getLogger("arenafs")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

# The front end's part (settings, status badge, dry run), served by ComfyUI.
WEB_DIRECTORY = "./web"

feeder = None
socket_path = None
socket_source = None


def _client_id(port):
    host = "".join(c for c in _socket.gethostname() if c.isalnum() or c in ".-") or "host"
    return f"comfyui:{host[:40]}:{port}"


def _setup():
    global feeder, socket_path, socket_source
    import folder_paths
    from server import PromptServer

    socket_path, socket_source = find_socket(folder_paths.models_dir)
    client = Client(socket_path)
    set_client(client)
    try:
        from comfy.cli_args import args

        port = args.port
    except Exception:
        port = os.getpid()
    feeder = Feeder(client, _client_id(port))
    server = PromptServer.instance
    server.add_on_prompt_handler(feeder.on_prompt)
    # send_sync is safe from other threads (it hands the message to the server's loop).
    progress = Progress(client, lambda event, data: server.send_sync(event, data))
    feeder.listeners.append(progress.on_feed_event)
    try:
        client.get("/arena/status")
        log.info("arenafs: using the daemon at %s (from %s), client id %s", socket_path, socket_source, feeder.client_id)
    except DaemonError as e:
        log.warning("arenafs: the daemon is not reachable at %s (from %s): %s; ComfyUI works as before",
                    socket_path, socket_source, e.message)

    from aiohttp import web

    async def ask(method, target, body=None):
        """The daemon's answer, or its error as a JSON body (the panel shows it)."""
        try:
            answer = await asyncio.get_running_loop().run_in_executor(
                None, lambda: client.call(method, target, body))
            return web.json_response(answer)
        except DaemonError as e:
            return web.json_response({"status": "error", "code": e.code, "message": e.message},
                                     status=e.status or 503)

    @server.routes.get("/arenafs/settings")
    async def arenafs_settings_get(request):
        return await ask("GET", "/arena/settings")

    async def json_body(request):
        try:
            body = await request.json()
        except ValueError:
            body = None
        return body if isinstance(body, dict) else None

    bad_json = {"status": "error", "code": "BAD_JSON", "message": "the body is not a JSON object"}

    @server.routes.post("/arenafs/settings")
    async def arenafs_settings_post(request):
        body = await json_body(request)
        if body is None:
            return web.json_response(bad_json, status=400)
        return await ask("POST", "/arena/settings", body)

    @server.routes.post("/arenafs/dryrun")
    async def arenafs_dryrun(request):
        body = await json_body(request)
        if body is None:
            return web.json_response(bad_json, status=400)
        return await ask("POST", "/arena/workflow?action=resolve", {"prompt": body.get("prompt") or {}})

    @server.routes.get("/arenafs/status")
    async def arenafs_status(request):
        info = {"socket": socket_path, "socket_source": socket_source, "client_id": feeder.client_id,
                "events": feeder.recent(), "pending_prompts": feeder.pending_prompts()}
        try:
            info["daemon"] = await asyncio.get_running_loop().run_in_executor(None, client.get, "/arena/status")
            info["reachable"] = True
        except DaemonError as e:
            info["reachable"] = False
            info["error"] = {"code": e.code, "message": e.message}
        return web.json_response(info)


try:
    _setup()
except ImportError:
    # Imported outside ComfyUI (tests of the helpers): nothing to register.
    pass

"""Warm executors for Flower's `--isolation process` mode: one long-lived process that runs the app tasks of a
SuperNode (its ClientApp) or of a SuperLink (its ServerApp).

Flower's own executor (`flower-superexec`) starts a fresh `flwr-clientapp` / `flwr-serverapp` process for every
task: for trip that means importing torch and open_clip and loading the CLIP and the frozen features again for
every message of every round (seconds for a tiny model, a minute for ViT-B/16), and for every run. These
executors take the same tasks from the same Runtime API, but run the apps in this process, so the module-level
cache of `trip.federation.flower.node` keeps the backbone and the features between messages and runs.

They follow `flwr.supernode.runtime.run_clientapp` and `flwr.superlink.runtime.run_serverapp` (flwr 1.42):
acquire a task, pull its input (message or context, run, FAB), call the app the FAB names, push the output."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from logging import ERROR, INFO
from pathlib import Path
from queue import Queue

import httpx
from flwr.app import Error, Message, RecordDict
from flwr.clientapp.client_app import LoadClientAppError
from flwr.common import log
from flwr.common.config import get_fab_config, get_fused_config_from_fab
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, context_to_proto, fab_from_proto, run_from_proto
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullTaskInputRequest,
    PushTaskOutputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.logger import flush_logs, start_log_uploader, stop_log_uploader
from flwr.supercore.object_ref import load_app
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import HttpGrid
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from trip.federation.flower.polling import Backoff, quick_object_pulls
from trip.federation.flower.protocol import quiet_root_logger


def serve(runtime_api: str, root_certificates: str | None = None, serverapp: bool = False) -> None:
    """Run, forever, the ClientApp tasks of the SuperNode (or with `serverapp` the ServerApp tasks of the
    SuperLink) whose Runtime API is at `runtime_api` (host:port; over TLS when `root_certificates` is given)."""
    quiet_root_logger()
    quick_object_pulls()
    kind = TaskType.SERVER_APP if serverapp else TaskType.CLIENT_APP
    run = run_serverapp_task if serverapp else run_clientapp_task
    client = runtime_client(runtime_api, root_certificates, kind)
    log(INFO, "trip worker: serving the %s tasks of the Runtime API at %s", kind, runtime_api)
    request = AcquireTaskRequest(supported_task_types=[kind])
    backoff = Backoff()
    while True:
        res = client.AcquireTask(request)
        if res.HasField("task") and res.token:
            try:
                run(runtime_api, root_certificates, res.token)
            except Exception as ex:  # noqa: BLE001 - a task that could not even report its failure
                log(ERROR, "task %d was lost: %s", res.task.task_id, ex)
            backoff.busy()
        else:
            backoff.pause()


def run_clientapp_task(runtime_api: str, root_certificates: str | None, token: str) -> None:
    """One message: pull it, run the ClientApp, push the reply (an Error reply if the app raised)."""
    client = runtime_client(runtime_api, root_certificates, TaskType.CLIENT_APP, token)
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    with _heartbeat(client):
        try:
            message, context, _, fab = pull_task_input(client)
            reply = _app(fab.content, "clientapp")(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - every failure goes back to the ServerApp as an Error reply
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            details = f"{type(ex).__name__}: {ex}"
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) else \
                ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, status, details)
            client.close()


def run_serverapp_task(runtime_api: str, root_certificates: str | None, token: str) -> None:
    """One run: pull its context, run the ServerApp on an HttpGrid, upload its output for `flwr log`, push the
    final status (failed if the app raised)."""
    client = runtime_client(runtime_api, root_certificates, TaskType.SERVER_APP, token)
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    status, details = SubStatus.FAILED, "ServerApp task failed"
    logs: Queue[str | None] = Queue()
    uploader = start_log_uploader(logs, node_id=0, run_id=run.run_id, client=client)
    grid = HttpGrid(runtime_api, insecure=root_certificates is None,
                    root_certificates=Path(root_certificates).read_bytes() if root_certificates else None, token=token)
    grid.set_run(run)
    with _heartbeat(client), _mirrored_output(logs):
        try:
            context.run_config = get_fused_config_from_fab(fab.content, run)
            _app(fab.content, "serverapp")(grid, context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - the run fails, this executor goes on to the next one
            log(ERROR, "ServerApp raised an exception", exc_info=ex)
            details = f"ServerApp failed with exception: {ex}"
    flush_logs(logs)
    context.state = RecordDict()  # as flwr-serverapp: the ServerApp's state is not sent back
    client.PushTaskOutput(PushTaskOutputRequest(context=context_to_proto(context), sub_status=status,
                                                details=details))
    stop_log_uploader(logs, uploader)
    grid.close()
    client.close()


def _app(fab: bytes, component: str) -> Callable:
    """The ClientApp or ServerApp the FAB names (its module stays imported: that is the point)."""
    ref = get_fab_config(fab)["tool"]["flwr"]["app"]["components"][component]
    return load_app(ref, LoadClientAppError)


def runtime_client(runtime_api: str, root_certificates: str | None, kind: str = TaskType.CLIENT_APP,
                   token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name=str(kind))]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=runtime_api, insecure=root_certificates is None,
                                                 root_certificates=root_certificates, interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


@contextmanager
def _heartbeat(client: RuntimeHttpClient) -> Iterator[None]:
    """Task heartbeats while the task runs. Unlike Flower's, a refused one never signals the process: the
    worker outlives every task."""

    def beat() -> bool:
        try:
            return client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
        except httpx.HTTPError:
            return False

    sender = HeartbeatSender(beat)
    sender.start()
    try:
        yield
    finally:
        sender.stop()


@contextmanager
def _mirrored_output(logs: Queue[str | None]) -> Iterator[None]:
    """Copy what the task prints (Flower's log included) to `logs`, as flwr-serverapp does with its whole
    process, and stop copying afterwards."""
    streams = (sys.stdout, sys.stderr)
    for stream in streams:
        stream.write = _tee(stream.write, logs)
    try:
        yield
    finally:
        for stream in streams:
            del stream.write  # back to the class's own method


def _tee(write: Callable[[str], int], logs: Queue[str | None]) -> Callable[[str], int]:
    def fn(text: str) -> int:
        logs.put(text)
        return write(text)

    return fn

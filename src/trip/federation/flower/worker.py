"""A warm ClientApp executor for one SuperNode (`flower-supernode --isolation process`).

Flower's own executor (`flower-superexec`) starts a fresh `flwr-clientapp` process for every message; for
trip that means importing torch and open_clip, loading the CLIP and the frozen features again, every round
(seconds for a tiny model, a minute for ViT-B/16). This executor takes the same tasks from the SuperNode's
Runtime API, but runs the ClientApp in one long-lived process, so the module-level cache of
`trip.federation.flower.node` keeps the backbone and the features between messages and runs.

It follows `flwr.supernode.runtime.run_clientapp` (flwr 1.42) step by step: acquire a task, pull its
message, context and FAB, call the ClientApp named by the FAB, push the reply and the task output."""

from __future__ import annotations

import time
from logging import ERROR, INFO

import httpx
from flwr.app import Error, Message
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.common import log
from flwr.common.config import get_fab_config
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.object_ref import load_app
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output


def serve(runtime_api: str, root_certificates: str | None = None, poll: float = 0.2) -> None:
    """Run the ClientApp tasks of the SuperNode whose Runtime API is at `runtime_api` (host:port), forever."""
    client = runtime_client(runtime_api, root_certificates)
    log(INFO, "trip worker: serving the SuperNode Runtime API at %s", runtime_api)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    while True:
        res = client.AcquireTask(request)
        if res.HasField("task") and res.token:
            run_task(runtime_client(runtime_api, root_certificates, res.token))
        else:
            time.sleep(poll)


def run_task(client: RuntimeHttpClient) -> None:
    """One message: pull it, run the ClientApp, push the reply (an Error reply if the app raised)."""
    heartbeat = HeartbeatSender(lambda: _heartbeat(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, _, fab = pull_task_input(client)
        reply = _client_app(fab.content)(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - every failure goes back to the ServerApp as an Error reply
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        details = f"{type(ex).__name__}: {ex}"
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) else \
            ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, status, details)
        finally:
            heartbeat.stop()
            client.close()


def _client_app(fab: bytes) -> ClientApp:
    ref = get_fab_config(fab)["tool"]["flwr"]["app"]["components"]["clientapp"]
    return load_app(ref, LoadClientAppError)


def runtime_client(runtime_api: str, root_certificates: str | None, token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=runtime_api, insecure=root_certificates is None,
                                                 root_certificates=root_certificates, interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def _heartbeat(client: RuntimeHttpClient) -> bool:
    """Unlike Flower's, this one never signals the process: the worker outlives every task."""
    try:
        return client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
    except httpx.HTTPError:
        return False

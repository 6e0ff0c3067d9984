"""Deployment safe by default (issue 12): `trip flower certs` never replaces keys unasked, a SuperNode takes part
only in runs on its own data set and never writes into its data root, bad site options are one message."""

import time

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from trip.cli import main
from trip.config import parse_config
from trip.errors import TripError
from trip.federation.flower import client_app
from trip.federation.flower.protocol import RunSpec

SYNTHETIC_RUN = RunSpec(parse_config({
    "name": "deploy-test", "seeds": [3], "device": "cpu", "backbone": {"name": "tiny", "pretrained": None},
    "data": {"name": "synthetic", "images_per_class": 4, "targets": ["photo"]},
    "methods": [{"name": "trip", "num_experts": 2, "n_ctx": 2}]}), 3, "trip", "photo")


def test_certs_refuse_to_replace_keys_unless_forced(tmp_path, capsys):
    folder = tmp_path / "certs"
    assert main(["flower", "certs", str(folder), "--nodes", "2"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(before) == ["ca.crt", "ca.key", "node0.key", "node0.pub", "node1.key", "node1.pub", "server.key",
                              "server.pem"]
    assert main(["flower", "certs", str(folder), "--nodes", "3"]) == 2
    err = capsys.readouterr().err
    assert "already holds ca.crt, ca.key, server.pem, server.key, node0.key, node0.pub, node1.key" in err
    assert "--force" in err and "node2" not in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    assert main(["flower", "certs", str(folder), "--nodes", "3", "--force"]) == 0
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert len(after) == 10 and all(after[name] != data for name, data in before.items())
    assert (folder / "node2.key").stat().st_mode & 0o777 == 0o600


def test_certs_into_a_file_is_one_message(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["flower", "certs", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'file'} is a file: give `trip flower certs` a folder " \
                                      "(it makes it if needed)\n"


def query(node_config: dict) -> Message:
    """The ClientApp's answer to the ServerApp's first message, as a deployed SuperNode runs it."""
    message = Message(RecordDict({"config": ConfigRecord()}),
                      metadata=Metadata(run_id=1, message_id="query", src_node_id=0, dst_node_id=7,
                                        reply_to_message_id="", group_id="query", created_at=time.time(), ttl=60.0,
                                        message_type=MessageType.QUERY))
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config=SYNTHETIC_RUN.run_config())
    return client_app.app(message, context)


@pytest.mark.parametrize("declared, why", [
    ("pacs", "this SuperNode holds pacs data; the run is on synthetic"),
    (None, "data root {root} holds no synthetic data set, and the run is on synthetic"),
])
def test_a_supernode_refuses_a_run_on_another_data_set_and_writes_nothing(tmp_path, declared, why):
    root = tmp_path / "data"
    (root / "PACS" / "sketch" / "dog").mkdir(parents=True)
    node_config = {"domain": "sketch", "data-root": str(root), **({"dataset": declared} if declared else {})}
    with pytest.raises(TripError, match=why.format(root=root)):
        query(node_config)
    assert [p.relative_to(root).as_posix() for p in root.rglob("*")] == ["PACS", "PACS/sketch", "PACS/sketch/dog"]


@pytest.mark.parametrize("args, message", [
    (["--data-root", "{tmp}/missing"], "--data-root {tmp}/missing is not a folder"),
    (["--data-root", "{tmp}", "--dataset", "pacs"], "{tmp} holds no pacs folder"),
    (["--data-root", "{tmp}", "--dataset", "pacs", "--domain", "clipart"], "--domain 'clipart' is not a domain"),
    (["--data-root", "{tmp}", "--dataset", "imagenet"], "data.name 'imagenet' is not a known data set"),
])
def test_supernode_options_that_every_run_would_refuse_are_refused_at_start(tmp_path, capsys, args, message):
    site = ["flower", "supernode", "--superlink", "127.0.0.1:1", "--ca", "ca.crt", "--key", "node0.key",
            "--domain", "sketch"]
    assert main(site + [a.format(tmp=tmp_path) for a in args]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err

"""The broker fixtures reach real servers, and JSON is the only serializer messages are accepted in."""

from __future__ import annotations

import pickle

import pytest
from kombu import Connection, Queue
from kombu.exceptions import ContentDisallowed


def _round_trip(url: str, queue: str, transport_options: dict | None = None) -> None:
    with Connection(url, transport_options=transport_options or {}) as conn:
        q = conn.SimpleQueue(queue, serializer="json")
        try:
            q.put({"job_id": "abc", "shard": 3})
            msg = q.get(timeout=10)
            assert msg.content_type == "application/json"
            assert msg.decode() == {"job_id": "abc", "shard": 3}
            msg.ack()

            # A pickle payload is refused when only JSON is accepted.
            q.producer.publish(
                pickle.dumps({"evil": True}),
                routing_key=queue,
                content_type="application/x-python-serialize",
                content_encoding="binary",
                serializer=None,
            )
            with pytest.raises(ContentDisallowed, match="pickle"):
                q.get(timeout=10)
        finally:
            q.close()
            Queue(queue).bind(conn.default_channel).delete()


@pytest.mark.integration
def test_redis_round_trip(redis_url: str, queue_name: str) -> None:
    _round_trip(redis_url, queue_name)


@pytest.mark.integration
def test_rabbitmq_round_trip(rabbitmq_url: str, queue_name: str) -> None:
    _round_trip(rabbitmq_url, queue_name)


def test_filesystem_broker_round_trip(tmp_path, queue_name: str) -> None:
    folder = tmp_path / "broker"
    folder.mkdir()
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder), "control_folder": str(tmp_path)}
    _round_trip("filesystem://", queue_name, options)

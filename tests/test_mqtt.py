"""The MQTT sink against a real Mosquitto: events reach a QoS-1 subscriber, the broker killed
(SIGKILL) and restarted mid-run loses nothing (the spool), a wrong password is one sentence
and never printed."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamvg.config import (
    EngineConfig,
    JsonlSinkConfig,
    MqttSinkConfig,
    PipelineConfig,
    QueryConfig,
    SamplingConfig,
    SinksConfig,
    SourceConfig,
)
from streamvg.errors import ConfigError, MqttAuthError
from streamvg.events import Event
from streamvg.pipeline import Pipeline
from streamvg.sinks.mqtt import MqttSink
from streamvg.testing.mosquitto import MosquittoServer, Subscriber, mosquitto_answers
from streamvg.testing.servers import wait_until
from streamvg.testing.synthetic import replay_records, write_scene
from streamvg.types import Detections


def _event(pipeline: str, i: int) -> Event:
    return Event.grounding(
        pipeline=pipeline, camera="cam0", query_id="q", query="the thing", t=i * 0.04, frame_index=i,
        frame_size=(320, 192), detections=Detections.empty(), model="test",
    )


def _ids(payloads: list[bytes]) -> list[str]:
    return [json.loads(p)["event_id"] for p in payloads]


def _first_occurrences(ids: list[str]) -> list[str]:
    seen: set[str] = set()
    return [i for i in ids if not (i in seen or seen.add(i))]  # type: ignore[func-returns-value]


@pytest.mark.skipif(not mosquitto_answers(), reason="no MQTT broker at 127.0.0.1:1883 (.ci/run starts one)")
def test_pipeline_events_reach_a_qos1_subscriber_on_the_shared_broker(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "v", cameras=1, width=160, height=96, duration_s=3.0, seed=2)
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in replay_records(scene.ground_truth)))
    name = f"t-{uuid.uuid4().hex[:8]}"
    cfg = PipelineConfig(
        name=name,
        sources=[SourceConfig(name="cam0", uri=str(scene.cameras["cam0"]))],
        sampling=SamplingConfig(fps=5.0, window_size=4, stride=2),
        queries=[QueryConfig(id="q", text="anything")],
        engine=EngineConfig(kind="replay", replay_path=str(answers)),
        sinks=SinksConfig(
            jsonl=JsonlSinkConfig(path=str(tmp_path / "events.jsonl")),
            mqtt=MqttSinkConfig(url="mqtt://127.0.0.1:1883", topic="streamvg/{pipeline}/{camera}/{kind}",
                                spool_dir=str(tmp_path / "spool")),
        ),
    )
    with Subscriber("127.0.0.1", 1883, f"streamvg/{name}/#") as sub:
        Pipeline(cfg).run()
        archived = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
        assert {e["kind"] for e in archived} >= {"grounding", "track_start", "track_end"}
        want = [e["event_id"] for e in archived]
        wait_until(lambda: set(_ids(sub.received())) >= set(want), timeout=30,
                   what=f"every event over MQTT ({len(want)} archived, {len(sub.received())} received)")
        got = {json.loads(p)["event_id"]: json.loads(p) for p in sub.received()}
        order = _first_occurrences(_ids(sub.received()))
    assert order == want and [got[i] for i in order] == archived  # the same event JSON, in order
    assert not any((tmp_path / "spool" / "mqtt" / name).glob("seg-*.log"))  # everything acknowledged


def test_broker_killed_and_restarted_mid_run_loses_nothing(tmp_path: Path) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    with MosquittoServer() as srv:
        # A persistent QoS-1 session, saved to the broker's database: after a restart the broker
        # queues events for it even before it has reconnected.
        sub = Subscriber("127.0.0.1", srv.port, f"streamvg/{name}/events", persistent=True, client_id=f"sub-{name}")
        srv.save()
        sink = MqttSink(srv.url(), name, spool_dir=tmp_path / "spool", keepalive_s=5, ack_timeout_s=2.0,
                        retry_max_s=0.2, batch_size=16)
        published: list[str] = []
        stop, paused = threading.Event(), threading.Event()

        def produce() -> None:
            i = 0
            while not stop.is_set():
                if paused.is_set():
                    stop.wait(0.005)
                    continue
                ev = _event(name, i)
                sink.publish(ev)
                published.append(ev.event_id)
                i += 1
                stop.wait(0.002)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        try:
            for round_ in range(2):
                n = len(published)
                wait_until(lambda n=n: len(set(_ids(sub.received()))) > n + 20, timeout=20, what="events flowing")
                # A broker killed without persistence loses what it accepted but has not
                # delivered yet, whoever sent it: kill it while it holds none (the sink is
                # connected and mid-run; the producer resumes at once, into the outage).
                paused.set()
                wait_until(lambda: sink.pending == 0 and set(_ids(sub.received())) >= set(published), timeout=20,
                           what="the subscriber caught up")
                srv.kill()
                paused.clear()
                wait_until(lambda: not sink.connected, timeout=20, what="the sink noticing the broker is gone")
                spooled = sink.stats.spooled
                wait_until(lambda s=spooled: sink.stats.spooled >= s + 50, timeout=20, what="events spooled meanwhile")
                srv.start()
                wait_until(lambda: sink.connected, timeout=20, what=f"the sink reconnecting (round {round_})")
        finally:
            stop.set()
            producer.join(10)
        sink.close(drain_timeout_s=20)
        assert sink.pending == 0 and sink.stats.dropped == 0
        wait_until(lambda: set(_ids(sub.received())) >= set(published), timeout=30,
                   what=f"all {len(published)} events at the subscriber")
        got = _ids(sub.received())
        sub.close()
    assert _first_occurrences(got) == published  # nothing lost, in order (duplicates allowed)
    assert sink.stats.errors >= 2 and sink.stats.spooled >= 100


def test_wrong_password_is_one_sentence_and_never_printed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    secret = f"wrong-{uuid.uuid4().hex[:10]}"
    with MosquittoServer(users={"ha": "right-password"}) as srv:
        with pytest.raises(MqttAuthError) as info:
            MqttSink(srv.url("ha", secret), "p", spool_dir=tmp_path / "spool")
        msg = str(info.value)
        assert secret not in msg and "refused the credentials" in msg and "ha:***@" in msg and "\n" not in msg
        # Mid-run (the password changed on the broker): logged once, masked; events stay spooled.
        caplog.set_level(logging.WARNING)
        sink = MqttSink(srv.url("ha", secret), "p2", spool_dir=tmp_path / "spool", check=False, retry_max_s=0.05)
        for i in range(5):
            sink.publish(_event("p2", i))
        wait_until(lambda: sink.stats.errors >= 3, timeout=20, what="failed attempts")
        assert sink.pending == 5 and not sink.connected and secret not in repr(sink)
        sink.close(drain_timeout_s=0.2)
        auth_lines = [r for r in caplog.records if "refused the credentials" in r.getMessage()]
        assert len(auth_lines) == 1 and secret not in caplog.text
        # The command line: one sentence, exit 2, no traceback, no password.
        scene = write_scene(tmp_path / "v", cameras=1, width=160, height=96, duration_s=1.0, seed=2)
        answers = tmp_path / "a.jsonl"
        answers.write_text("".join(json.dumps(r) + "\n" for r in replay_records(scene.ground_truth)))
        pipeline_file = tmp_path / "p.yaml"
        pipeline_file.write_text(yaml.safe_dump({
            "name": "mqtt-auth", "sources": [{"name": "cam0", "uri": str(scene.cameras["cam0"])}],
            "queries": [{"id": "q", "text": "anything"}],
            "engine": {"kind": "replay", "replay_path": str(answers)},
            "sinks": {"mqtt": {"url": srv.url("ha", secret), "spool_dir": str(tmp_path / "spool")}},
        }))
        from streamvg.cli import main

        capsys.readouterr()
        code = main(["monitor", str(pipeline_file), "--no-view", "--duration-s", "5"])
        err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "refused the credentials" in lines[0] and secret not in err and "Traceback" not in err, err


def test_bad_url_topic_and_qos_are_one_sentence(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"url": "http://u:pw@host:1883"}, "is not an mqtt:// or mqtts:// URL"),
        ({"url": "mqtt://host:1883", "topic": "streamvg/{cam}/x"}, "uses {cam}"),
        ({"url": "mqtt://host:1883", "topic": "streamvg/#"}, "wildcard"),
        ({"url": "mqtt://host:1883", "qos": 3}, "qos must be 0, 1 or 2"),
    ]
    for kwargs, words in cases:
        url = kwargs.pop("url")
        with pytest.raises(ConfigError) as info:
            MqttSink(url, "p", spool_dir=tmp_path / "spool", check=False, **kwargs)
        assert words in str(info.value) and "pw" not in str(info.value), str(info.value)
    cfg = PipelineConfig(name="m", sinks=SinksConfig(mqtt=MqttSinkConfig(url="mqtt://ha:hunter2@broker:1883")))
    assert cfg.masked()["sinks"]["mqtt"]["url"] == "mqtt://ha:***@broker:1883"

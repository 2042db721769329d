"""The `mqtt` sink: each record to `PREFIX/LINE/STATION/result` (QoS 1), and a retained
status on `PREFIX/LINE/STATION/status` that a dashboard or PLC gateway can read at any time.

A message counts as delivered when the broker acknowledges it (PUBACK); until then it stays
in the outbox. paho's network thread reconnects with backoff while the broker is away, and
the broker publishes the last will `{"state": "offline"}` if the line dies without a word.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Sequence
from typing import Annotated, Any

from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessageInfo
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, model_validator

from musc_edge.runtime.record import ResultRecord, utc_now
from musc_edge.runtime.sinks import CommitContext, register_sink
from musc_edge.runtime.sinks.network import NetworkOptions, NetworkSink, secret_from_env
from musc_edge.runtime.sinks.outbox import Message
from musc_edge.runtime.verdicts import ANOMALOUS

log = logging.getLogger(__name__)
# paho says "Client is not connected" at every reconnection attempt; the outage itself is
# logged once by the sink, so those lines are left out
PAHO_LOG = log.getChild("paho")
PAHO_LOG.addFilter(lambda record: "is not connected" not in record.getMessage())

TopicLevel = Annotated[str, Field(min_length=1, pattern=r"^[^+#\x00]+$")]  # no wildcards


class MqttOptions(NetworkOptions):
    """`--sink mqtt:host=broker,line=l1,station=cam1` or the line config's `sinks: {mqtt: ...}`."""

    host: str = Field(min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    line: TopicLevel = "line1"
    station: TopicLevel = "station1"
    topic_prefix: TopicLevel = "musc"
    qos: int = Field(1, ge=1, le=2)  # at least once needs an acknowledgement
    client_id: str | None = None  # default musc-edge-LINE-STATION
    username: str | None = None
    password_env: str | None = None  # the environment variable holding the password
    keepalive: int = Field(60, ge=5)
    heartbeat_s: float = Field(10.0, gt=0)  # the retained status is republished this often
    tls: bool = False  # with the system's CA certificates (the port is then usually 8883)

    @model_validator(mode="after")
    def _login(self) -> MqttOptions:
        if self.password_env and not self.username:
            raise ValueError("password_env needs a username")
        return self


@register_sink("mqtt")
class MqttSink(NetworkSink):
    Options = MqttOptions
    options: MqttOptions

    def connect(self) -> None:
        options = self.options
        base = f"{options.topic_prefix}/{options.line}/{options.station}"
        self.result_topic, self.status_topic = f"{base}/result", f"{base}/status"
        self.broker = f"{options.host}:{options.port}"
        self.parts = self.anomalous = 0
        self.online: bool | None = None  # None until the first attempt
        self.stopping = threading.Event()
        client_id = options.client_id or f"musc-edge-{options.line}-{options.station}"
        # assigned before the network thread starts: its callbacks use it at once
        self.client = client = Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        client.suppress_exceptions = True  # a failing callback is logged, the thread lives on
        client.enable_logger(PAHO_LOG)
        if options.username:
            password = None
            if options.password_env:
                password = secret_from_env(self.name, "password_env", options.password_env)
            client.username_pw_set(options.username, password)
        if options.tls:
            client.tls_set()
        client.will_set(self.status_topic, json.dumps({"state": "offline"}), qos=1, retain=True)
        client.reconnect_delay_set(options.retry_s, options.retry_max_s)
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_connect_fail = lambda client, userdata: self._offline("cannot connect")
        client.connect_async(options.host, options.port, options.keepalive)
        client.loop_start()
        self.heartbeat = threading.Thread(
            target=self._beat, name=f"musc-edge {self.name} status", daemon=True
        )
        self.heartbeat.start()
        self.health.listeners.append(lambda summary: self._publish_running())

    def deliver(self, message: Message) -> None:
        if not self.client.is_connected():
            raise ConnectionError(f"not connected to the broker {self.broker}")
        info = self.client.publish(self.result_topic, json.dumps(message), qos=self.options.qos)
        info.wait_for_publish(self.options.timeout_s)
        if not info.is_published():
            raise TimeoutError(
                f"no acknowledgement from {self.broker} in {self.options.timeout_s} s"
            )

    def commit(self, records: Sequence[ResultRecord], context: CommitContext) -> None:
        super().commit(records, context)
        self.parts += len(records)
        self.anomalous += sum(record.label == ANOMALOUS for record in records)

    def status(self, state: str) -> dict[str, Any]:
        """The retained status: parts and anomalous count this run's records."""
        return {
            "state": state,
            "time": utc_now(),
            "parts": self.parts,
            "anomalous": self.anomalous,
            "backlog": self.outbox.backlog,
            "health": self.health.summary(),
        }

    def _publish_status(self, state: str) -> MQTTMessageInfo:
        return self.client.publish(self.status_topic, json.dumps(self.status(state)), 1, True)

    def _publish_running(self) -> None:
        """The status while the line runs: `degraded` while its input has a problem."""
        if self.client.is_connected():  # paho would queue them all while the broker is away
            self._publish_status("running" if self.health.ok else "degraded")

    def _beat(self) -> None:
        while not self.stopping.wait(self.options.heartbeat_s):
            self._publish_running()

    def _connected(
        self, client: Client, userdata: Any, flags: ConnectFlags, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            self._offline(f"the broker refused the connection: {reason}")
            return
        log.info("sink %s: connected to %s", self.name, self.broker)
        self.online = True
        self._publish_running()
        self.outbox.nudge()

    def _disconnected(
        self,
        client: Client,
        userdata: Any,
        flags: DisconnectFlags,
        reason: ReasonCode,
        props: Any,
    ) -> None:
        if not self.stopping.is_set():
            self._offline(f"disconnected ({reason}); reconnecting")

    def _offline(self, why: str) -> None:
        """Said once per outage, not at every reconnection attempt."""
        if self.online is not False:
            log.warning("sink %s: broker %s: %s", self.name, self.broker, why)
        self.online = False

    def disconnect(self) -> None:
        """A retained `stopped` status, then a clean disconnect (so no last will)."""
        self.stopping.set()
        self.heartbeat.join()
        if self.client.is_connected():
            info = self._publish_status("stopped")
            with contextlib.suppress(RuntimeError):  # gone meanwhile: its last will says offline
                info.wait_for_publish(self.options.timeout_s)
        self.client.disconnect()
        self.client.loop_stop()

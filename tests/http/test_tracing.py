"""Traces: the real OTLP/HTTP exporter sends a request's spans to a receiver in the test, which
decodes them as a collector would; with no endpoint set, tracing is off and its SDK never loads."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from support import run_server

from crossrank.model.model_dir import ModelDir

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace endpoint: every span it is sent, decoded."""

    def __init__(self) -> None:
        self.spans: list = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.paths.append(self.path)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        receiver.spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_a_request_is_one_span_with_a_child_per_step_under_the_clients_trace(
    model_dir: ModelDir,
) -> None:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
    try:
        with run_server(model_dir, otlp_endpoint=endpoint) as srv, srv.client() as c:
            srv.wait_ready()
            headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "X-Request-ID": "traced-1"}
            body = {"query": "q", "passages": ["a", "b", "c"]}
            assert c.post("/rerank", json=body, headers=headers).status_code == 200
            assert c.get("/health").status_code == 200  # not a scoring request: no span
        # Leaving the server shut it down, which exports what is left.
    finally:
        receiver.shutdown()
    assert set(receiver.paths) == {"/v1/traces"}
    by_name = {span.name: span for span in receiver.spans}
    assert set(by_name) == {"rerank", "admission", "tokenisation", "queue", "inference"}
    root = by_name["rerank"]
    assert root.trace_id.hex() == TRACE_ID and root.parent_span_id.hex() == PARENT_ID
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["crossrank.request_id"].string_value == "traced-1"
    assert attributes["crossrank.model"].string_value == "tiny-test-bert"
    assert attributes["crossrank.passages"].int_value == 3
    assert attributes["http.response.status_code"].int_value == 200
    for name in ("admission", "tokenisation", "queue", "inference"):
        child = by_name[name]
        assert child.trace_id == root.trace_id and child.parent_span_id == root.span_id
        # Each step lies within the request, and they come in order.
        assert root.start_time_unix_nano <= child.start_time_unix_nano
        assert child.start_time_unix_nano <= child.end_time_unix_nano <= root.end_time_unix_nano
    inference = {a.key: a.value for a in by_name["inference"].attributes}
    assert inference["crossrank.model"].string_value == "tiny-test-bert"
    assert inference["crossrank.batches"].int_value == 1  # three pairs fit one batch
    # Its three rows, each padded to the batch's longest: a multiple of 3, at least the real.
    padded = inference["crossrank.padded_tokens"].int_value
    assert padded % 3 == 0 and padded >= attributes["crossrank.tokens"].int_value
    steps = [by_name[n] for n in ("tokenisation", "queue", "inference")]
    assert all(
        a.end_time_unix_nano <= b.start_time_unix_nano + 1_000_000
        for a, b in itertools.pairwise(steps)
    )


def test_with_no_endpoint_tracing_is_off_and_its_sdk_never_loads(model_dir: ModelDir) -> None:
    script = (
        "import sys\n"
        "from crossrank.http.app import create_app\n"
        "from crossrank.ops.settings import Settings\n"
        f"create_app(Settings(model={str(model_dir.path)!r}))\n"
        "print('opentelemetry.sdk' in sys.modules)\n"
    )
    env = {"PATH": "/usr/bin:/bin"}  # no OTEL_EXPORTER_OTLP_* from the caller
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"

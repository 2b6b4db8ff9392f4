"""Measures the tests (and benchmarks/loader.py) use that the package itself does not need.

planned_minibatch_rows(sampler)   store rows of each minibatch a BlockShuffleSampler will yield, without reading
label_mixing(labels, n_labels)    how well a label (e.g. batch) mixes within minibatches, in [0, 1]
FaultyProxy(upstream_url)         a loopback HTTP proxy that counts requests and injects faults and latency
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator

import numpy as np

from scvi_scale import sampler as sampler_module


def planned_minibatch_rows(sampler) -> Iterator[np.ndarray]:
    """Store rows of each minibatch still to come in the sampler's current epoch, from its plan (no counts read)."""
    buffers, batch_sizes = sampler._plan(sampler.epoch, sampler.batches_done)
    for parts in sampler_module._cut(((rows, len(rows)) for rows in buffers), batch_sizes):
        yield np.concatenate([rows[start:stop] for rows, start, stop in parts])


def label_mixing(minibatch_labels: Iterable[np.ndarray], n_labels: int) -> float:
    """Mean over minibatches of the normalised entropy of a label within each minibatch, in [0, 1].

    0: every minibatch holds one label; 1: every minibatch holds all labels equally. Comparing a sampler's value
    with a fully random sampler's on a store whose labels lie in contiguous runs of rows measures how far block
    shuffling is from a uniform shuffle. Minibatch labels are integer codes in [0, n_labels).
    """
    if n_labels < 2:
        raise ValueError(f"n_labels={n_labels}: label mixing needs at least two labels")
    entropies = []
    for labels in minibatch_labels:
        frequencies = np.bincount(np.asarray(labels), minlength=n_labels) / len(labels)
        present = frequencies[frequencies > 0]
        entropies.append(float(-(present * np.log(present)).sum() / np.log(n_labels)))
    if not entropies:
        raise ValueError("label_mixing needs at least one minibatch")
    return float(np.mean(entropies))


class FaultyProxy:
    """A loopback HTTP proxy in front of the S3 server that counts requests and injects faults and latency.

    rules: [(method, key substring, action, times)], action "503" (answer 503 Service Unavailable) or a float
    (seconds to wait before forwarding: beyond the client's read timeout it is a timeout); `times` requests that
    match are hit (None: all). latency_s: added to every request. requests: (method, path) of each request seen;
    response_bytes: the bytes of all answers' bodies; max_in_flight: the most requests it held at once (reset it
    to 0 to count anew). Used by tests/test_cloud.py and benchmarks/cloud.py.
    """

    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.rules: list[list] = []
        self.latency_s = 0.0
        self.requests: list[tuple[str, str]] = []
        self.response_bytes = 0
        self.in_flight = self.max_in_flight = 0
        self._counting = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests.append((self.command, self.path))
                time.sleep(proxy.latency_s)
                for rule in proxy.rules:
                    method, part, action, times = rule
                    if method == self.command and part in self.path and (times is None or times > 0):
                        rule[3] = None if times is None else times - 1
                        if action == "503":
                            message = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                            self.send_response(503)
                            self.send_header("Content-Length", str(len(message)))
                            self.end_headers()
                            self.wfile.write(message)
                            return
                        time.sleep(action)
                        break
                connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    connection.request(self.command, self.path, body=body, headers=dict(self.headers))
                    answer = connection.getresponse()
                    payload = answer.read()
                except ConnectionError:  # a request delayed past its test: the server is gone, and its client
                    return
                proxy.response_bytes += len(payload)
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                connection.close()

            def _counted(self):
                with proxy._counting:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    self._forward()
                finally:
                    with proxy._counting:
                        proxy.in_flight -= 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _counted

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

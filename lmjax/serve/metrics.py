"""Prometheus metrics of the server, with vLLM's names and meanings under the `lmjax:` prefix.

    lmjax:time_to_first_token_seconds            request arrival -> first generated token (histogram)
    lmjax:inter_token_latency_seconds            gap between consecutive generated tokens (histogram)
    lmjax:request_time_per_output_token_seconds  (last token - first token) / (tokens - 1) per request (histogram)
    lmjax:e2e_request_latency_seconds            request arrival -> finished (histogram)
    lmjax:request_queue_time_seconds             arrival -> admitted into a decode slot (histogram)
    lmjax:request_prompt_tokens                  prompt tokens per request (histogram)
    lmjax:request_generation_tokens              generated tokens per request (histogram)
    lmjax:prompt_tokens_total                    (counter)
    lmjax:generation_tokens_total                (counter)
    lmjax:request_success_total{finished_reason} finished requests: stop, length, content_filter, ... (counter)
    lmjax:num_requests_running                   requests in decode slots (gauge)
    lmjax:num_requests_waiting                   requests queued for a slot (gauge)
    lmjax:kv_cache_usage_perc                    fraction of KV-cache positions in use, 0..1 (gauge)
    lmjax:http_requests_total{handler,method,status}  HTTP requests (counter)

Every metric has a `model_name` label. Each server has its own registry (several can live in one process).
"""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 20.0, 40.0, 80.0)
FINISH_REASONS = ("stop", "length", "content_filter", "abort")
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class Metrics:
    """The server's metrics for one model."""

    def __init__(self, model_name: str, load: Callable[[], tuple[int, int, float]]):
        """`load()` gives (running, waiting, KV-cache use) and is read at every scrape."""
        disable_created_metrics()  # no *_created series beside every counter and histogram (as vLLM)
        self.registry = CollectorRegistry()
        self.model_name = model_name
        label = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"lmjax:{name}", doc, label, buckets=buckets, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"lmjax:{name}", doc, label, registry=self.registry).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens.", LATENCY_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds", "Mean time per output token of a request.",
                              LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Time waiting for a decode slot.", LATENCY_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.generation_tokens = histogram("request_generation_tokens", "Generated tokens per request.",
                                           TOKEN_BUCKETS)
        self.prompt_total = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_total = counter("generation_tokens", "Tokens generated.")
        self._success = Counter("lmjax:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        for reason in FINISH_REASONS:  # series exist from the start, so rate() sees the first of each
            self._success.labels(model_name, reason)
        self._http = Counter("lmjax:http_requests", "HTTP requests by handler, method and status.",
                             ["model_name", "handler", "method", "status"], registry=self.registry)
        for index, (name, doc) in enumerate((("num_requests_running", "Requests in decode slots."),
                                             ("num_requests_waiting", "Requests waiting for a slot."),
                                             ("kv_cache_usage_perc", "KV-cache use, 0 to 1."))):
            Gauge(f"lmjax:{name}", doc, label, registry=self.registry).labels(model_name).set_function(
                lambda index=index: load()[index])

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def http(self, handler: str, method: str, status: int) -> None:
        self._http.labels(self.model_name, handler, method, str(status)).inc()

    def observe_request(self, arrival: float, admitted: float | None, token_times: list[float], finished: float,
                        prompt_tokens: int, reason: str) -> None:
        """Records one finished generation: its timestamps (time.time()), token counts and finish reason."""
        self.e2e.observe(finished - arrival)
        if admitted is not None:
            self.queue.observe(max(0.0, admitted - arrival))
        if token_times:
            self.ttft.observe(token_times[0] - arrival)
            for before, after in zip(token_times, token_times[1:], strict=False):
                self.itl.observe(after - before)
            if len(token_times) > 1:
                self.tpot.observe((token_times[-1] - token_times[0]) / (len(token_times) - 1))
        self.prompt_tokens.observe(prompt_tokens)
        self.generation_tokens.observe(len(token_times))
        self.prompt_total.inc(prompt_tokens)
        self.generation_total.inc(len(token_times))
        self.finished(reason)

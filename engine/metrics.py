"""Engine-level Prometheus metrics; the HTTP layer's own metrics live in server/metrics.py.

Gauges say how processes combine (``multiprocess_mode``) for a server of several processes, whose
scrape sums or maxes every live process's values (server/metrics.py)."""

from prometheus_client import Counter, Gauge, Histogram

# Millisecond-resolving buckets (seconds), from 0.5 ms up to 2 minutes.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)

QUEUE_TIME = Histogram(
    "llm_queue_time_seconds",
    "Time a request waited before its first batch",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "llm_batch_size",
    "Sequences (generate) or inputs (classify) per executed batch",
    ["endpoint"],
    buckets=BATCH_BUCKETS,
)
QUEUED = Gauge("llm_queued_requests", "Requests waiting for a batch slot", ["endpoint"], multiprocess_mode="livesum")
RUNNING = Gauge("llm_running_sequences", "Sequences in the running batch (generate)", multiprocess_mode="livesum")
STEP_TIME = Histogram(
    "llm_engine_step_seconds",
    "Wall time of one engine step, scheduling and admission included",
    ["phase"],
    buckets=LATENCY_BUCKETS,
)
KV_USAGE = Gauge("llm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", multiprocess_mode="livemax")
KV_BLOCKS = Gauge(
    "llm_kv_cache_blocks", "KV-cache blocks by state (used, free)", ["state"], multiprocess_mode="livesum"
)
KV_BYTES = Gauge(
    "llm_kv_cache_bytes", "Memory preallocated for the KV cache (keys and values)", multiprocess_mode="livesum"
)
SHED = Counter(
    "llm_shed_requests_total",
    "Waiting generation sequences refused because they could not finish before their deadline",
)
PREEMPTIONS = Counter("llm_preemptions_total", "Sequences preempted for lack of KV-cache blocks")
PREFIX_CACHE_QUERIED = Counter(
    "llm_prefix_cache_queried_tokens_total", "Tokens of admitted sequences looked up in the prefix cache"
)
PREFIX_CACHE_HITS = Counter(
    "llm_prefix_cache_hit_tokens_total", "Tokens whose KV came from the prefix cache instead of prefill"
)
PREFIX_CACHE_BLOCKS = Gauge(
    "llm_prefix_cache_blocks",
    "KV-cache blocks holding a reusable prefix (in use or free but not yet evicted)",
    multiprocess_mode="livesum",
)
PREFIX_CACHE_HIT_RATE = Gauge(
    "llm_prefix_cache_hit_rate", "Hit tokens / queried tokens since the engine started", multiprocess_mode="livemax"
)
RESPONSE_CACHE_HITS = Counter("llm_response_cache_hits_total", "Results answered from the response cache", ["endpoint"])
RESPONSE_CACHE_MISSES = Counter(
    "llm_response_cache_misses_total", "Results not in the response cache (computed)", ["endpoint"]
)
RESPONSE_CACHE_SIZE = Gauge(
    "llm_response_cache_entries", "Results held in the response cache", ["endpoint"], multiprocess_mode="livesum"
)
SPEC_PROPOSED = Counter(
    "llm_spec_proposed_tokens_total", "Draft tokens proposed by speculative decoding and verified by the model"
)
SPEC_ACCEPTED = Counter(
    "llm_spec_accepted_tokens_total",
    "Draft tokens the model accepted (acceptance rate: accepted / proposed; each verification adds one more)",
)
SPEC_VERIFIED = Counter("llm_spec_verified_rows_total", "Sequence rows that verified drafts in a decode step")
SPEC_SPEEDUP = Gauge(
    "llm_spec_speedup",
    "Tokens per sequence per second of decode steps with drafts over steps without, as speculation's speed gate "
    "measures them (decayed averages), per batch-size bucket (powers of two): above 1, speculating pays there",
    ["batch"],
    multiprocess_mode="liveall",
)
GRAMMAR_PUT_OFF = Counter(
    "llm_grammar_put_off_total",
    "Constrained decode rows whose token was put off a step while their grammar mask was computed",
)
DECODE_COMPILE_BUCKETS = Gauge(
    "llm_decode_compile_buckets",
    "Decode-step buckets (batch bucket x query width) compiled in the background after start, by state "
    "(compiled: their steps run compiled; pending: still eager)",
    ["state"],
    multiprocess_mode="livesum",
)

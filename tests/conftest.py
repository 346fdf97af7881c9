"""Test-wide settings: no network, small thread pools, fast Ray start-up."""

import os
import tempfile

# Set before timm / huggingface_hub / ray are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The machine's record of autotuned sparse-gradient paths: a fresh one per test session.
os.environ.setdefault("SHPEFT_CACHE_DIR", tempfile.mkdtemp(prefix="shpeft-test-cache-"))

import torch  # noqa: E402

torch.set_num_threads(1)

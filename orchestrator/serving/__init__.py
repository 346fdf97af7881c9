"""Using finished deltas on one backbone: ``predict`` (a few files, here), ``batch_predict`` (folders,
prefixes and Parquet on Ray Data), ``server`` (Ray Serve, deltas multiplexed per request) and ``export``
(a delta merged into a plain timm checkpoint). Serving never imports stages or workflows."""

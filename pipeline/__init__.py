"""curate.pipeline: the engine (config, stage contract, runner, shards, stats, CLI)."""

__version__ = "0.1.0"

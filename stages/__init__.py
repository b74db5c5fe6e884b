"""curate.stages: one package per pipeline stage; `curate.pipeline.registry` is where each is wired in."""

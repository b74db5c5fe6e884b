"""curate.stages: one module per pipeline stage. `curate.pipeline.registry` lists them."""

"""``xiaolm pipeline``: one recipe, the whole route (see ``route.py``); state files, mixtures and the report card
live beside it."""
from xiaolm.pipeline.route import STAGES, PipelineConfig, main, plan, run_pipeline, wire

__all__ = ["STAGES", "PipelineConfig", "main", "plan", "run_pipeline", "wire"]

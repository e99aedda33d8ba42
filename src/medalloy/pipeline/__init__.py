"""``medalloy pipeline``: datasets -> experts -> universal -> amalgamated -> student -> ONNX ->
evaluation -> report, declared in one YAML file, cached and resumable per stage.

    from medalloy import pipeline
    result = pipeline.run("examples/demo.yaml", "runs/demo")
    print(result.report)

The pipeline composes the recipes (``medalloy train ...``); it re-implements none of them.
"""

from medalloy.pipeline.config import PipelineConfig, json_schema, load_pipeline
from medalloy.pipeline.runner import PipelineResult, run

__all__ = ["PipelineConfig", "PipelineResult", "json_schema", "load_pipeline", "run"]

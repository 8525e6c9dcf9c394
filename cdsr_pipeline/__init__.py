"""cdsr_pipeline: cross-domain sequential recommendation (LLM-EMF, TEMA-LLM) as a Dagster pipeline."""

__version__ = "0.1.0"

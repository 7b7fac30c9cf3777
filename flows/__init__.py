"""Prefect flows: thin, typed tasks composing kdops (library), serving (Triton) and monitoring (Evidently)."""

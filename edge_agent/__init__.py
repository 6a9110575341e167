"""edge-triage: an edge triage agent for radiology."""

__version__ = "0.1.0"

"""Training stages: one module, one ``*StageConfig`` and one ``run_*`` entry point per stage."""

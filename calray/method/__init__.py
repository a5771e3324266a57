"""The paper and the baselines, no loop: contribution (eq 1–10), AIB (eq 17–20), gradient modulation
(eq 12–14) and the method plug-ins the engine's loop calls (base.py: the hook points; plugins.py:
the run's plug-ins, importing it registers every strategy; one file per strategy family)."""

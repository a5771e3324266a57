"""Everything that talks to Ray: one initialisation, Ray Train DDP of the loop, the Tune trial."""

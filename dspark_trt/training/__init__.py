"""Drafter training by self-distillation from the target (DSPARK_SPEC.md section 6)."""
